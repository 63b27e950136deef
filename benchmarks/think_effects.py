"""Thinking-shaping methods at tiny scale: do `serial_exit`, `anytime_budget` + `brpo` and
`ton` show the effect their papers claim, against plain GRPO from the same start?

    python benchmarks/think_effects.py [--seeds 0 1] [--steps 60] [--sft-steps 300]
        [--claims serial_exit,brpo,ton] [--out FILE.md] [--json FILE.json]

The task is written here: character-level 2-digit addition whose SFT completions think
verbosely before answering. The thinking adds the digits right to left with the carry
("7+5+0=12,4+8+1=13"), then restates the sum 0 to 3 times (";47+85=132", a redundant
check; the count is drawn per row), then the marker and the answer:

    prompt "47+85="   completion "7+5+0=12,4+8+1=13;47+85=132|132"

In a character vocabulary `</think>` is 8 tokens, so the strategies get the one-character
"|" as their `think_end`, `exit_text` and `summary_cue`, through `rollout.strategy.*`
overrides as a user would pass them. The reward (`answer_after_marker`, defined here and
loaded by its "file.py:function" path) is 1 when the text after the last marker equals the
sum; a text without a marker is read whole (the `anytime_budget` summaries: their cue is in
their prompt, so their text is the answer alone). The built-in `exact_match` with
`after: "|"` scores a text without the marker 0, which would fail every summary.

Per seed and start: an SFT start (the `grouprl demo` model: 3-layer 128-wide Qwen2,
`--sft-steps` steps of 64), then every run from a fresh copy of it, `--steps` steps of 16
prompts x 8 samples, lr 1e-4 (the demo's; it replaces the recipes' own, e.g. ton's 1e-6),
temperature 1, then measured on `--eval-problems` held-out problems x 2 samples at
temperature 1. Cost: `brpo` samples 4 x 8 summaries per prompt and trains 40 rows per
group, about 10x a `grpo` step: the default run (2 seeds) took 47 min on 2 shared cores
(load 2-6), 13-20 min of it per seed in `brpo`.

Tables:
1. `serial_exit` (S-GRPO, arXiv 2505.07686) vs the `grpo` recipe: mean thinking length
   (characters before "|") and held-out pass@1. Catalog's bar: thinking >= 30% shorter at
   equal accuracy.
2. `brpo` (recipe: `anytime_budget` strategy + `brpo` advantage, AnytimeReasoner, arXiv
   2505.13438) vs `grpo`: a completion is sampled, its thinking cut at 25/50/75/100% of
   the budget (`rollout.max_new_tokens`, as the strategy's budgets), "|" appended and the
   answer sampled; accuracy of that forced answer. Claim: brpo beats grpo at every budget.
3. `ton` (TON, arXiv 2505.16854), on its own problem set: half "easy" (2-digit + 1-digit,
   either order), half "hard" (2-digit + 2-digit), since TON's model learns to skip the
   thought where it is not needed. The SFT completions are "<think>...</think>132" and
   the `thought_dropout` transform (ratio 0.5, empty "<think></think>") empties half the
   thoughts; then the `ton` recipe (its rewards replaced by `answer_after_marker` with
   marker "</think>": its math_accuracy and <answer>-tag format reward do not fit a
   character model) and, as the control, `grpo` from the same start. Skip rate: the share
   of held-out completions whose thought is empty (`is_empty_thought`). Claim: it rises
   during RL at similar accuracy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from recipes import _git_commit, _load

from grouprl.components import load_config
from grouprl.config import ModelConfig
from grouprl.demo import DemoSettings
from grouprl.models.loading import load_model_and_tokenizer
from grouprl.models.tiny import build_char_tokenizer, build_tiny_model, save_model
from grouprl.rollout.base import SamplingParams
from grouprl.rollout.hf import HFEngine
from grouprl.training.setup import seed_everything
from grouprl.training.sft import sft
from grouprl.training.sft_transforms import is_empty_thought, row_uniform
from grouprl.training.trainer import Trainer

MARK = "|"  # think_end, exit_text and summary_cue of the plain format
OPEN, CLOSE = "<think>", "</think>"  # the tagged format (TON)
EMPTY = OPEN + CLOSE
CHARS = "0123456789+=,;|<>/think"
MAX_CHECKS = 3
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
SUMMARY_TOKENS = 8
REWARD_PATH = f"{Path(__file__).resolve()}:answer_after_marker"
CLAIMS = ("serial_exit", "brpo", "ton")
# the strategy settings of each method, as `grouprl train ... KEY=VALUE` overrides ("|"
# quoted: unquoted, YAML reads it as an empty block scalar)
OVERRIDES = {
    "serial_exit": [
        f'rollout.strategy.think_end="{MARK}"',
        f'rollout.strategy.exit_text="{MARK}"',
        f"rollout.strategy.answer_tokens={SUMMARY_TOKENS}",
    ],
    "brpo": [
        f'rollout.strategy.think_end="{MARK}"',
        f'rollout.strategy.summary_cue="{MARK}"',
        f"rollout.strategy.summary_tokens={SUMMARY_TOKENS}",
    ],
}


def answer_after_marker(
    prompts: list, completions: list, answer: list | None = None, *, marker: str = MARK, **kw: Any
) -> list[float | None]:
    """1.0 when the text after the last `marker` (all of it when there is none) is the gold
    answer, stripped; else 0.0. A None gold gives None."""
    golds = answer if answer is not None else [None] * len(completions)
    out: list[float | None] = []
    for c, gold in zip(completions, golds, strict=True):
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(None if gold is None else float(text.rsplit(marker, 1)[-1].strip() == gold))
    return out


# ---------------------------------------------------------------- the task


def working(a: int, b: int) -> str:
    """Digit by digit from the right, with the carry: 47+85 -> "7+5+0=12,4+8+1=13"."""
    xs, ys, carry, steps = str(a)[::-1], str(b)[::-1], 0, []
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        steps.append(f"{x}+{y}+{carry}={x + y + carry}")
        carry = (x + y + carry) // 10
    return ",".join(steps)


def thought(a: int, b: int, checks: int) -> str:
    return working(a, b) + f";{a}+{b}={a + b}" * checks


def make_rows(mixed: bool, split_seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), 20% held out. Plain: every pair of 2-digit operands.
    Mixed (TON): every 2-digit + 1-digit pair, either order ("easy", 1800), and as many
    2-digit pairs drawn from the rest ("hard")."""
    rng = random.Random(split_seed)

    def row(a: int, b: int, kind: str) -> dict:
        return {"prompt": f"{a}+{b}=", "answer": str(a + b), "a": a, "b": b, "kind": kind}

    rows = [row(a, b, "hard") for a in range(10, 100) for b in range(10, 100)]
    if mixed:
        easy = [row(a, b, "easy") for a in range(10, 100) for b in range(10)]
        easy += [row(b, a, "easy") for a in range(10, 100) for b in range(10)]
        rows = easy + rng.sample(rows, len(easy))
    rng.shuffle(rows)
    n_eval = len(rows) // 5
    return rows[n_eval:], rows[:n_eval]


