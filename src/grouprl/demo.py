"""`grouprl demo`: SFT a tiny model on a built-in task, then GRPO it, offline on a CPU.

Builds a character tokenizer and a 3-layer Qwen2 locally, warms it up with a short SFT,
measures held-out accuracy (sampled at the training temperature), runs GRPO, measures
again, and writes a run directory with metrics, a PNG of the curves and a summary.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grouprl.config import ConfigError
from grouprl.data.datasets import load_prompts
from grouprl.data.tasks import get_task
from grouprl.eval.run import evaluate
from grouprl.models.tiny import build_tiny_model, save_model
from grouprl.monitor.report import plot_curves, write_model_card, write_summary
from grouprl.rewards import RewardSet
from grouprl.training.rundir import holds_a_run
from grouprl.training.setup import multi_turn_from_spec, seed_everything
from grouprl.training.sft import sft
from grouprl.training.trainer import Trainer


@dataclass
class DemoSettings:
    task: str = "arith"
    seed: int = 0
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 1e-3
    grpo_steps: int = 300
    prompts_per_step: int = 16
    num_generations: int = 8
    grpo_lr: float = 1e-4
    grpo_max_grad_norm: float = 10.0
    temperature: float = 1.0
    max_new_tokens: int = 6
    eval_problems: int = 400
    eval_samples: int = 4
    eval_every: int = 50  # held-out accuracy during GRPO, for the curve
    hidden_size: int = 128
    num_layers: int = 3
    recipe: str | None = None  # None: plain GRPO on the task's rewards
    extra: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False  # an earlier run in the output folder is moved aside, not refused
    engine: str = "hf"  # rollout engine of the GRPO stage (hf or vllm); held-out eval uses hf
    max_turns: int = 2  # model turns per trajectory, for a task with an environment (tools)

    @staticmethod
    def for_task(task: str, **overrides: Any) -> DemoSettings:
        """The settings tuned for `task` (TASK_DEFAULTS), then `overrides`."""
        return DemoSettings(task=task, **{**TASK_DEFAULTS.get(task, {}), **overrides})


# Per-task demo settings. clinical: word-level traces of ~60-100 tokens, so fewer, longer
# samples, and CRPO (accuracy + format + faithfulness + comprehensiveness) for the RL stage.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "clinical": {
        "sft_steps": 1000,
        "sft_batch": 32,
        "grpo_steps": 200,
        "prompts_per_step": 8,
        "num_generations": 8,
        "grpo_lr": 1e-4,
        "max_new_tokens": 110,
        "eval_problems": 200,
        "eval_samples": 2,
        "eval_every": 50,
        "recipe": "crpo",
    },
    # tools: a turn is a ~80-character tool call, then the answer after the tool's response;
    # the RL stage is GRPO on OTC's tool_efficiency (correct answers with the fewest calls)
    "tools": {
        "sft_steps": 600,
        "grpo_steps": 120,
        "prompts_per_step": 8,
        "num_generations": 8,
        "grpo_lr": 1e-4,
        "max_new_tokens": 90,
        "eval_problems": 100,
        "eval_samples": 2,
        "eval_every": 0,
    },
}


def multi_turn_of(task: Any, tok: Any, s: DemoSettings) -> Any:
    """The task's environment as evaluation samples it (None for a single-turn task)."""
    if task.environment is None:
        return None
    return multi_turn_from_spec(task.environment, tok, max_turns=s.max_turns)


def warm_start(task: Any, s: DemoSettings, out: Path, *, progress: bool = False):
    """The demo's starting point: a tiny char-level Qwen2 SFT'd on the task's train split.

    Returns (model, tokenizer, path of the saved model, seconds). Benchmarks reuse it so
    that every comparison starts where `grouprl demo` starts.
    """
    t0 = time.perf_counter()
    seed_everything(s.seed)
    tok = task.build_tokenizer()
    model = build_tiny_model(tok, hidden_size=s.hidden_size, num_layers=s.num_layers, seed=s.seed)
    prompts, completions = task.sft_data(s.seed)
    sft(
        model,
        tok,
        prompts,
        completions,
        steps=s.sft_steps,
        batch_size=s.sft_batch,
        learning_rate=s.sft_lr,
        seed=s.seed,
        output_dir=out / "sft",
        progress=progress,
    )
    path = save_model(model, tok, out / "sft" / "model")
    return model, tok, path, time.perf_counter() - t0


def held_out_eval(
    model: Any, tok: Any, task: Any, s: DemoSettings, examples: list, rewards: RewardSet
) -> dict[str, float]:
    """`evaluate` as the demo measures: s.eval_samples samples per problem at the
    training temperature, pass@1 and pass/maj@s.eval_samples, the task's correct reward."""
    return evaluate(
        model,
        tok,
        examples,
        rewards,
        correct_reward=task.correct_reward,
        n=s.eval_samples,
        ks=(1, s.eval_samples),
        temperature=s.temperature,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed,
        multi_turn=multi_turn_of(task, tok, s),
    )


