"""Tiny-scale reproduction of CRPO (Clinical-R1) vs GRPO on accuracy + format only.

For each seed: the clinical demo's warm start (a tiny word-level Qwen2, SFT on traces of
which 40% are imperfect: skipped key findings, invented findings, no rule-outs, a box
that contradicts the conclusion, wrong answers), then two RL runs from that same model
with the same budget and settings, differing only in the rewards:

- ``grpo``: choice_accuracy (1.0) + format (0.25);
- ``crpo``: the `crpo` recipe: the same two plus clinical_faithfulness (0.5) and
  clinical_comprehensiveness (0.5), paid only on a valid format;
- ``crpo_gdpo`` (with ``--arms grpo crpo crpo_gdpo``): the `crpo_gdpo` recipe (each reward normalized in its
  group, then summed).

Every arm is then scored on the same held-out vignettes with all four objectives.

    python benchmarks/crpo_repro.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM

from grouprl.data.datasets import load_prompts
from grouprl.data.tasks import get_task
from grouprl.demo import DemoSettings, held_out_eval, rl_config, warm_start
from grouprl.models.loading import load_tokenizer
from grouprl.rewards import RewardSet
from grouprl.training.trainer import Trainer

# GRPO keeps CRPO's accuracy and format weights and drops the two reasoning rewards.
GRPO_REWARDS = [
    {"name": "choice_accuracy", "weight": 1.0},
    {"name": "format", "weight": 0.25},
]


def _crpo_rewards(faithfulness: float, zero_if_invented: bool) -> list[dict[str, Any]]:
    """The crpo recipe's rewards with another faithfulness weight or conditioning."""
    return [
        *GRPO_REWARDS,
        {"name": "clinical_faithfulness", "weight": faithfulness, "params": {"gate": "format"}},
        {
            "name": "clinical_comprehensiveness",
            "weight": 0.5,
            "params": {"gate": "format", "zero_if_invented": zero_if_invented},
        },
    ]


# The arms: a recipe, and what replaces the recipe's sections. The last two are the
# design ablations of docs/reproductions.md (comprehensiveness paid even when a cited
# finding is invented; the same with faithfulness weighted 1.0).
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"recipe": "crpo", "rewards": GRPO_REWARDS},
    "crpo": {"recipe": "crpo"},
    "crpo_gdpo": {"recipe": "crpo_gdpo"},
    "crpo_unconditioned": {"recipe": "crpo", "rewards": _crpo_rewards(0.5, False)},
    "crpo_unconditioned_f1": {"recipe": "crpo", "rewards": _crpo_rewards(1.0, False)},
}
# What the table reports: the four objectives, and the two halves of comprehensiveness.
MEASURES: list[dict[str, Any]] = [
    {"name": "choice_accuracy"},
    {"name": "format"},
    {"name": "clinical_faithfulness"},
    *(
        {"name": "clinical_faithfulness", "alias": check, "params": {"checks": [check]}}
        for check in ("no_invented", "matches_box", "consistent")
    ),
    {"name": "clinical_comprehensiveness"},
    {"name": "clinical_comprehensiveness", "alias": "key_cited", "params": {"w_rule": 0.0}},
    {"name": "clinical_comprehensiveness", "alias": "ruled_out", "params": {"w_key": 0.0}},
]
COLUMNS = [
    "accuracy",
    "clinical_faithfulness",
    "no_invented",
    "matches_box",
    "consistent",
    "clinical_comprehensiveness",
    "key_cited",
    "ruled_out",
    "format",
]


def measure(model, tok, task, s: DemoSettings) -> dict[str, float]:
    """Mean of every measure over the held-out vignettes (s.eval_samples each)."""
    held = load_prompts(task.eval_rows[: s.eval_problems], tokenizer=tok)
    res = held_out_eval(model, tok, task, s, held, RewardSet.from_config(MEASURES))
    # accuracy = share of samples whose boxed letter is the gold (the reward's mean would
    # also count its negative penalties for several boxes)
    out = {
        "accuracy": res["pass@1"],
        "accuracy_ci": (res["pass@1_ci_high"] - res["pass@1_ci_low"]) / 2,
    }
    for m in MEASURES[1:]:
        label = m.get("alias", m["name"])
        out[label] = res[f"rewards/{label}/mean"]
        out[label + "_ci"] = (res[f"rewards/{label}/ci_high"] - res[f"rewards/{label}/ci_low"]) / 2
    return out