def sft_pairs(rows: list[dict], seed: int, tagged: bool) -> tuple[list[str], list[str]]:
    """The verbose completions; row i restates the sum U{0..3} times (fixed by seed and i)."""
    prompts, comps = [], []
    for i, r in enumerate(rows):
        k = int(row_uniform("think_effects", seed, i) * (MAX_CHECKS + 1))
        t = thought(r["a"], r["b"], k)
        prompts.append(r["prompt"])
        comps.append(f"{OPEN}{t}{CLOSE}{r['answer']}" if tagged else f"{t}{MARK}{r['answer']}")
    return prompts, comps


def build_start(rows: list[dict], s: DemoSettings, where: Path, tagged: bool) -> tuple[Path, float]:
    """The SFT start (TON's with thought dropout), saved under `where`; (path, seconds)."""
    t0 = time.perf_counter()
    seed_everything(s.seed)
    tok = build_char_tokenizer(CHARS)
    model = build_tiny_model(tok, hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed)
    prompts, comps = sft_pairs(rows, s.seed, tagged)
    drop = {"name": "thought_dropout", "ratio": 0.5, "seed": s.seed, "empty": EMPTY}
    sft(
        model,
        tok,
        prompts,
        comps,
        steps=s.sft_steps,
        batch_size=s.sft_batch,
        learning_rate=s.sft_lr,
        seed=s.seed,
        output_dir=where / "sft",
        progress=False,
        transforms=[drop] if tagged else (),
    )
    return save_model(model, tok, where / "model"), time.perf_counter() - t0


# ---------------------------------------------------------------- training


def run_config(
    recipe: str, model_dir: Path, run_dir: Path, s: DemoSettings, steps: int, marker: str
) -> dict[str, Any]:
    """The recipe decides the method; only the budget, the sampling and the reward are set."""
    return {
        "recipe": recipe,
        "model": {"name_or_path": str(model_dir)},
        "rollout": {
            "num_generations": s.num_generations,
            "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens,
        },
        "rewards": [{"path": REWARD_PATH, "params": {"marker": marker}}],
        "train": {
            "output_dir": str(run_dir),
            "overwrite": True,
            "seed": s.seed,
            "max_steps": steps,
            "prompts_per_step": s.prompts_per_step,
            "micro_batch_size": s.prompts_per_step * s.num_generations,
            "learning_rate": s.grpo_lr,
            "max_grad_norm": s.grpo_max_grad_norm,
            "save_every": 0,
            "progress": False,
        },
    }


