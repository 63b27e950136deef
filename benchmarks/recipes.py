"""Run every recipe from the same SFT start on the demo task and compare held-out accuracy.

    python benchmarks/recipes.py [--steps N] [--seed S] [--recipes a,b,...] [--out docs/methods.md]

What it does, with the `grouprl demo` settings (`grouprl.demo.DemoSettings` defaults):
  1. builds the demo's starting point ONCE: character tokenizer, 3-layer 128-wide Qwen2,
     600 SFT steps on the `arith` task (2-digit addition), saved to a temporary directory;
  2. evaluates it: held-out pass@1 on 400 problems x 4 samples at temperature 1.0;
  3. for each recipe, loads a fresh copy of that SFT model and trains it for the same
     budget through the config `{"recipe": NAME, ...}` (the recipe's own advantage, loss,
     regularizers, token mask, sample filters and extra rewards; only the rollout/train
     budget and the task's reward are set here), then evaluates it the same way.

Recipes that set their own `rewards` (ttrl, spine: label-free majority votes; crpo,
crpo_gdpo: clinical multiple-choice rewards) are left out unless named in --recipes.
Default budget: 200 steps per recipe; the whole run took 7.4 minutes on 2 shared CPU cores
with --threads 1 (the default).

The results go, as a markdown table with the command and date, between the markers
`<!-- recipes-table:start -->` and `<!-- recipes-table:end -->` of --out (the markers are
appended when absent). A recipe that raises is reported as failed with its one-line
error; the others still run. Timings depend on the machine's load: the load average is
printed before and after, and written with the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from grouprl.components import load_config
from grouprl.config import ModelConfig, load_recipe, recipe_info, recipe_names
from grouprl.data.datasets import load_prompts
from grouprl.data.tasks import get_task
from grouprl.demo import DemoSettings, held_out_eval, warm_start
from grouprl.models.loading import load_model_and_tokenizer
from grouprl.rewards import RewardSet
from grouprl.training.trainer import Trainer

START = "<!-- recipes-table:start -->"
END = "<!-- recipes-table:end -->"
LAST = 10  # steps averaged for the end-of-run training metrics

# Recipe-specific metrics worth a note (mean over the last LAST steps): (key, label).
NOTES: dict[str, list[tuple[str, str]]] = {
    "grpo": [("kl", "KL to ref")],
    "dapo": [
        ("dynamic_sampling/dropped_groups", "dropped groups/step"),
        ("dynamic_sampling/sampling_rounds", "sampling rounds/step"),
        ("rewards/overlong_penalty/mean", "overlong penalty"),
    ],
    "forking_tokens": [("forking_tokens/threshold", "entropy threshold")],
    "d3s": [
        ("d3s_tokens/keep_ratio", "token keep ratio"),
        ("d3s_samples/kept_frac", "kept samples"),
    ],
    "gtpo": [("gtpo/conflict_fraction", "conflict tokens"), ("gtpo/zeroed_frac", "zeroed (H>0.7)")],
    "disco": [("disco/valid_group_frac", "groups with both signs"), ("disco/kl", "KL(old‖new)")],
    "drpo": [("drpo/valid_group_frac", "groups with both signs"), ("drpo/kl", "KL(old‖new)")],
    "kl_cov": [("kl_cov/selected_frac", "penalized tokens")],
    "clip_cov": [
        ("clip_cov/selected_frac", "detached tokens"),
        ("clip_cov/candidate_frac", "candidates"),
    ],
    "llds": [("llds/penalized_mean", "penalized tokens")],
    "reg_grpo": [
        ("reg_grpo/mse", "regression MSE"),
        ("reg_grpo/log_ratio", "ρ (log-ratio to the sampler)"),
    ],
    "aepo": [("aepo/temperature", "extras' temperature"), ("aepo/kept_rows", "kept extras/step")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="training steps per recipe (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the SFT start and every run")
    p.add_argument(
        "--recipes",
        default="",
        help="comma-separated recipe names (default: all but those with their own rewards)",
    )
    p.add_argument("--out", default="docs/methods.md", help="markdown file to write the table into")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1; 0: torch's default). The model is tiny: on a "
        "shared machine 2 threads on 2 busy cores mostly wait for each other (an SFT step "
        "took 35x longer than with 1 thread at load 7), and on lightly loaded cores 1 thread "
        "ran about as fast as 2",
    )
    p.add_argument(
        "--train-prompts",
        type=int,
        default=0,
        help="train on the first N training problems only (default 0: all 6480, about half "
        "an epoch in 200 steps); a small N makes prompts come back, which is what the "
        "prompt samplers (vas, cures, vade, spo_priority, hard_mining) need",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override applied to every recipe run (repeatable), as on the command "
        "line of `grouprl train`: e.g. --set rollout.strategy.target=0.3",
    )
    p.add_argument("--json", default="", help="also write the raw results to this JSON file")
    p.add_argument("--keep-dir", default="", help="keep the SFT model and the run directories here")
    args = p.parse_args(argv)
    known = recipe_names()
    asked = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in asked if r not in known]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.train_prompts < 0:
        p.error("--train-prompts must be >= 0")
    # By default, recipes that bring their own rewards are left out: label-free test-time
    # RL (ttrl, spine: majority votes over 64 samples) and task-specific ones (crpo: clinical
    # multiple-choice rewards) measure something else than the arith reward.
    args.skipped = [] if asked else [r for r in known if own_rewards(r)]
    args.recipe_list = asked or [r for r in known if r not in args.skipped]
    return args


def own_rewards(name: str) -> bool:
    """A recipe whose YAML sets `rewards` (majority-vote TTRL, CRPO): its reward is the method."""
    return "rewards" in load_recipe(name)


def own_rewards_reason(name: str) -> str:
    specs = load_recipe(name).get("rewards") or []
    names = [s.get("name", "?") if isinstance(s, dict) else str(s) for s in specs]
    if "majority_vote" in names:
        return "label-free test-time RL, majority-vote reward"
    return "rewards " + ", ".join(names)


def heldout(model: Any, tok: Any, task: Any, s: DemoSettings) -> dict[str, float]:
    """Held-out accuracy exactly as `grouprl demo` measures it."""
    rewards = RewardSet.from_config(task.rewards)
    examples = load_prompts(task.eval_rows[: s.eval_problems], tokenizer=tok)
    model.eval()
    return held_out_eval(model, tok, task, s, examples, rewards)


def build_start(task: Any, s: DemoSettings, where: Path) -> tuple[Path, float]:
    """The demo's SFT warm start, saved to `where/sft/model`; returns (path, seconds)."""
    _, _, path, seconds = warm_start(task, s, where)
    return path, seconds


