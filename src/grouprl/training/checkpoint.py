"""Checkpoints: safetensors weights + tokenizer + optimizer + scheduler + RNG + data cursor.

A checkpoint is written into `<dir>.tmp` and renamed into place, so a kill mid-write
never leaves a half checkpoint that resume would pick up. The directory is also a
regular HF model directory (`from_pretrained` loads it). Nothing is unpickled on load:
tensors come from safetensors or `torch.load(weights_only=True)` (RNG states are stored as
tensors and numbers for that), the trainer state from JSON. A checkpoint with a missing or
damaged file is skipped for the previous complete one, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

STEP_PREFIX = "step_"
log = logging.getLogger("grouprl")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing or cannot be read; the message names it."""


def rng_state() -> dict[str, Any]:
    """torch / python / numpy (/ CUDA) RNG states as tensors and numbers only, so that
    `torch.load(weights_only=True)` reads them back without unpickling any object."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:07d}"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    keep: int = 2,
    rng: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rank_rngs: list[dict[str, Any]] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically. `state_dict` / `optimizer_state`: whole
    tensors gathered from sharded weights (default: the model's and optimizer's own);
    `rank_rngs`: the RNG states of processes 1.. of a multi-process run (`rng_rank{r}.pt`),
    so that a resume on as many processes samples exactly as the run would have; `extra`
    writes more into the folder before it becomes the checkpoint (in a subfolder: every
    *.safetensors directly in the folder is read as the model's weights)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # (save_pretrained drops tied names from the dict it is given: pass a copy)
    sd = dict(state_dict) if state_dict is not None else None
    model.save_pretrained(tmp, safe_serialization=True, state_dict=sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if optimizer_state is not None or optimizer is not None:
        opt = optimizer_state if optimizer_state is not None else optimizer.state_dict()  # type: ignore[union-attr]
        torch.save(opt, tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    for r, state in enumerate(rank_rngs or [], start=1):
        torch.save(state, tmp / f"rng_rank{r}.pt")
    if extra is not None:
        extra(tmp)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(final.parent, keep)
    return final


def _prune(parent: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and not p.name.endswith(".tmp")
    ]
    return sorted(done, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = [p for p in list_checkpoints(run_dir) if (p / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def load_weights(model: torch.nn.Module, path: str | Path, *, layout: Any = None) -> None:
    """Load every *.safetensors file in `path` into `model` (tied weights may be absent);
    `layout` (training/parallel.py) cuts them to a sharded model's shards."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = _load_weights_into(model, state, layout)
    tied = _tied_names(model)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def _load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], layout: Any) -> Any:
    """(missing, unexpected) keys of loading whole tensors: through the layout's loader
    (shards, LoRA adapters) when given, else plain load_state_dict."""
    if layout is not None:
        return layout.load_model_state(model, state)
    return model.load_state_dict(state, strict=False)


def _tied_names(model: torch.nn.Module) -> set[str]:
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
            tied.add(seen[id(p)])
        seen[id(p)] = name
    return tied


def _read_tensors(path: Path, device: torch.device | str = "cpu") -> Any:
    """torch.load that never unpickles code: a crafted file fails instead of running."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None


def read_checkpoint(
    path: str | Path,
    *,
    with_optimizer: bool,
    with_scheduler: bool,
    device: Any = "cpu",
    rank: int = 0,
) -> dict[str, Any]:
    """Every file of a checkpoint, read and checked before anything is applied, so a
    damaged checkpoint leaves the model untouched. Raises CheckpointError naming the file.
    `rank` > 0 also reads that process's RNG state (`rank_rng`) where the run saved one."""
    path = Path(path)
    out: dict[str, Any] = {"path": path}
    state_file = path / "trainer_state.json"
    try:
        out["trainer_state"] = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file}: missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file}: unreadable ({exc})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:
            raise CheckpointError(f"{f}: unreadable ({type(exc).__name__}: {exc})") from None
    out["weights"] = weights
    out["rng"] = _read_tensors(path / "rng.pt")
    if rank > 0 and (path / f"rng_rank{rank}.pt").is_file():
        out["rank_rng"] = _read_tensors(path / f"rng_rank{rank}.pt")
    if with_optimizer:
        out["optimizer"] = _read_tensors(path / "optimizer.pt", device)
    if with_scheduler:
        out["scheduler"] = _read_tensors(path / "scheduler.pt")
    return out


def apply_checkpoint(
    data: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    layout: Any = None,
) -> dict[str, Any]:
    """Load what `read_checkpoint` read into the model, optimizer, scheduler and RNGs;
    `layout` (training/parallel.py) cuts whole tensors to a sharded model's shards."""
    path = data["path"]
    missing, unexpected = _load_weights_into(model, data["weights"], layout)
    missing = [m for m in missing if m not in _tied_names(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    try:
        if optimizer is not None and layout is not None:
            layout.load_optimizer_state(optimizer, data["optimizer"])
        elif optimizer is not None:
            optimizer.load_state_dict(data["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(data["scheduler"])
        set_rng_state(data["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: optimizer, scheduler or RNG state does not fit: {exc}"
        ) from None
    return data["trainer_state"]


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; return the trainer state (step, cursor)."""
    device = next(model.parameters()).device
    data = read_checkpoint(
        path,
        with_optimizer=optimizer is not None,
        with_scheduler=scheduler is not None,
        device=device,
    )
    return apply_checkpoint(data, model=model, optimizer=optimizer, scheduler=scheduler)


def read_latest(
    run_dir: str | Path,
    *,
    with_optimizer: bool,
    with_scheduler: bool,
    device: Any = "cpu",
    rank: int = 0,
) -> dict[str, Any] | None:
    """The newest checkpoint whose files all read, newest first; one that does not is
    skipped with a warning naming the file. None when the run has no checkpoint; a
    CheckpointError naming every failure when none is usable."""
    ckpts = list_checkpoints(run_dir)
    failures = []
    for ckpt in reversed(ckpts):
        try:
            return read_checkpoint(
                ckpt,
                with_optimizer=with_optimizer,
                with_scheduler=with_scheduler,
                device=device,
                rank=rank,
            )
        except CheckpointError as exc:
            failures.append(str(exc))
            log.warning("checkpoint %s is not usable: %s; trying the previous one", ckpt.name, exc)
    if failures:
        raise CheckpointError(
            f"{run_dir}: no usable checkpoint to resume from: " + "; ".join(failures)
        )
    return None