def _mean_of(history: list[dict], key: str, last: int = 10) -> float:
    vals = [float(h[key]) for h in history[-last:] if key in h and math.isfinite(float(h[key]))]
    return sum(vals) / len(vals) if vals else math.nan


# ---------------------------------------------------------------- measuring


def _share(flags: list[bool], where: list[bool]) -> float:
    picked = [f for f, w in zip(flags, where, strict=True) if w]
    return sum(picked) / len(picked) if picked else math.nan


@torch.no_grad()
def measure(
    model: Any, tok: Any, held: list[dict], s: DemoSettings, tagged: bool
) -> dict[str, Any]:
    """Held-out samples at the training temperature: accuracy and thinking length; tagged,
    the skip rate (overall, easy, hard); plain, the forced answer's accuracy with the
    thinking cut at each budget (a share of max_new_tokens) and "|" appended."""
    model.eval()
    engine = HFEngine(model, tok)
    mark_id = tok.convert_tokens_to_ids(MARK)
    M, n = s.max_new_tokens, s.eval_samples
    texts, golds, kinds, contexts, thinks = [], [], [], [], []
    for start in range(0, len(held), 64):
        chunk = held[start : start + 64]
        params = SamplingParams(n, s.temperature, max_new_tokens=M, seed=s.seed * 7919 + start)
        ro = engine.generate([r["prompt"] for r in chunk], params)
        texts += ro.completions
        golds += [r["answer"] for r in chunk for _ in range(n)]
        kinds += [r["kind"] for r in chunk for _ in range(n)]
        for i in range(ro.num_rollouts):
            ids = ro.completion_ids_NT[i][ro.attention_mask_NT[i].bool()].tolist()
            k = ids.index(mark_id) if mark_id in ids else len(ids)
            while k > 0 and ids[k - 1] == tok.eos_token_id:
                k -= 1
            contexts.append(ro.prompt_ids_NP[i][ro.prompt_mask_NP[i].bool()].tolist())
            thinks.append(ids[:k])
    ok = [bool(x) for x in answer_after_marker([], texts, golds, marker=CLOSE if tagged else MARK)]
    every = [True] * len(ok)
    out: dict[str, Any] = {"pass1": _share(ok, every), "samples": len(ok)}
    out["length"] = statistics.mean(len(t) for t in texts)
    if tagged:
        skip = [is_empty_thought(t) for t in texts]
        think = [not x for x in skip]
        easy = [k == "easy" for k in kinds]
        hard = [k == "hard" for k in kinds]
        out.update(
            skip_rate=_share(skip, every),
            skip_easy=_share(skip, easy),
            skip_hard=_share(skip, hard),
            pass1_easy=_share(ok, easy),
            pass1_hard=_share(ok, hard),
            pass1_skip=_share(ok, skip),
            pass1_think=_share(ok, think),
        )
        return out
    out["think_len"] = statistics.mean(len(t) for t in thinks)
    out["marker_frac"] = sum(MARK in t for t in texts) / len(texts)
    cue = tok(MARK, add_special_tokens=False)["input_ids"]
    params = SamplingParams(1, s.temperature, max_new_tokens=SUMMARY_TOKENS, seed=s.seed + 1)
    for f in FRACTIONS:
        b = max(1, round(f * M))
        ctx = [p + th[:b] + cue for p, th in zip(contexts, thinks, strict=True)]
        answers = []
        for start in range(0, len(ctx), 256):
            outs = engine.sample_token_ids(ctx[start : start + 256], params)
            answers += [tok.decode(ids, skip_special_tokens=True) for ids, _ in outs]
        got = answer_after_marker([], answers, golds, marker=MARK)
        out[f"forced@{f:g}"] = sum(got) / len(got)
        out[f"budget@{f:g}"] = b
    return out


