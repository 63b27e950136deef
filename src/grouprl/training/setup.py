"""Start-up pieces of a run: seeding, the training data, the rewards, the shared-prefix and
mismatch-correction decisions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from grouprl.components import MISMATCH_KEY, Components, build_mismatch, check_compatible
from grouprl.config import Config, ConfigError
from grouprl.data.datasets import PromptDataset, load_prompts
from grouprl.models.support import check_support
from grouprl.registry import RegistryError
from grouprl.rollout.base import RolloutEngine

log = logging.getLogger("grouprl")


def seed_everything(seed: int) -> None:
    """Python, numpy, torch (and CUDA) seeded by transformers' `set_seed`."""
    from transformers import set_seed

    set_seed(seed)


def task_of(cfg: Config) -> Any:
    """The built-in task named by `data.task`, built with `data.task_params`."""
    from grouprl.data.tasks import get_task

    try:
        return get_task(str(cfg.data.task), **cfg.data.task_params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.task: {exc}") from None


def _benchmark_rows(name: str, path: str | Path, params: dict[str, Any]) -> list[dict]:
    from grouprl.data.benchmarks import load_benchmark

    try:
        return load_benchmark(name, path, **params)
    except RegistryError as exc:
        raise ConfigError(f"data.benchmark: {exc}") from None


def load_dataset_from_config(
    cfg: Config,
    tokenizer: Any,
    split: str = "train",
    source: Any = None,
    completion_from_messages: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> PromptDataset:
    """The prompts of `split` (train: data.path or data.task; eval: data.eval_path or the
    task's held-out split), or of `source` (a path or a list of dicts) when given;
    `completion_from_messages`: see `load_prompts` (SFT on chat conversations)."""
    d = cfg.data
    if source is None:
        if d.task:
            source = task_of(cfg).rows(split)
        else:
            source = d.path if split == "train" else d.eval_path
    if source is None:
        key = "data.path" if split == "train" else "data.eval_path"
        raise ConfigError(
            f"{key}: no {split} data given (a file path, or data.task for a built-in task)"
        )
    if d.benchmark and isinstance(source, (str, Path)):
        source = _benchmark_rows(d.benchmark, source, d.benchmark_params)
    return load_prompts(
        source if isinstance(source, (str, Path)) else list(source),
        tokenizer=tokenizer,
        prompt_column=d.prompt_column,
        max_prompt_length=d.max_prompt_length,
        on_bad_row=d.on_bad_row,
        chat_template=d.chat_template,
        split=d.split,
        system_prompt=d.system_prompt,
        completion_from_messages=completion_from_messages,
        tools=tools,
    )


def resolve_rewards(cfg: Config, reward_funcs: Sequence[Any] | None) -> None:
    """Reward functions given to the API replace the config's; a built-in task without
    configured rewards brings its own."""
    if reward_funcs is not None:
        cfg.rewards = list(reward_funcs)
    elif not cfg.rewards and cfg.data.task:
        cfg.rewards = list(task_of(cfg).rewards)


def build_multi_turn(cfg: Config, tokenizer: Any) -> Any:
    """`data.environment` (or, when unset, the environment `data.task` is meant for) as the
    collector runs it (rollout/multiturn.py), or None."""
    spec = cfg.data.environment
    if spec is None and cfg.data.task:
        spec = task_of(cfg).environment
    if spec is None:
        return None
    return multi_turn_from_spec(
        spec,
        tokenizer,
        use_template=cfg.data.chat_template == "auto",
        max_turns=cfg.rollout.max_turns,
        max_total_tokens=cfg.rollout.max_total_tokens,
    )


def multi_turn_from_spec(
    spec: dict[str, Any] | str,
    tokenizer: Any,
    *,
    use_template: bool = True,
    max_turns: int,
    max_total_tokens: int = 0,
) -> Any:
    """An environment spec ({name, ...params}) as multi-turn sampling runs it: the training
    collector, `grouprl eval --environment` and the demo all build it here."""
    from grouprl.envs.base import build_environment
    from grouprl.rollout.multiturn import MultiTurn, ObservationRenderer

    factory = build_environment(spec)
    tools = [t.schema for t in getattr(factory(), "tools", [])]
    renderer = ObservationRenderer(tokenizer, use_template=use_template, tools=tools)
    return MultiTurn(factory, renderer, max_turns, max_total_tokens)


def environment_tools(multi_turn: Any) -> list[dict[str, Any]] | None:
    """The JSON schemas of the environment's tools, for the prompts' chat template."""
    return None if multi_turn is None else multi_turn.renderer.tools


def training_prompts(
    cfg: Config, tokenizer: Any, given: Any, tools: list[dict[str, Any]] | None = None
) -> PromptDataset:
    """The training prompts (`given` replaces the config's), with skipped rows reported;
    `tools` (an environment's tool schemas) go to the chat template."""
    if isinstance(given, PromptDataset):
        return given
    data = load_dataset_from_config(cfg, tokenizer, source=given, tools=tools)
    if data.skipped:
        log.warning(
            "%s: skipped %d bad rows (data.on_bad_row=skip); first: %s",
            data.source,
            data.skipped,
            "; ".join(data.skipped_reasons[:3]),
        )
    return data


def check_dataset_size(cfg: Config, size: int) -> None:
    """A step of more prompts than the dataset holds repeats prompts within the step: only
    when asked for (`data.allow_repeats`)."""
    B = cfg.train.prompts_per_step
    if B > size and not cfg.data.allow_repeats:
        raise ConfigError(
            f"train.prompts_per_step: {B} prompts per step, but the training data has {size} "
            "rows, so a step would hold some prompts twice; lower it, add data, or set "
            "data.allow_repeats=true"
        )


def decide_shared_prefix(model: torch.nn.Module, mode: str) -> bool:
    """`model.shared_prefix`: off; on (refuses a model that cannot, with the reason); auto
    (uses it when `check_support` accepts the model, else one warning and the repeated
    layout)."""
    if mode == "off":
        return False
    ok, reason = check_support(model)
    if ok:
        return True
    if mode == "on":
        raise ConfigError(f"model.shared_prefix=on: this model cannot use it: {reason}")
    log.warning(
        "shared prefix off (model.shared_prefix=auto): %s; using the repeated layout", reason
    )
    return False


def resolve_mismatch(cfg: Config, components: Components, engine: RolloutEngine) -> None:
    """`rollout.mismatch_correction: auto` becomes the engine's declared default; a
    correction needs an engine that reports its own sampling log-probs."""
    components.mismatch = build_mismatch(
        cfg.rollout.mismatch_correction, engine.default_mismatch_correction
    )
    if components.mismatch is not None and not engine.reports_sampling_logp:
        raise ConfigError(
            f"{MISMATCH_KEY}: {components.mismatch.name!r} weights need the sampler's own "
            f"log-probs, which rollout.engine {cfg.rollout.engine!r} does not report (it "
            "samples with the trainer's forward, so there is no mismatch): use none or auto"
        )
    check_compatible(components, cfg)
