"""Hints the policy can read: do the hint methods teach the policy to solve, without the
hint, problems it never solved?

    python benchmarks/hint_effects.py [--seeds 0 1] [--steps 100] [--recipes a,b,...]

The demo's character model cannot read a hint: it was SFT'd on "a+b=" only. This script
builds a start that can, so that the methods that put something in the prompt (a dataset
hint, a hint the policy writes, solved exemplars, a draft, the answer) have something to
work with. Per seed:

  1. The task: every 2-digit addition "a+b=" (*easy*) and every subtraction "a-b=" with
     a >= b (*hard*), 20% held out.
  2. The SFT start (the demo's 3-layer 128-wide character Qwen2, `--sft-steps` steps)
     learns from the training split:
       plain      "a+b=" -> c, additions only (the start never sees a plain subtraction);
       hinted     "a+b=[h]" -> c, h any prefix of c (the `hints` column: the prefixes of
                  1, 2, ... digits, increasing detail), and "a-b=[d]" -> d with the whole
                  answer only (a subtraction is copied from its hint, never computed);
       few-shot   "q1c1;a+b=" -> c, 1-2 solved additions first;
       tutor      "a+b=c?" -> {"level_1":"1","level_2":"12","level_3":"125"} for both
                  operations (the JSON hints SAGE's policy writes from a reference solution).
     So the start copies a subtraction's answer from a hint and (almost) never gets one
     right from the plain prompt: nothing in its data computes a difference.
  3. A probe: `--samples` (8) plain completions of each of the first `--pool` (512)
     training problems; the subtractions never solved are the hard set.
  4. Each recipe trains from a fresh copy of the start on the pool (plain prompts; its
     rows carry `hints`, `solution` and `answer`), `--steps` steps of 16 prompts x 8
     samples, with the templates set to the task's format (`TEMPLATES`).
  5. Measured with plain prompts only: the hard set's pass rate (probe), held-out pass@1
     on hard and on easy problems (400 each, 4 samples), and the method's own metric
     (groups rescued by a hint, success of steered rollouts).

GRPO is the control: on the hard set every group is all wrong, so it gets no gradient
there. The catalog's claim for the family (scaf, sage, guide, icl_seed, icpo, expo, igrpo):
the plain-prompt pass rate on problems the start never solves rises above 0.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from recipes import _git_commit, _load, recipe_config  # this folder's script

from grouprl.config import recipe_names
from grouprl.data.datasets import load_prompts
from grouprl.data.tasks.base import Task
from grouprl.demo import DemoSettings, warm_start
from grouprl.eval.run import evaluate
from grouprl.rewards import RewardSet
from grouprl.training.trainer import Trainer

CHARS = '0123456789+-=[];?{}":_,lev'
REWARDS = [{"name": "exact_match", "weight": 1.0}]
HINT = "[{hint}]"  # after the plain prompt: "12+34=[4]"
SHOT = ";"  # after each solved exemplar: "12+34=46;56+78="

# the recipes' templates in this task's format (rollout.strategy.<key>)
TEMPLATES: dict[str, dict[str, Any]] = {
    "grpo": {},
    "scaf_hints": {"hint_template": HINT, "warmup_steps": 0},
    "sage_hints": {
        "tutor_prompt": "{question}{solution}?",
        "question_template": "{question}" + HINT,
        "hint_tokens": 56,
    },
    "guide_hints": {"hint_template": HINT, "level": 2},  # the whole answer
    "expo": {"explain_template": "[{answer}]"},
    "icl_seed": {"exemplar_template": "{question}{answer}" + SHOT},
    "icpo": {"demo_template": "{question}{solution}" + SHOT},
    "igrpo": {"refine_template": "[{draft}]"},
    # hard groups: a prefix of an answer-guided trace as the hint; easy ones: misleading
    # one-digit hints as the "distractors" (this format has no room for sentences)
    "difficulty_aug": {
        "answer_template": "[{answer}]",
        "hint_template": "[{hint}]",
        "distractors": ["[0]", "[9]"],
        "max_distractors": 1,  # several are joined by a space, not in this vocabulary
        "distractor_template": "{distractors}",
    },
}
# the metrics that show each method at work: (key, label); means over the run's steps
SHOWN: dict[str, list[tuple[str, str]]] = {
    "scaf_hints": [("hint/rescued_groups", "groups rescued/step")],
    "sage_hints": [
        ("hint/rescued_groups", "groups rescued/step"),
        ("hint/unparsed_hints", "unparsed"),
    ],
    "guide_hints": [("guide/hinted_success_frac", "hinted success")],
    "expo": [("expo/explained_correct_frac", "explanations correct")],
    "icl_seed": [("icl/seeded_groups", "seeded groups/step"), ("icl/corpus_size", "corpus")],
    "icpo": [("icpo/kept_frac", "steered rows kept")],
    "igrpo": [("igrpo/draft_reward_mean", "draft"), ("igrpo/refined_reward_mean", "refined")],
    "difficulty_aug": [
        ("aug/easier_groups", "made easier/step"),
        ("aug/harder_groups", "made harder/step"),
    ],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=100, help="training steps per recipe (100)")
    p.add_argument("--sft-steps", type=int, default=800, help="SFT steps of the start (800)")
    p.add_argument("--pool", type=int, default=512, help="training problems trained on (512)")
    p.add_argument("--samples", type=int, default=8, help="probe samples per problem (8)")
    p.add_argument("--eval", type=int, default=400, help="held-out problems per class (400)")
    p.add_argument("--recipes", default=",".join(TEMPLATES))
    p.add_argument("--out", default="", help="markdown file for the table (default: print)")
    p.add_argument("--json", default="", help="also write the raw results here")
    args = p.parse_args(argv)
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipe_list if r not in recipe_names()]
    if unknown:
        p.error(f"unknown recipe(s): {', '.join(unknown)}")
    if min(args.steps, args.pool, args.samples, args.eval, args.sft_steps) < 1:
        p.error("--steps, --sft-steps, --pool, --samples and --eval must be >= 1")
    return args


def hint_task(split_seed: int = 1234) -> Task:
    """2-digit additions (easy) and subtractions a-b with a >= b (hard), 20% held out;
    rows carry hints, the solution (the answer) and the class."""
    rows = []
    for a in range(10, 100):
        for b in range(10, 100):
            c = str(a + b)
            hints = [c[:i] for i in range(1, len(c) + 1)]
            rows.append({"prompt": f"{a}+{b}=", "answer": c, "hints": hints, "hard": False})
            if a >= b:
                d = str(a - b)
                rows.append({"prompt": f"{a}-{b}=", "answer": d, "hints": [d[:1], d], "hard": True})
    for r in rows:
        r["solution"] = r["answer"]
    random.Random(split_seed).shuffle(rows)
    n_eval = len(rows) // 5
    train, held = rows[n_eval:], rows[:n_eval]
    adds = [r for r in train if not r["hard"]]

    def sft_pairs(seed: int) -> tuple[list[str], list[str]]:
        rng = random.Random(seed)
        prompts, targets = [], []
        for r in train:
            c = r["answer"]
            if not r["hard"]:  # plain, any hint level, few-shot: additions only
                prompts.append(r["prompt"])
                targets.append(c)
                prompts.append(r["prompt"] + HINT.format(hint=rng.choice(r["hints"])))
                targets.append(c)
                shots = rng.sample(adds, rng.randint(1, 2))
                prompts.append(
                    "".join(x["prompt"] + x["answer"] + SHOT for x in shots) + r["prompt"]
                )
                targets.append(c)
            else:  # a subtraction only with its whole answer as the hint: copying, not computing
                prompts.append(r["prompt"] + HINT.format(hint=c))
                targets.append(c)
            levels = [c[:1], c[:2], c]
            prompts.append(f"{r['prompt']}{c}?")
            targets.append(json.dumps({f"level_{i + 1}": h for i, h in enumerate(levels)}))
        return prompts, [t.replace(" ", "") for t in targets]

    return Task(
        name="hint_arith",
        train_rows=train,
        eval_rows=held,
        rewards=REWARDS,
        correct_reward="exact_match",
        chars=CHARS,
        sft_pairs=sft_pairs,
    )


def pass_rate(model: Any, tok: Any, rows: list[dict], n: int, s: DemoSettings) -> float:
    """Mean share of correct plain completions (n samples per problem, temperature 1)."""
    examples = load_prompts(rows, tokenizer=tok)
    res = evaluate(
        model,
        tok,
        examples,
        RewardSet.from_config(REWARDS),
        correct_reward="exact_match",
        n=n,
        temperature=s.temperature,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed,
    )
    return float(res["pass@1"])


def per_prompt_wins(
    model_dir: Path, rows: list[dict], n: int, where: Path, s: DemoSettings
) -> list[int]:
    """How many of n plain samples of each problem the saved start gets right (the probe)."""
    cfg = recipe_config("grpo", model_dir, where / "probe", 1, s)
    cfg.pop("data", None)
    cfg["rewards"] = REWARDS
    with Trainer(cfg, train_dataset=rows) as tr:
        _, wins = tr.collector.probe(n)
    return [int(w) for w in wins]


def run(args: argparse.Namespace, seed: int, where: Path) -> dict[str, Any]:
    s = DemoSettings(seed=seed, sft_steps=args.sft_steps)
    task = hint_task()
    t0 = time.perf_counter()
    start, tok, model_dir, _ = warm_start(task, s, where)
    sft_s = time.perf_counter() - t0
    pool = task.train_rows[: args.pool]
    held_hard = [r for r in task.eval_rows if r["hard"]][: args.eval]
    held_easy = [r for r in task.eval_rows if not r["hard"]][: args.eval]
    start.eval()
    wins = per_prompt_wins(model_dir, pool, args.samples, where, s)
    hard_set = [r for r, w in zip(pool, wins, strict=True) if w == 0 and r["hard"]]
    hinted = [{**r, "prompt": r["prompt"] + HINT.format(hint=r["hints"][-1])} for r in held_hard]
    out: dict[str, Any] = {
        "seed": seed,
        "sft_seconds": sft_s,
        "pool": len(pool),
        "pool_hard": sum(r["hard"] for r in pool),
        "hard_set": len(hard_set),
        "hard_set_of_hard_class": sum(r["hard"] for r in hard_set),
        "start": {
            "hard_set_pass": pass_rate(start, tok, hard_set, args.samples, s),
            "held_hard": pass_rate(start, tok, held_hard, 4, s),
            "held_easy": pass_rate(start, tok, held_easy, 4, s),
            "held_hard_hint1": pass_rate(start, tok, hinted, 4, s),
        },
        "recipes": {},
    }
    print(
        f"seed {seed}: SFT {sft_s:.0f} s; {len(hard_set)} of {len(pool)} pool problems never "
        f"solved in {args.samples} plain samples ({out['hard_set_of_hard_class']} hard-class); "
        f"start: held-out hard {100 * out['start']['held_hard']:.1f}% plain, "
        f"{100 * out['start']['held_hard_hint1']:.1f}% with the whole-answer hint; easy "
        f"{100 * out['start']['held_easy']:.1f}%",
        flush=True,
    )
    for name in args.recipe_list:
        t1 = time.perf_counter()
        cfg = recipe_config(name, model_dir, where / "runs" / name, args.steps, s)
        cfg.pop("data", None)
        cfg["rewards"] = REWARDS
        strategy = dict(cfg.get("rollout", {}).get("strategy", {}))
        if TEMPLATES.get(name):
            from grouprl.config import load_recipe

            strategy = {**load_recipe(name)["rollout"]["strategy"], **TEMPLATES[name]}
            cfg["rollout"]["strategy"] = strategy
        with Trainer(cfg, train_dataset=pool) as tr:
            res = tr.train()
            model = tr.model
            model.eval()
            r = {
                "hard_set_pass": pass_rate(model, tr.tokenizer, hard_set, args.samples, s),
                "held_hard": pass_rate(model, tr.tokenizer, held_hard, 4, s),
                "held_easy": pass_rate(model, tr.tokenizer, held_easy, 4, s),
            }
        h = res.history
        r["shown"] = {
            label: _mean([m.get(key, math.nan) for m in h]) for key, label in SHOWN.get(name, [])
        }
        r["zero_std"] = _mean([m.get("frac_reward_zero_std", math.nan) for m in h])
        r["seconds"] = time.perf_counter() - t1
        out["recipes"][name] = r
        shown = ", ".join(f"{k} {v:.2f}" for k, v in r["shown"].items())
        print(
            f"  {name}: hard set {100 * r['hard_set_pass']:.1f}%, held-out hard "
            f"{100 * r['held_hard']:.1f}%, easy {100 * r['held_easy']:.1f}%; all-equal groups "
            f"{r['zero_std']:.2f}; {shown}; {r['seconds']:.0f} s",
            flush=True,
        )
    return out


def _mean(values: list[float]) -> float:
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else math.nan


def table(results: list[dict[str, Any]], recipes: list[str]) -> str:
    lines = [
        "| seed | recipe | hard-set pass rate (plain) | held-out hard pass@1 | held-out easy "
        "pass@1 | all-equal groups | the method at work |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        st = res["start"]
        lines.append(
            f"| {res['seed']} | start ({res['hard_set']} of {res['pool']} never solved) | "
            f"{100 * st['hard_set_pass']:.1f}% | {100 * st['held_hard']:.1f}% (whole-answer hint: "
            f"{100 * st['held_hard_hint1']:.1f}%) | {100 * st['held_easy']:.1f}% | | |"
        )
        for name in recipes:
            r = res["recipes"][name]
            shown = ", ".join(f"{k} {v:.2f}" for k, v in r["shown"].items())
            lines.append(
                f"| {res['seed']} | `{name}` | {100 * r['hard_set_pass']:.1f}% | "
                f"{100 * r['held_hard']:.1f}% | {100 * r['held_easy']:.1f}% | "
                f"{r['zero_std']:.2f} | {shown} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/hint_effects.py", *map(shlex.quote, given)])
    load_before, commit, t0 = _load(), _git_commit(), time.perf_counter()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"grouprl-hints-{seed}-") as tmp:
            results.append(run(args, seed, Path(tmp)))
            if args.json:  # after every seed, so a long run keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=2))
    md = (
        f"Command: `{command}`  \nCommit {commit}; wall time "
        f"{(time.perf_counter() - t0) / 60:.1f} min; load average {load_before} before, "
        f"{_load()} after.\n\n" + table(results, args.recipe_list)
    )
    if args.out:
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