# ---------------------------------------------------------------- the benchmark


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=60, help="training steps per run (60)")
    p.add_argument("--sft-steps", type=int, default=300, help="SFT steps of 64 rows (300)")
    p.add_argument("--eval-problems", type=int, default=300, help="held-out problems (300)")
    p.add_argument("--claims", default=",".join(CLAIMS), help="any of serial_exit,brpo,ton")
    p.add_argument("--out", default="", help="markdown file for the tables (default: print)")
    p.add_argument("--json", default="", help="also write the raw results here")
    args = p.parse_args(argv)
    args.claim_list = [c.strip() for c in args.claims.split(",") if c.strip()]
    bad = [c for c in args.claim_list if c not in CLAIMS]
    if bad or not args.claim_list:
        p.error(f"--claims: any of {','.join(CLAIMS)}, got {args.claims!r}")
    if min(args.steps, args.sft_steps, args.eval_problems) < 1:
        p.error("--steps, --sft-steps and --eval-problems must be >= 1")
    return args


def settings(args: argparse.Namespace, seed: int, tagged: bool) -> DemoSettings:
    """The demo's model and RL settings. max_new_tokens: the longest SFT completion (plain:
    47 thinking + "|" + 3 digits + EOS = 52; tagged: 66) and a little room; the anytime
    budgets are shares of it (plain: 14, 28, 42, 56 tokens)."""
    return DemoSettings(
        seed=seed,
        sft_steps=args.sft_steps,
        max_new_tokens=72 if tagged else 56,
        eval_samples=2,
        eval_problems=args.eval_problems,
    )


def run_arm(
    args: argparse.Namespace, seed: int, where: Path, tagged: bool, recipes: list[str]
) -> dict[str, Any]:
    """One SFT start, measured, then each recipe from a fresh copy of it, measured."""
    s = settings(args, seed, tagged)
    rows, held = make_rows(mixed=tagged)
    held = held[: args.eval_problems]
    model_dir, sft_s = build_start(rows, s, where / "start", tagged)
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    out: dict[str, Any] = {"start": {**measure(model, tok, held, s, tagged), "seconds": sft_s}}
    del model
    _report(seed, "start", out["start"])
    for recipe in recipes:
        t0 = time.perf_counter()
        overrides = OVERRIDES.get(recipe, [])
        marker = CLOSE if tagged else MARK
        cfg = run_config(recipe, model_dir, where / recipe, s, args.steps, marker)
        with Trainer(load_config(cfg, overrides), train_dataset=rows) as tr:
            res = tr.train()
            r = measure(tr.model, tr.tokenizer, held, s, tagged)
        h = res.history
        r.update(
            overrides=overrides,
            steps=res.steps,
            train_reward=_mean_of(h, "reward"),
            rollouts_per_step=_mean_of(h, "rollouts/sampled", last=len(h)),
            seconds=time.perf_counter() - t0,
        )
        out[recipe] = r
        _report(seed, recipe, r)
    return out


def _report(seed: int, what: str, r: dict[str, Any]) -> None:
    keys = ("pass1", "think_len", "skip_rate", *(f"forced@{f:g}" for f in FRACTIONS), "seconds")
    parts = [f"{k} {r[k]:.3g}" for k in keys if k in r]
    print(f"seed {seed} {what}: " + ", ".join(parts), flush=True)


# ---------------------------------------------------------------- tables


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _avg(results: list[dict], arm: str, run: str, key: str) -> float:
    vals = [r[arm][run][key] for r in results if run in r.get(arm, {})]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _rows(results: list[dict], arm: str, runs: list[str], cells) -> list[str]:
    """One line per (seed, run), then the mean over seeds; `cells(get)` gives the cells,
    `get(key)` a value of that run (the seed's, or the mean)."""
    lines = []
    for res in results:
        for run in runs:
            r = res[arm][run]
            lines.append(f"| {res['seed']} | `{run}` | " + " | ".join(cells(r.get)) + " |")
    if len(results) > 1:
        for run in runs:
            cells_ = cells(lambda k, run=run: _avg(results, arm, run, k))
            lines.append(f"| mean | `{run}` | " + " | ".join(cells_) + " |")
    return lines


