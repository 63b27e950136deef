"""Resuming: what the checkpoint restores, and what a changed config may change.

A checkpoint keeps the config it was trained with. On resume every difference with the new
config is reported; the ones that keep the run meaningful are applied (learning rate and
schedule, batch sizes, sampling, rewards, cadences), the ones that would make it a
different run are refused with their key (the model, the data, the seed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from grouprl.components import Components
from grouprl.config import Config, ConfigError, TrainConfig
from grouprl.monitor.collapse import CollapseMonitor
from grouprl.training.checkpoint import apply_checkpoint, load_weights, read_latest
from grouprl.training.collect import Collector
from grouprl.training.learner import Learner
from grouprl.training.optim import lr_factor

log = logging.getLogger("grouprl")

# changing these would resume a different run: refused
REFUSED = (
    "model.name_or_path",
    "model.tokenizer",
    "data.path",
    "data.task",
    "data.task_params",
    "data.benchmark",
    "data.benchmark_params",
    "data.split",
    "data.prompt_column",
    "data.shuffle",
    "train.seed",
)
# re-applied to the optimizer and schedule after their state is restored
OPTIMIZER_KEYS = (
    "train.learning_rate",
    "train.weight_decay",
    "train.adam_betas",
    "train.lr_schedule",
    "train.lr_schedule_kwargs",
    "train.warmup_steps",
    "train.max_steps",
    "train.num_iterations",
)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0} (lists and leaves kept whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("task_params", "benchmark_params"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (value in the checkpoint, value now), for every key that differs."""
    a, b = flatten(saved), flatten(now)
    skip = ("train.resume", "train.overwrite")
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if k not in skip and a.get(k) != b.get(k)
    }


def _refused(key: str) -> bool:
    """A key whose change would make the resume another run: REFUSED, and the LoRA
    adapters' shape (every model.lora key but dropout)."""
    lora = key == "model.lora" or key.startswith("model.lora.")
    return key in REFUSED or (lora and key != "model.lora.dropout")


def refuse_changes(changes: dict[str, tuple[Any, Any]], ckpt: Any) -> None:
    bad = {k: v for k, v in changes.items() if _refused(k)}
    if bad:
        lines = "; ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in bad.items()
        )
        raise ConfigError(
            f"{next(iter(bad))}: train.resume=true continues {ckpt}, trained with other values "
            f"({lines}). Restore them, or start a new run (train.overwrite=true or another "
            "train.output_dir)"
        )


def apply_optimizer_config(
    optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig, total_updates: int
) -> None:
    """After the optimizer and schedule state are restored, put this config's learning rate,
    betas, weight decay and schedule back on them (the restored step count is kept)."""
    step = int(scheduler.last_epoch)
    factor = lr_factor(
        step,
        schedule=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_updates,
        kwargs=cfg.lr_schedule_kwargs,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = cfg.learning_rate * factor
        group["weight_decay"] = cfg.weight_decay
        group["betas"] = tuple(cfg.adam_betas)
    scheduler.base_lrs = [cfg.learning_rate for _ in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def resume_run(
    run_dir: Path,
    cfg: Config,
    plain_cfg: dict[str, Any],
    *,
    learner: Learner,
    collector: Collector,
    components: Components,
    monitor: CollapseMonitor | None,
    device: Any,
) -> int:
    """Restore the newest usable checkpoint of `run_dir` (a damaged one is skipped for the
    previous, with a warning naming the file) into the run's parts; report what was
    restored and the config changes since, applied or refused. Returns the step."""
    rank, world = learner.dist.rank, learner.dist.world
    data = read_latest(run_dir, with_optimizer=True, with_scheduler=True, device=device, rank=rank)
    if data is None:
        log.warning("train.resume=true but no checkpoint in %s: starting from step 0", run_dir)
        return 0
    saved = data["trainer_state"].get("config")
    changes = config_changes(saved, plain_cfg) if saved else {}
    refuse_changes(changes, data["path"])
    saved_world = int(data["trainer_state"].get("world_size", 1))
    if "rank_rng" in data and saved_world == world:
        data["rng"] = data["rank_rng"]  # this process's own sampling stream
    elif saved_world != world and rank == 0:
        log.warning(
            "resuming a run saved by %d process(es) on %d: the global batch is the same, "
            "but each process's sampling RNG restarts from process 0's state, so sampled "
            "completions differ from an uninterrupted run",
            saved_world,
            world,
        )
    opt, sched = learner.optimizer, learner.scheduler
    state = apply_checkpoint(
        data, model=learner.model, optimizer=opt, scheduler=sched, layout=learner.strategy
    )
    if any(k in OPTIMIZER_KEYS for k in changes):
        apply_optimizer_config(
            opt, sched, cfg.train, cfg.train.max_steps * cfg.train.num_iterations
        )
    restored = ["weights", "optimizer", f"schedule (update {sched.last_epoch})", "RNG"]
    if learner.ref_model is not None and (run_dir / "reference").is_dir():
        load_weights(learner.ref_model, run_dir / "reference", layout=learner.strategy)
        restored.append("reference policy")
    try:
        collector.load_state_dict(state["data_cursor"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"data: cannot continue the checkpoint's data cursor: {exc}") from None
    cursor = state["data_cursor"]
    restored.append(f"data cursor (epoch {cursor['epoch']}, position {cursor['pos']})")
    if monitor is not None and state.get("collapse_monitor"):
        monitor.load_state_dict(state["collapse_monitor"])
        restored.append("collapse monitor")
    stateful = components.stateful()
    for key, comp_state in state.get("components", {}).items():
        if key in stateful:
            stateful[key].load_state_dict(comp_state)
            restored.append(key)
    step = int(state["step"])
    log.info("resumed from %s at step %d; restored: %s", data["path"], step, ", ".join(restored))
    if changes:
        log.warning("config changed since that checkpoint, applied: %s", describe(changes))
    return step
