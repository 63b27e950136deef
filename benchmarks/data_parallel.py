"""GRPO step time and peak memory per process: 1 process vs N under torchrun, same work.

Usage:
    python benchmarks/data_parallel.py [--procs 2] [--steps 4] [--hidden 256] [--layers 4]
        [--prompts 8] [--G 8] [--max-new-tokens 16]

Both runs train the same model (a random Qwen2 from `build_tiny_model`, fp32) on the
built-in `arith` task with the HF engine and the same global batch (`--prompts` x `--G`
completions per step). The single process gets all the machine's threads; each of the N
processes gets 1/N of them (OMP_NUM_THREADS), so the comparison spends the same cores.
Reported: the median of `time/step`, `time/collect` and `time/train` over the steps after
the first (from metrics.jsonl), and each process's peak resident memory (ru_maxrss, which
includes importing torch and transformers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    """One run (a torchrun worker or the single process); rank 0 writes the report."""
    from grouprl.training.trainer import Trainer

    cfg = {
        "model": {"name_or_path": args.model_dir},
        "data": {"task": "arith"},
        "rollout": {"num_generations": args.G, "max_new_tokens": args.max_new_tokens},
        "train": {
            "output_dir": args.out,
            "max_steps": args.steps,
            "prompts_per_step": args.prompts,
            "micro_batch_size": args.prompts * args.G,
            "save_every": 0,
            "progress": False,
            "overwrite": True,
        },
    }
    with Trainer(cfg) as tr:
        tr.train()
        rank = tr.dist.rank
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out, f"peak_{rank}.txt").write_text(f"{peak:.0f}")


def run(n: int, args: argparse.Namespace, model_dir: Path, work: Path) -> dict:
    out = work / f"p{n}"
    threads = max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    script = [
        str(Path(__file__).resolve()),
        "--child",
        "--model-dir",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--prompts",
        str(args.prompts),
        "--G",
        str(args.G),
        "--max-new-tokens",
        str(args.max_new_tokens),
    ]
    if n == 1:
        cmd = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *script,
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    med = {
        k: statistics.median(r[k] for r in rows)
        for k in ("time/step", "time/collect", "time/train")
    }
    peaks = [int((out / f"peak_{r}.txt").read_text()) for r in range(n)]
    return {**med, "peaks": peaks, "threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from grouprl.data.tasks import get_task
    from grouprl.models.tiny import build_tiny_model, save_model

    work = Path(tempfile.mkdtemp(prefix="grouprl-dp-bench-"))
    tok = get_task("arith").build_tokenizer()
    model = build_tiny_model(tok, hidden_size=args.hidden, num_layers=args.layers, seed=0)
    model_dir = save_model(model, tok, work / "model")
    print(
        f"model hidden {args.hidden}, {args.layers} layers, fp32; arith, {args.prompts} prompts x "
        f"{args.G} samples of <= {args.max_new_tokens} tokens per step; median of "
        f"{args.steps - 1} steps after 1; {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}"
    )
    print("| processes | threads each | step s | collect s | train s | peak MB per process |")
    print("|---|---|---|---|---|---|")
    for n in (1, args.procs):
        r = run(n, args, model_dir, work)
        print(
            f"| {n} | {r['threads']} | {r['time/step']:.3f} | {r['time/collect']:.3f} | "
            f"{r['time/train']:.3f} | {', '.join(map(str, r['peaks']))} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