def tables(results: list[dict], args: argparse.Namespace) -> str:
    out = []
    plain = ["start", "grpo", *[c for c in args.claim_list if c != "ton"]]
    if "serial_exit" in args.claim_list:

        def c1(get) -> list[str]:
            return [_pct(get("pass1")), f"{get('think_len'):.1f}", f"{get('length'):.1f}"]

        out += [
            "### 1. `serial_exit` (S-GRPO): thinking length at equal accuracy",
            "",
            'Mean thinking length: characters before the first "|" of held-out samples '
            "(the SFT data's thinking is 17 to 47 characters: the digit sums, then 0-3 "
            "restatements of the sum). Bar: >= 30% shorter than `grpo`, equal pass@1.",
            "",
            "| seed | run | held-out pass@1 % | mean thinking (chars) | mean completion (chars) |",
            "|---|---|---|---|---|",
            *_rows(results, "plain", [r for r in plain if r != "brpo"], c1),
        ]
        for res in [*results, None]:
            get = (
                (lambda run, k, res=res: res["plain"][run][k])
                if res
                else (lambda run, k: _avg(results, "plain", run, k))
            )
            cut = 1 - get("serial_exit", "think_len") / get("grpo", "think_len")
            dacc = 100 * (get("serial_exit", "pass1") - get("grpo", "pass1"))
            who = f"seed {res['seed']}" if res else "mean"
            out.append(
                f"\n{who}: `serial_exit` thinks {100 * cut:.0f}% less than `grpo`, pass@1 "
                f"{dacc:+.1f} points."
            )
        out.append("")
    if "brpo" in args.claim_list:
        budgets = [results[0]["plain"]["start"][f"budget@{f:g}"] for f in FRACTIONS]

        def c2(get) -> list[str]:
            cells = [_pct(get(f"forced@{f:g}")) for f in FRACTIONS]
            return [*cells, _pct(get("pass1")), f"{get('think_len'):.1f}"]

        head = " | ".join(
            f"@{int(100 * f)}% ({b} tok)" for f, b in zip(FRACTIONS, budgets, strict=True)
        )
        out += [
            "### 2. `brpo` (AnytimeReasoner): accuracy when the thinking is cut",
            "",
            "A held-out sample's thinking is cut at a share of the budget (max_new_tokens "
            f'{budgets[-1]}), "|" appended, the answer sampled (at most {SUMMARY_TOKENS} '
            "tokens); % correct. Claim: `brpo` > `grpo` at every budget.",
            "",
            f"| seed | run | {head} | held-out pass@1 % (own answer) | mean thinking |",
            "|---|---|" + "---|" * (len(FRACTIONS) + 2),
            *_rows(results, "plain", [r for r in plain if r != "serial_exit"], c2),
            "",
        ]
    if "ton" in args.claim_list:

        def c3(get) -> list[str]:
            return [
                _pct(get("skip_rate")),
                _pct(get("skip_easy")),
                _pct(get("skip_hard")),
                _pct(get("pass1")),
                _pct(get("pass1_easy")),
                _pct(get("pass1_hard")),
                _pct(get("pass1_skip")),
                _pct(get("pass1_think")),
                f"{get('length'):.1f}",
            ]

        out += [
            "### 3. `ton` (thought dropout + GRPO): skip rate",
            "",
            "Start: SFT with `thought_dropout` (ratio 0.5) on a mixed set (easy: 2-digit + "
            "1-digit; hard: 2-digit + 2-digit). Skip rate: held-out samples whose thought is "
            "empty. Claim: it rises during RL at similar accuracy (TON: more on easy "
            "prompts).",
            "",
            "| seed | run | skip % | skip % easy | skip % hard | pass@1 % | pass@1 % easy | "
            "pass@1 % hard | pass@1 % of skipped | pass@1 % of thought | mean length |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *_rows(results, "tagged", ["start", "grpo", "ton"], c3),
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    try:  # hide transformers' per-file load/save progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/think_effects.py", *map(shlex.quote, given)])
    load_before, commit, t0 = _load(), _git_commit(), time.perf_counter()
    plain = [c for c in args.claim_list if c != "ton"]
    results = []
    for seed in args.seeds:
        res: dict[str, Any] = {"seed": seed}
        with tempfile.TemporaryDirectory(prefix=f"grouprl-think-{seed}-") as tmp:
            if plain:
                res["plain"] = run_arm(args, seed, Path(tmp) / "plain", False, ["grpo", *plain])
            if "ton" in args.claim_list:
                res["tagged"] = run_arm(args, seed, Path(tmp) / "tagged", True, ["grpo", "ton"])
        results.append(res)
    s = settings(args, args.seeds[0], False)
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = (
        f"Command: `{command}`  \nDate: {when}; commit {commit}; seeds "
        f"{' '.join(map(str, args.seeds))}; wall time {(time.perf_counter() - t0) / 60:.1f} min; "
        f"load average {load_before} before, {_load()} after.  \n"
        f"Each seed: SFT start ({args.sft_steps} steps of {s.sft_batch}), then every run "
        f"{args.steps} steps of {s.prompts_per_step} prompts x {s.num_generations} samples, "
        f"lr {s.grpo_lr}, temperature {s.temperature}; held-out: {args.eval_problems} "
        f"problems x {s.eval_samples} samples at temperature {s.temperature}.\n\n"
        + tables(results, args)
    )
    if args.out:
        Path(args.out).write_text(md)
        print(f"wrote {args.out}")
    else:
        print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