def recipe_config(name: str, model_dir: Path, run_dir: Path, steps: int, s: DemoSettings) -> dict:
    """The run's config: the recipe decides the method; only budget, task and reward are set.

    No `advantage`, `loss`, `regularizers`, `token_mask`, `sample_filters` or
    `extra_rewards` key here, so the recipe's own values stand. A recipe that sets its own
    `rewards` (ttrl, spine, crpo) also keeps them and its rollout sizes.
    """
    G = 1 if name == "single_stream" else s.num_generations
    rollout: dict[str, Any] = {"temperature": s.temperature, "max_new_tokens": s.max_new_tokens}
    cfg: dict[str, Any] = {
        "recipe": name,
        "model": {"name_or_path": str(model_dir)},
        "data": {"task": s.task},
        "rollout": rollout,
        "rewards": [{"name": "exact_match", "weight": 1.0}],
    }
    if own_rewards(name):  # keep the recipe's own rewards and rollout sizes (only with --recipes)
        del cfg["rewards"]
        G = int(load_recipe(name).get("rollout", {}).get("num_generations", G))
    else:
        rollout["num_generations"] = G
    cfg["train"] = {
        "output_dir": str(run_dir),
        "overwrite": True,  # a rerun replaces the earlier one (moved aside)
        "seed": s.seed,
        "max_steps": steps,
        "prompts_per_step": s.prompts_per_step,
        "micro_batch_size": s.prompts_per_step * G,
        "learning_rate": s.grpo_lr,
        "max_grad_norm": s.grpo_max_grad_norm,
        "save_every": 0,
        "progress": False,
    }
    return cfg


