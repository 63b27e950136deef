"""`train.async: one_step` vs `off`: seconds per step of the same GRPO work, side by side.

Usage:
    python benchmarks/pipeline.py [--cells 64x128 512x32] [--repeats 3] [--steps 6]
        [--threads 2] [--omp-wait-policy passive|active|unset] [--out FILE.md]

Each run is a fresh grouprl worker of benchmarks/vs_trl.py (its model, prompts, reward and
settings: a random-weight Qwen2, hidden 256 x 4 layers, 4 prompts x G=8 completions of
exactly C tokens per step, fp32), with `train.async` set to off or one_step; the two modes
alternate within each repeat. A step's time is the wall time between two step ends; the
first two steps of a run are left out (the first is never overlapped, and the second still
pays warm-up), and so is one_step's last step, which samples nothing ahead (its worker runs
one step more to keep the count). Reported: median seconds per step of each mode, and the ratio one_step / off
per repeat (min / median / max), plus what one_step's steps waited for their batch.

What to expect: one_step overlaps sampling with the update, which pays off where the two
run on separate resources (vLLM on its own GPUs, or a GPU busy with the update while the
CPU drives sampling). On a CPU both compete for the same cores, so the ratio there shows
the overhead of the pipeline more than its gain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (the worker, model and prompts of the TRL benchmark)


def run_mode(args, work: Path, model_dir: Path, P: int, C: int, mode: str) -> list[float]:
    ns = argparse.Namespace(
        threads=args.threads,
        omp_wait_policy=args.omp_wait_policy,
        time_budget=args.time_budget,
        worker_timeout=args.worker_timeout,
        grouprl_src=None,
        grouprl_set=[f"train.async={mode}"],
    )
    out, why = vs_trl.run_worker("grouprl", ns, work, model_dir, P, C, args.steps, 1e-6)
    if out is None:
        raise SystemExit(f"{mode} P={P} C={C}: {why}")
    return [s["wall"] for s in vs_trl.measured(out["steps"], skip=2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["64x128", "512x32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "unset"),
        default="passive",
        help="OMP_WAIT_POLICY of the workers, as in vs_trl.py (unset: the runtime's default)",
    )
    ap.add_argument("--time-budget", type=float, default=600.0)
    ap.add_argument("--worker-timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lines = [
        "| prompt x completion | off s/step | one_step s/step | one_step / off (min / median / max) |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = vs_trl.build_model_dir(work / "model")
        for cell in args.cells:
            P, C = (int(x) for x in cell.split("x"))
            vs_trl.write_prompts(model_dir, P, work / f"prompts_{P}.json")
            per_mode: dict[str, list[float]] = {"off": [], "one_step": []}
            ratios = []
            for r in range(args.repeats):
                order = ("off", "one_step") if r % 2 == 0 else ("one_step", "off")
                med = {
                    m: statistics.median(run_mode(args, work, model_dir, P, C, m)) for m in order
                }
                for m in order:
                    per_mode[m].append(med[m])
                ratios.append(med["one_step"] / med["off"])
                print(f"{cell} repeat {r}: {med} ratio {ratios[-1]:.2f}", file=sys.stderr)
            lines.append(
                f"| {cell} | {statistics.median(per_mode['off']):.2f} | "
                f"{statistics.median(per_mode['one_step']):.2f} | {min(ratios):.2f} / "
                f"{statistics.median(ratios):.2f} / {max(ratios):.2f} |"
            )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
