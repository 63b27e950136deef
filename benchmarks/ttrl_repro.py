"""Tiny-scale reproduction of TTRL vs SPINE (label-free test-time RL) on the demo task.

For each seed: SFT a tiny model on `arith` (the demo's warm start), then adapt it on the
held-out questions WITHOUT labels (majority-vote pseudo-rewards), once with the `ttrl`
recipe and once with `spine`, same budget; report held-out pass@1 before/after (labels
used only here, for measurement) and the completion length over steps.

    python benchmarks/ttrl_repro.py --seeds 0 1 2 --steps 100 --lr 1e-5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM

from grouprl.data.datasets import load_prompts
from grouprl.data.tasks import get_task
from grouprl.demo import DemoSettings, warm_start
from grouprl.eval.run import evaluate
from grouprl.models.loading import load_tokenizer
from grouprl.rewards import RewardSet
from grouprl.training.trainer import Trainer


def sft_start(seed: int, out: Path) -> Path:
    """The demo's warm start for this seed (`grouprl.demo.warm_start`), saved under `out`."""
    return warm_start(get_task("arith"), DemoSettings(seed=seed), out / f"seed{seed}")[2]


def pass_at_1(model, tok, held, seed: int) -> float:
    task = get_task("arith")
    return evaluate(
        model,
        tok,
        held,
        RewardSet.from_config(task.rewards),
        n=4,
        ks=(1,),
        temperature=1.0,
        max_new_tokens=6,
        seed=seed,
    )["pass@1"]


def adapt(
    recipe: str,
    model_dir: Path,
    questions: list[dict],
    seed: int,
    steps: int,
    out: Path,
    lr: float = 1e-5,
) -> dict:
    tok = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    cfg = {
        "recipe": recipe,
        "model": {"name_or_path": str(model_dir)},
        "rewards": [{"name": "majority_vote", "params": {"mode": "math"}}],
        "rollout": {
            "num_generations": 16,
            "num_train_samples": 8,
            "max_new_tokens": 6,
            "temperature": 1.0,
        },
        "train": {
            "output_dir": str(out / f"{recipe}_seed{seed}"),
            "overwrite": True,  # a rerun replaces the earlier one (moved aside)
            "seed": seed,
            "max_steps": steps,
            "prompts_per_step": 8,
            "micro_batch_size": 64,
            "learning_rate": lr,
            "max_grad_norm": 10.0,
            "lr_schedule": "constant",
            "save_every": 0,
            "progress": False,
        },
    }
    t0 = time.perf_counter()
    res = Trainer(cfg, model=model, tokenizer=tok, train_dataset=questions).train()
    lengths = [h["completions/mean_length"] for h in res.history]
    return {
        "model": model,
        "tok": tok,
        "seconds": time.perf_counter() - t0,
        "length_start": sum(lengths[:5]) / len(lengths[:5]),
        "length_end": sum(lengths[-5:]) / len(lengths[-5:]),
        "length_min": min(lengths),
        "lengths": lengths,
        "majority_ratio_end": sum(h["ttrl/majority_ratio"] for h in res.history[-5:]) / 5,
        "label_accuracy_end": sum(h.get("ttrl/label_accuracy", 0) for h in res.history[-5:]) / 5,
        "collapse_warnings": sum(1 for h in res.history if h.get("collapse/warning")),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    task = get_task("arith")
    questions = task.eval_rows[: args.questions]  # unlabeled for training: only `prompt` is used
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            start = sft_start(seed, tmp)
            tok = load_tokenizer(str(start))
            held = load_prompts(questions, tokenizer=tok)
            before = pass_at_1(AutoModelForCausalLM.from_pretrained(str(start)), tok, held, seed)
            for recipe in ("ttrl", "spine"):
                r = adapt(
                    recipe,
                    start,
                    [{"prompt": q["prompt"], "answer": q["answer"]} for q in questions],
                    seed,
                    args.steps,
                    tmp,
                    lr=args.lr,
                )
                after = pass_at_1(r["model"], r["tok"], held, seed)
                row = {
                    "seed": seed,
                    "recipe": recipe,
                    "pass@1 before": before,
                    "pass@1 after": after,
                    **{k: v for k, v in r.items() if k not in ("model", "tok", "lengths")},
                }
                rows_out.append(row)
                print(json.dumps({**row, "lengths_every_10": r["lengths"][::10]}), flush=True)
    header = "| seed | recipe | pass@1 before | pass@1 after | length start -> end (min) | majority ratio (end) | label acc. of majority (end) | collapse warnings | seconds |"
    lines = [header, "|" + "---|" * 9]
    for r in rows_out:
        lines.append(
            f"| {r['seed']} | {r['recipe']} | {100 * r['pass@1 before']:.1f}% | {100 * r['pass@1 after']:.1f}% | "
            f"{r['length_start']:.2f} -> {r['length_end']:.2f} ({r['length_min']:.2f}) | {r['majority_ratio_end']:.3f} | "
            f"{r['label_accuracy_end']:.3f} | {r['collapse_warnings']} | {r['seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