def _mean(history: list[dict[str, float]], key: str, last: int | None = LAST) -> float:
    rows = history[-last:] if last else history
    vals = [float(h[key]) for h in rows if key in h and math.isfinite(float(h[key]))]
    return sum(vals) / len(vals) if vals else math.nan


def run_recipe(
    name: str,
    model_dir: Path,
    task: Any,
    s: DemoSettings,
    steps: int,
    where: Path,
    train_prompts: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    out: dict[str, Any] = {"recipe": name, "confidence": recipe_info(name)["confidence"]}
    t0 = time.perf_counter()
    try:
        cfg = recipe_config(name, model_dir, where / "runs" / name, steps, s)
        rows = task.train_rows[:train_prompts] if train_prompts else None
        trainer = Trainer(load_config(cfg, list(overrides or [])), train_dataset=rows)
        res = trainer.train()
        train_s = time.perf_counter() - t0
        ev = heldout(trainer.model, trainer.tokenizer, task, s)
        start_model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
        kl = kl_to_start(trainer.model, start_model, trainer.tokenizer, task, s)
    except Exception as exc:  # report, never hide: one line, the run goes on
        msg = (str(exc).strip().splitlines() or [""])[0]
        out.update(status="failed", error=f"{type(exc).__name__}: {msg}"[:300])
        out["traceback"] = traceback.format_exc()
        out["seconds"] = time.perf_counter() - t0
        return out
    h = res.history
    out.update(
        status="ok",
        steps=res.steps,
        pass1=ev["pass@1"],
        pass1_lo=ev["pass@1_ci_low"],
        pass1_hi=ev["pass@1_ci_high"],
        maj=ev.get(f"maj@{s.eval_samples}", math.nan),
        reward=_mean(h, "reward"),
        length=_mean(h, "completions/mean_length"),
        entropy=_mean(h, "entropy"),
        zero_std=_mean(h, "frac_reward_zero_std"),
        kept=_mean(h, "selection/kept_token_frac"),
        abs_adv=_mean(h, "advantage/abs_mean"),
        kl_start=kl,
        step_s=_mean(h, "time/step", last=None),
        rollouts=_mean(h, "rollouts/sampled", last=None),
        train_s=train_s,
        seconds=time.perf_counter() - t0,
        notes={label: _mean(h, key) for key, label in NOTES.get(name, [])},
    )
    return out


@torch.no_grad()
def kl_to_start(
    model: Any, start: Any, tok: Any, task: Any, s: DemoSettings, n: int = 200
) -> float:
    """KL(π‖π_start) per completion, estimated on held-out prompts: the mean over samples of
    π of Σ_t log π(o_t) − log π_start(o_t) (4 samples per prompt, the training temperature,
    the log-probs at that temperature as the trainer computes them)."""
    from grouprl.models.forward import completion_logprobs
    from grouprl.rollout.base import SamplingParams
    from grouprl.rollout.hf import HFEngine

    prompts = [r["prompt"] for r in task.eval_rows[:n]]
    params = SamplingParams(
        num_generations=4, temperature=s.temperature, max_new_tokens=s.max_new_tokens, seed=s.seed
    )
    was = model.training
    model.eval()
    ro = HFEngine(model, tok).generate(prompts, params)
    args = (ro.prompt_ids_NP, ro.prompt_mask_NP, ro.completion_ids_NT, ro.attention_mask_NT)
    lp, _ = completion_logprobs(model, *args, temperature=s.temperature)
    lp0, _ = completion_logprobs(start, *args, temperature=s.temperature)
    model.train(was)
    return float(((lp - lp0) * ro.attention_mask_NT).sum(1).mean())


def _num(x: float, fmt: str = "{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _pct(x: float) -> str:
    return _num(100 * x, "{:.1f}") if x is not None and not math.isnan(x) else "–"


def render(results: list[dict], start: dict, meta: dict) -> str:
    subset = (
        f"Training prompts: the first {meta['train_prompts']} of the task's training problems "
        "(prompts come back every few steps). "
        if meta.get("train_prompts")
        else ""
    )
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; commit {meta['commit']}; wall time {meta['wall_s'] / 60:.1f} min; {meta['machine']}; "
        f"load average {meta['load_before']} before, {meta['load_after']} after "
        "(timings depend on the load: other jobs shared these cores).",
        "",
        f"Start: the demo's SFT model (seed {meta['seed']}, {meta['sft_steps']} SFT steps, "
        f"{meta['sft_s']:.0f} s), held-out pass@1 **{_pct(start['pass@1'])}%** "
        f"(95% CI {_pct(start['pass@1_ci_low'])}–{_pct(start['pass@1_ci_high'])}), "
        f"maj@{meta['eval_samples']} {_pct(start.get('maj@' + str(meta['eval_samples']), math.nan))}%. "
        f"{subset}Every recipe then ran {meta['steps']} steps of {meta['prompts']} prompts × "
        f"{meta['G']} samples (1 for single_stream), lr {meta['lr']}, max_grad_norm "
        f"{meta['max_grad_norm']}, temperature {meta['temperature']}, max_new_tokens "
        f"{meta['max_new_tokens']}, num_iterations 1, reward exact_match (plus the recipe's own "
        f"extra rewards), seed {meta['seed']}. Held-out pass@1: {meta['eval_problems']} unseen "
        f"problems × {meta['eval_samples']} samples at temperature {meta['temperature']}, as "
        "`grouprl demo` measures it. Training columns are means over the last "
        f"{LAST} steps; `s/step` is the mean `time/step` over all steps. `KL to start`: "
        "KL(π‖π_start) per completion after training, Σ_t log π − log π_start averaged over "
        "4 samples of π on each of 200 held-out prompts.",
        "",
    ]
    if meta["skipped"]:
        lines += [
            "Not in this table (recipes that bring their own rewards, i.e. another task or "
            "protocol): "
            + "; ".join(f"`{r}` ({own_rewards_reason(r)})" for r in meta["skipped"])
            + f". Run them with `--recipes {','.join(meta['skipped'])}` (they keep their "
            "rewards and rollout sizes).",
            "",
        ]
    lines += [
        "| recipe | confidence | held-out pass@1 % (95% CI) | Δ vs SFT (points) | "
        "train reward | mean length | entropy | zero-std groups | mean \\|A\\| | kept tokens | s/step | "
        "KL to start | recipe-specific |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(
                f"| `{r['recipe']}` | {r['confidence']} | **failed** | – | – | – | – | – | – | – | – | – | "
                f"`{r['error'].replace('|', '/')}` |"
            )
            continue
        delta = 100 * (r["pass1"] - start["pass@1"])
        notes = "; ".join(f"{k} {_num(v, '{:.3g}')}" for k, v in r["notes"].items()) or ""
        budget = meta["prompts"] * meta["G"]
        spent = r.get("rollouts", math.nan)
        if not math.isnan(spent) and r["recipe"] != "single_stream" and round(spent) != budget:
            # a method that samples more (or less) than B·G per step says so
            notes = "; ".join(x for x in (notes, f"rollouts/step {spent:.0f} (B·G {budget})") if x)
        lines.append(
            f"| `{r['recipe']}` | {r['confidence']} | {_pct(r['pass1'])} "
            f"({_pct(r['pass1_lo'])}–{_pct(r['pass1_hi'])}) | {delta:+.1f} | "
            f"{_num(r['reward'])} | {_num(r['length'])} | {_num(r['entropy'], '{:.3f}')} | "
            f"{_num(r['zero_std']) if r['recipe'] != 'single_stream' else 'n/a (G=1)'} | "
            f"{_num(r['abs_adv'])} | {_num(r['kept'])} | {_num(r['step_s'])} | "
            f"{_num(r.get('kl_start', math.nan), '{:.3f}')} | {notes} |"
        )
    return "\n".join(lines)


def write_between_markers(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else ""
    new = f"{START}\n{block}\n{END}"
    if START in text and END in text:
        pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
        text = pattern.sub(lambda _: new, text, count=1)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + new + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _git_commit() -> str:
    """Short commit of the checkout (+ "-dirty" with local changes); numbers move with it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "src"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (sha or "unknown") + ("-dirty" if dirty else "")


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # hide transformers' per-file load/save progress bars, as the CLI does
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    s = DemoSettings(seed=args.seed)
    task = get_task(s.task)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/recipes.py", *map(shlex.quote, given)])
    t_start = time.perf_counter()
    load_before = _load()
    commit = _git_commit()  # of the code that runs (recorded before other work can move it)
    print(
        f"load average {load_before}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    where = (
        Path(args.keep_dir) if args.keep_dir else Path(tempfile.mkdtemp(prefix="grouprl-recipes-"))
    )
    where.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    try:
        model_dir, sft_s = build_start(task, s, where)
        model, tok, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)))
        start = heldout(model, tok, task, s)
        del model
        print(
            f"SFT start: {s.sft_steps} steps in {sft_s:.0f} s, held-out pass@1 {_pct(start['pass@1'])}%",
            flush=True,
        )
        for i, name in enumerate(args.recipe_list, 1):
            r = run_recipe(
                name, model_dir, task, s, args.steps, where, args.train_prompts, args.set
            )
            results.append(r)
            if r["status"] == "ok":
                print(
                    f"[{i}/{len(args.recipe_list)}] {name}: pass@1 {_pct(r['pass1'])}% "
                    f"({100 * (r['pass1'] - start['pass@1']):+.1f}), reward {r['reward']:.2f}, "
                    f"len {r['length']:.2f}, entropy {r['entropy']:.3f}, {r['step_s']:.2f} s/step, "
                    f"{r['seconds']:.0f} s",
                    flush=True,
                )
            else:
                print(f"[{i}/{len(args.recipe_list)}] {name}: FAILED {r['error']}", flush=True)
                print(r["traceback"], file=sys.stderr, flush=True)
            if not args.keep_dir:
                shutil.rmtree(where / "runs" / name, ignore_errors=True)
    finally:
        if not args.keep_dir:
            shutil.rmtree(where, ignore_errors=True)
    wall = time.perf_counter() - t_start
    meta = {
        "command": command,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "commit": commit,
        "wall_s": wall,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "load_before": load_before,
        "load_after": _load(),
        "seed": s.seed,
        "sft_steps": s.sft_steps,
        "sft_s": sft_s,
        "steps": args.steps,
        "prompts": s.prompts_per_step,
        "G": s.num_generations,
        "lr": s.grpo_lr,
        "max_grad_norm": s.grpo_max_grad_norm,
        "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "eval_problems": s.eval_problems,
        "eval_samples": s.eval_samples,
        "skipped": args.skipped,
        "train_prompts": args.train_prompts,
    }
    block = render(results, start, meta)
    write_between_markers(Path(args.out), block)
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "traceback"} for r in results]
        Path(args.json).write_text(
            json.dumps({"meta": meta, "start": start, "results": slim}, indent=1)
        )
    failed = [r["recipe"] for r in results if r["status"] != "ok"]
    print(
        f"wrote the table to {args.out}; wall time {wall / 60:.1f} min; failed: {', '.join(failed) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
