"""grouprl: group-relative reinforcement learning for language models.

import grouprl
grouprl.train("run.yaml")                       # or
grouprl.Trainer(grouprl.load_config("run.yaml", ["train.max_steps=50"])).train()
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Config", "Trainer", "load_config", "train", "__version__"]

_LAZY = {
    "Trainer": ("grouprl.training.trainer", "Trainer"),
    "train": ("grouprl.training.trainer", "train"),
    "load_config": ("grouprl.components", "load_config"),
    "Config": ("grouprl.config", "Config"),
}


def __getattr__(name: str) -> Any:  # lazy, so `grouprl --help` does not import torch
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'grouprl' has no attribute {name!r}")
