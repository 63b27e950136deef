"""OTC at tiny scale: does `tool_efficiency` cut tool calls per correct answer at similar
accuracy, against accuracy-only GRPO? (issue: multi-turn rollouts; docs/reproductions.md)

Usage:
    python benchmarks/otc_repro.py [--seeds 0 1 2] [--grpo-steps 60] [--out FILE.md]

One warm start (`grouprl demo --task tools`'s SFT: the calculator is called on every hard
problem, 2-digit x 2-digit, and on half of the easy ones, a sum of two digits), then per
seed two GRPO runs from it that differ only in the reward:
- accuracy: exact_match (1 for the right final answer);
- otc: tool_efficiency (OTC, arXiv 2504.14870: correct answers with the group's fewest calls
  get 1, more calls less, wrong answers 0).
Reported on the held-out split (2 samples per problem, temperature 1): pass@1, tool calls
per sample and per correct answer, and the call rate on easy and on hard problems.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from grouprl.data.datasets import load_prompts  # noqa: E402
from grouprl.data.tasks import get_task  # noqa: E402
from grouprl.demo import DemoSettings, multi_turn_of, rl_config, warm_start  # noqa: E402
from grouprl.eval.run import evaluate  # noqa: E402
from grouprl.rewards import RewardSet  # noqa: E402
from grouprl.training.trainer import Trainer  # noqa: E402

ARMS = {
    "accuracy": [
        {"name": "exact_match", "weight": 1.0},
        {"name": "tool_efficiency", "weight": 0.0},
    ],
    "otc": [{"name": "tool_efficiency", "weight": 1.0}, {"name": "exact_match", "weight": 0.0}],
}


def held_out(model, tok, task, s, kind: str | None) -> dict[str, float]:
    rows = [r for r in task.eval_rows if kind is None or r["kind"] == kind][: s.eval_problems]
    return evaluate(
        model,
        tok,
        load_prompts(rows, tokenizer=tok),
        RewardSet.from_config([{"name": "exact_match"}]),
        n=s.eval_samples,
        temperature=s.temperature,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed,
        multi_turn=multi_turn_of(task, tok, s),
    )


def measure(model, tok, task, s) -> dict[str, float]:
    res = held_out(model, tok, task, s, None)
    easy = held_out(model, tok, task, s, "easy")
    hard = held_out(model, tok, task, s, "hard")
    return {
        "pass@1": res["pass@1"],
        "calls/sample": res["tools/calls_mean"],
        "calls/correct": res["tools/calls_per_correct"],
        "easy pass@1": easy["pass@1"],
        "easy calls": easy["tools/calls_mean"],
        "hard pass@1": hard["pass@1"],
        "hard calls": hard["tools/calls_mean"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    task = get_task("tools")
    base = DemoSettings.for_task("tools", grpo_steps=args.grpo_steps, eval_problems=200)
    lines: list[str] = []
    with TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, tok, sft_path, sft_s = warm_start(task, base, Path(tmp) / "warm")
        start = measure(model, tok, task, base)
        print(f"warm start {sft_s:.0f} s: {start}", file=sys.stderr, flush=True)
        rows = {"after SFT": [start]}
        for seed in args.seeds:
            for arm, rewards in ARMS.items():
                s = DemoSettings.for_task("tools", grpo_steps=args.grpo_steps, eval_problems=200)
                s.seed = seed
                task.rewards = rewards
                cfg = rl_config(task, s, sft_path, Path(tmp) / f"{arm}-{seed}")
                tr = Trainer(cfg, train_dataset=task.train_rows)
                tr.train()
                tr.close()
                m = measure(tr.model, tr.tokenizer, task, s)
                rows.setdefault(arm, []).append(m)
                print(f"seed {seed} {arm}: {m}", file=sys.stderr, flush=True)
        cols = list(start)
        lines.append("| run | n | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for name, ms in rows.items():
            cells = []
            for c in cols:
                vals = [m[c] for m in ms]
                med = statistics.median(vals)
                cells.append(
                    f"{med:.3f}"
                    if len(vals) == 1
                    else f"{med:.3f} ({min(vals):.3f}-{max(vals):.3f})"
                )
            lines.append(f"| {name} | {len(ms)} | " + " | ".join(cells) + " |")
        for name in ARMS:
            for seed, m in zip(args.seeds, rows[name], strict=True):
                lines.append(
                    f"| {name}, seed {seed} | 1 | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |"
                )
        lines.append("")
        lines.append(
            f"Median (min-max) over seeds {args.seeds}; {args.grpo_steps} GRPO steps of "
            f"{base.prompts_per_step} prompts x {base.num_generations} trajectories; held-out "
            f"{base.eval_samples} samples per problem at temperature {base.temperature}; "
            f"{time.perf_counter() - t0:.0f} s in all."
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
