"""Prompts the policy never solves: does a method learn them? GRPO gets no signal from them
(every group all wrong); methods that bring the reference solution in do.

    python benchmarks/hard_prompts.py [--seeds 0 1 2] [--steps 100] [--recipes a,b,...]

For each seed, with the `grouprl demo` settings (`benchmarks/recipes.py` builds the start):
  1. the demo's SFT start (character model, 600 SFT steps on 2-digit addition);
  2. a probe: `--samples` completions (8) of each of the first `--pool` training problems
     (512; `--ops -`: subtraction problems, which the addition-trained start never saw) at
     temperature 1; the problems with no correct completion are the hard set;
  3. each recipe trains from a fresh copy of the start on the hard set only (its rows get a
     `solution` column: the answer), `--steps` steps of 16 prompts × 8 samples;
  4. the same probe on the hard set (pass rate there, the catalog's metric for anchors and
     dataset resets) and the demo's held-out pass@1 (400 unseen problems, to see that
     nothing else broke).

Default recipes: grpo (the control: all-wrong groups give it no gradient),
offpolicy_anchors (DaGRPO: the solution replaces a rollout of an all-wrong group) and
dataset_reset (DR-PO: rollouts start inside the solution). The table goes to --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from recipes import _git_commit, _load, build_start, heldout, recipe_config

from grouprl.config import recipe_names
from grouprl.data.tasks import get_task
from grouprl.demo import DemoSettings
from grouprl.training.trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100, help="training steps per recipe (100)")
    p.add_argument("--pool", type=int, default=512, help="training problems probed (512)")
    p.add_argument("--samples", type=int, default=8, help="probe samples per problem (8)")
    p.add_argument(
        "--ops",
        default="+",
        help="operators of the probed problems (default +, the SFT task's; - gives "
        "subtraction problems the addition-trained start has never seen)",
    )
    p.add_argument("--recipes", default="grpo,offpolicy_anchors,dataset_reset")
    p.add_argument("--out", default="", help="markdown file for the table (default: print)")
    p.add_argument("--json", default="", help="also write the raw results here")
    args = p.parse_args(argv)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipe_list if r not in recipe_names()]
    if unknown:
        p.error(f"unknown recipe(s): {', '.join(unknown)}")
    if args.steps < 1 or args.pool < 1 or args.samples < 1:
        p.error("--steps, --pool and --samples must be >= 1")
    return args


def pass_rates(trainer: Trainer, samples: int) -> list[float]:
    """Each training prompt's share of correct completions among `samples` (the probe)."""
    _, wins = trainer.collector.probe(samples)
    return [w / samples for w in wins]


def run(args: argparse.Namespace, seed: int, where: Path) -> dict[str, Any]:
    s = DemoSettings(seed=seed)
    task = get_task(s.task)
    model_dir, _ = build_start(task, s, where)
    pool_task = get_task(s.task, ops=args.ops) if args.ops != "+" else task
    rows = [{**r, "solution": r["answer"]} for r in pool_task.train_rows[: args.pool]]
    probe_cfg = recipe_config("grpo", model_dir, where / "probe", 1, s)
    with Trainer(probe_cfg, train_dataset=rows) as tr:
        start = pass_rates(tr, args.samples)
        held_start = heldout(tr.model, tr.tokenizer, task, s)["pass@1"]
    hard = [r for r, p in zip(rows, start, strict=True) if p == 0.0]
    print(
        f"seed {seed}: {len(hard)} of {len(rows)} problems never solved in {args.samples} samples"
    )
    if not hard:
        raise SystemExit(f"seed {seed}: no hard problem in the pool; raise --pool or --samples")
    out: dict[str, Any] = {
        "seed": seed,
        "ops": args.ops,
        "hard": len(hard),
        "pool": len(rows),
        "pool_pass": sum(start) / len(start),
        "heldout_start": held_start,
        "recipes": {},
    }
    for name in args.recipe_list:
        t0 = time.perf_counter()
        cfg = recipe_config(name, model_dir, where / "runs" / name, args.steps, s)
        if len(hard) < s.prompts_per_step:  # a small hard set: every prompt in every step
            cfg["train"]["prompts_per_step"] = len(hard)
            cfg["train"]["micro_batch_size"] = len(hard) * s.num_generations
        with Trainer(cfg, train_dataset=hard) as tr:
            res = tr.train()
            after = pass_rates(tr, args.samples)
            held = heldout(tr.model, tr.tokenizer, task, s)["pass@1"]
        h = res.history
        zero = [m["frac_reward_zero_std"] for m in h if "frac_reward_zero_std" in m]
        r = {
            "hard_pass": sum(after) / len(after),
            "hard_solved": sum(p > 0 for p in after) / len(after),
            "heldout": held,
            "zero_std": sum(zero) / len(zero) if zero else math.nan,
            "seconds": time.perf_counter() - t0,
        }
        out["recipes"][name] = r
        print(
            f"  {name}: hard-set pass {100 * r['hard_pass']:.1f}% ({100 * r['hard_solved']:.0f}% "
            f"of them solved at least once), held-out {100 * held:.1f}%, all-equal groups "
            f"{r['zero_std']:.2f}, {r['seconds']:.0f} s",
            flush=True,
        )
    return out


def table(results: list[dict[str, Any]], recipes: list[str]) -> str:
    head = (
        "| seed | hard set | recipe | hard-set pass rate | hard problems solved ≥ once | "
        "held-out pass@1 (start → end) | all-equal groups |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for res in results:
        for name in recipes:
            r = res["recipes"][name]
            lines.append(
                f"| {res['seed']} | {res['hard']} of {res['pool']} | `{name}` | "
                f"{100 * r['hard_pass']:.1f}% | {100 * r['hard_solved']:.0f}% | "
                f"{100 * res['heldout_start']:.1f}% → {100 * r['heldout']:.1f}% | "
                f"{r['zero_std']:.2f} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/hard_prompts.py", *map(shlex.quote, given)])
    load_before, commit, t0 = _load(), _git_commit(), time.perf_counter()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"grouprl-hard-{seed}-") as tmp:
            results.append(run(args, seed, Path(tmp)))
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = (
        f"Command: `{command}`  \nDate: {when}; commit {commit}; wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min; load average {load_before} before, "
        f"{_load()} after.\n\n" + table(results, args.recipe_list)
    )
    if args.out:
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")
    else:
        print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