def run_arm(arm: str, task, s: DemoSettings, start: Path, out: Path) -> dict[str, Any]:
    tok = load_tokenizer(str(start))
    model = AutoModelForCausalLM.from_pretrained(str(start))
    spec = ARMS[arm]
    # an arm rerun in the same --workdir replaces the earlier one (moved aside)
    cfg = rl_config(task, replace(s, recipe=spec["recipe"], overwrite=True), start, out / arm)
    cfg.update({k: v for k, v in spec.items() if k != "recipe"})
    t0 = time.perf_counter()
    res = Trainer(cfg, model=model, tokenizer=tok, train_dataset=task.train_rows).train()
    seconds = time.perf_counter() - t0
    lengths = [h["completions/mean_length"] for h in res.history]
    return {
        "after": measure(model, tok, task, s),
        "seconds": seconds,
        "length_end": sum(lengths[-5:]) / len(lengths[-5:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="RL steps (default: the demo's)")
    ap.add_argument("--lr", type=float, default=None, help="RL learning rate (default: the demo's)")
    ap.add_argument("--sft-steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--eval-problems", type=int, default=None, help="default: the demo's")
    ap.add_argument("--arms", nargs="+", default=["grpo", "crpo"], choices=list(ARMS))
    ap.add_argument("--json", default=None, help="write every result to this file")
    ap.add_argument(
        "--workdir",
        default=None,
        help="keep the models and metrics here (default: a temporary directory); "
        "a seed whose SFT model is already there is not trained again",
    )
    args = ap.parse_args()
    task = get_task("clinical")
    arms = args.arms
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.workdir or tmp
        for seed in args.seeds:
            over: dict[str, Any] = {"seed": seed}
            for key, value in (
                ("grpo_steps", args.steps),
                ("grpo_lr", args.lr),
                ("sft_steps", args.sft_steps),
                ("eval_problems", args.eval_problems),
            ):
                if value is not None:
                    over[key] = value
            s = DemoSettings.for_task("clinical", **over)
            out = Path(tmp) / f"seed{seed}"
            start = out / "sft" / "model"
            if (start / "config.json").is_file():  # --workdir from an earlier run
                tok = load_tokenizer(str(start))
                model = AutoModelForCausalLM.from_pretrained(str(start))
                sft_seconds = 0.0
            else:
                model, tok, start, sft_seconds = warm_start(task, s, out)
            before = measure(model, tok, task, s)
            print(
                json.dumps({"seed": seed, "arm": "sft", **before, "seconds": sft_seconds}),
                flush=True,
            )
            results.append({"seed": seed, "arm": "sft (start)", "after": before})
            for arm in arms:
                r = run_arm(arm, task, s, start, out)
                results.append({"seed": seed, "arm": arm, **r})
                print(
                    json.dumps({"seed": seed, "arm": arm, **r["after"], "seconds": r["seconds"]}),
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results, arms))


def table(results: list[dict[str, Any]], arms: list[str]) -> str:
    head = (
        "| seed | model | accuracy | faithfulness | (a) no invented | (b) box = conclusion "
        "| (c) consistent | comprehensiveness | key findings cited | options ruled out "
        "| format | RL seconds |"
    )
    lines = [head, "|" + "---|" * 12]

    def row(seed: Any, arm: str, values: dict[str, float], seconds: str) -> str:
        cells = [f"{100 * values['accuracy']:.1f}%"]
        cells += [f"{values[c]:.3f}" for c in COLUMNS[1:]]
        return f"| {seed} | {arm} | " + " | ".join(cells) + f" | {seconds} |"

    for r in results:
        sec = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(row(r["seed"], r["arm"], r["after"], sec))
    seeds = sorted({r["seed"] for r in results})
    for arm in ["sft (start)", *arms]:
        rs = [r["after"] for r in results if r["arm"] == arm]
        mean = {c: sum(v[c] for v in rs) / len(rs) for c in COLUMNS}
        lines.append(row(f"mean of {len(seeds)}", arm, mean, ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