def rl_config(
    task: Any, s: DemoSettings, model_path: Path, output_dir: Path, *, progress: bool = False
) -> dict[str, Any]:
    """The demo's RL-stage config: `s.recipe` (or plain GRPO on the task's rewards) from
    `model_path`, with the demo's rollout and training settings. Benchmarks start from it."""
    return {
        "model": {"name_or_path": str(model_path)},
        **({"data": {"environment": task.environment}} if task.environment else {}),
        "rollout": {
            "engine": s.engine,
            "num_generations": s.num_generations,
            "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens,
            "max_turns": s.max_turns,
        },
        **(
            {"recipe": s.recipe}
            if s.recipe
            else {
                "rewards": task.rewards,
                "advantage": {"name": "grpo", "scale": "group"},
                "loss": {
                    "name": "ppo_clip",
                    "eps_low": 0.2,
                    "eps_high": 0.2,
                    "aggregation": "token_mean",
                },
                "regularizers": [],
            }
        ),
        "train": {
            "output_dir": str(output_dir),
            "seed": s.seed,
            "max_steps": s.grpo_steps,
            "prompts_per_step": s.prompts_per_step,
            "micro_batch_size": s.prompts_per_step * s.num_generations,
            "learning_rate": s.grpo_lr,
            "max_grad_norm": s.grpo_max_grad_norm,
            "save_every": 0,
            "progress": progress,
            "overwrite": s.overwrite,
            **s.extra,
        },
    }


def run_demo(
    output_dir: str | Path, settings: DemoSettings | None = None, *, progress: bool = True
) -> dict[str, Any]:
    s = settings or DemoSettings()
    out = Path(output_dir)
    if not s.overwrite and holds_a_run(out / "grpo"):  # fail now, not after the SFT stage
        raise ConfigError(
            f"{out} already holds a demo run; pass --overwrite (the old GRPO run is moved to "
            f"{out / 'grpo'}.old-<time>) or choose another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    task = get_task(s.task)
    # 1. supervised warm start on the training split
    model, tok, sft_path, sft_time = warm_start(task, s, out, progress=progress)
    train_rows = task.train_rows
    rewards = RewardSet.from_config(task.eval_rewards or task.rewards)
    held_out = load_prompts(task.eval_rows[: s.eval_problems], tokenizer=tok)

    def held_out_accuracy() -> dict[str, float]:
        return held_out_eval(model, tok, task, s, held_out, rewards)

    before = held_out_accuracy()

    # 2. GRPO from the SFT policy
    cfg = rl_config(task, s, sft_path, out / "grpo", progress=progress)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, model=model, tokenizer=tok, train_dataset=train_rows)
    curve = [(0, before["pass@1"])]

    def periodic_eval(step: int, metrics: dict[str, float]) -> None:
        if s.eval_every and step % s.eval_every == 0 and step < s.grpo_steps:
            curve.append((step, held_out_accuracy()["pass@1"]))  # forked RNG: training unaffected

    trainer.callbacks.append(periodic_eval)
    result = trainer.train()
    grpo_time = time.perf_counter() - t0
    after = held_out_accuracy()
    curve.append((result.steps, after["pass@1"]))
    save_model(model, tok, out / "final_model")

    gain = after["pass@1"] - before["pass@1"]
    summary = {
        "task": s.task,
        "seed": s.seed,
        "sft_steps": s.sft_steps,
        "grpo_steps": s.grpo_steps,
        "heldout_pass@1_after_sft": before["pass@1"],
        "heldout_pass@1_after_grpo": after["pass@1"],
        "gain_points": 100 * gain,
        f"heldout_maj@{s.eval_samples}_after_sft": before.get(
            f"maj@{s.eval_samples}", float("nan")
        ),
        f"heldout_maj@{s.eval_samples}_after_grpo": after.get(
            f"maj@{s.eval_samples}", float("nan")
        ),
        **{
            f"heldout_{name}_{when}": res.get(f"rewards/{name}/mean", float("nan"))
            for name in rewards.names
            for when, res in (("after_sft", before), ("after_grpo", after))
            if name != task.correct_reward
        },
        **{
            f"heldout_tool_calls_per_correct_{when}": res["tools/calls_per_correct"]
            for when, res in (("after_sft", before), ("after_grpo", after))
            if "tools/calls_per_correct" in res
        },
        "sft_seconds": sft_time,
        "grpo_seconds": grpo_time,
        "total_seconds": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(
        json.dumps(
            {"summary": summary, "heldout_pass@1_curve": curve, "before": before, "after": after},
            indent=1,
        )
    )
    write_model_card(  # README.md of final_model: how it was trained, and its results
        out / "final_model",
        trainer.cfg.to_dict(),
        {
            "step": result.steps,
            **(result.history[-1] if result.history else {}),
            **{f"eval/{k}": v for k, v in after.items()},
        },
        f"grouprl demo --task {s.task} --seed {s.seed}",
    )
    plot_curves(
        result.history,
        out / "curves.png",
        keys=("reward", "completions/mean_length", "entropy"),
        title=f"grouprl demo: {s.task}, seed {s.seed}",
        extra_points={"heldout pass@1": curve},
    )
    write_summary(
        out / "summary.md",
        f"grouprl demo ({s.task}, seed {s.seed})",
        {
            "What ran": (
                f"A {s.num_layers}-layer, {s.hidden_size}-wide Qwen2 with a "
                f"{'word-level' if task.tokenizer_factory else 'character'} tokenizer, built locally; "
                f"{s.sft_steps} SFT steps, then {s.grpo_steps} {s.recipe or 'GRPO'} steps of {s.prompts_per_step} prompts x "
                f"{s.num_generations} samples. Held-out accuracy is pass@1 over {len(held_out)} unseen problems, "
                f"{s.eval_samples} samples each at temperature {s.temperature}."
            ),
            "Results": summary,
            "Held-out pass@1 during GRPO": [{"step": st, "pass@1": acc} for st, acc in curve],
            "Files": "metrics: grpo/metrics.jsonl, sft/metrics.jsonl; curves: curves.png; models: sft/model, final_model",
        },
    )
    return summary
