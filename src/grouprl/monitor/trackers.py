"""Experiment trackers a run reports to besides metrics.jsonl (`train.report_to`): trackio
(local by default; `TRACKIO_DIR` sets where) and Weights & Biases (`WANDB_MODE=offline`
keeps it on disk). Each is imported only when named, with the install line when missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from grouprl.config import ConfigError
from grouprl.registry import Registry

TRACKERS: Registry[Any] = Registry("train.report_to")


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        value = value.item() if hasattr(value, "item") else value
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"train.report_to: {module} is not installed: pip install '{extra}' ({exc})"
        ) from None


@TRACKERS.register("trackio")
class TrackioTracker:
    """trackio: a run `name` in `project`, the config attached; numbers logged per step."""

    def __init__(self, *, project: str, name: str, run_dir: Path, config: dict[str, Any]):
        self._trackio = _require("trackio", "grouprl[trackio]")
        self._trackio.init(project=project, name=name, config=config, embed=False)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._trackio.log(_numeric(metrics), step=int(step))

    def close(self) -> None:
        self._trackio.finish()


@TRACKERS.register("wandb")
class WandbTracker:
    """Weights & Biases: a run `name` in `project`, files under the run folder."""

    def __init__(self, *, project: str, name: str, run_dir: Path, config: dict[str, Any]):
        wandb = _require("wandb", "grouprl[wandb]")
        self._run = wandb.init(project=project, name=name, config=config, dir=str(run_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(_numeric(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


def build_trackers(
    names: list[str], *, project: str, run_dir: Path, config: dict[str, Any]
) -> list[Any]:
    """The trackers of `train.report_to` (tensorboard is MetricsLogger's own)."""
    out = []
    for name in names:
        if name == "tensorboard":
            continue
        cls = TRACKERS.get(name)  # RegistryError with did-you-mean for a typo
        out.append(cls(project=project, name=run_dir.name, run_dir=run_dir, config=config))
    return out
