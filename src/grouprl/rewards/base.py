"""Reward protocol, loading of reward functions, and `RewardSet`, which runs them safely.

A reward function has TRL's signature, so a TRL user's reward file works unchanged:

    f(prompts, completions, **columns) -> list[float | None]

`prompts` and `completions` have length N and every dataset column is passed as a list
of length N. A completion is a string, or (for conversational prompts) a list holding
one ``{"role": "assistant", "content": ...}`` message, as in TRL. `None` means "cannot
score": the sample becomes NaN and is left out of the advantage.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from grouprl.registry import Registry, RegistryError, did_you_mean, keyword_params

RewardFn = Callable[..., list[float | None]]
REWARDS: Registry[RewardFn] = Registry("reward")
logger = logging.getLogger("grouprl.rewards")


def completion_text(c: Any) -> str:
    """The text of one completion: a string, or the assistant contents of a message list.

    TRL passes conversational completions as ``[{"role": "assistant", "content": ...}]``;
    several assistant messages are joined with newlines, other roles (tool results) are
    left out, and list contents (``[{"type": "text", "text": ...}]``) are flattened.
    """
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        c = [c]
    if isinstance(c, (list, tuple)):
        parts = [
            _content_text(m.get("content"))
            for m in c
            if isinstance(m, dict) and m.get("role", "assistant") == "assistant"
        ]
        return "\n".join(parts)
    raise TypeError(f"a completion must be a string or a list of messages, got {type(c).__name__}")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # multimodal-style parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


# ---------------------------------------------------------------- specs and loading


@dataclass
class RewardSpec:
    """One reward function of a config: a built-in `name` or a `path` "file.py:function".

    weight: its weight in the combined reward; params: keyword arguments bound to it;
    alias: the display name (default: name, or the function's name for a path).
    """

    name: str | None = None
    path: str | None = None
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    alias: str | None = None
    fn: Callable | None = None  # a Python callable (the Python API), instead of name/path

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.name, self.path, self.fn)) != 1:
            raise ValueError(
                f"a reward needs exactly one of 'name' (a built-in), 'path' "
                f"('file.py:function') or 'fn' (a callable), got name={self.name!r}, path={self.path!r}"
            )
        if not isinstance(self.params, dict):
            raise ValueError(f"reward {self.display_name!r}: params must be a mapping")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward {self.display_name!r}: weight must be a number, got {self.weight!r}"
            ) from None

    @property
    def display_name(self) -> str:
        if self.alias:
            return self.alias
        if self.name:
            return self.name
        if self.fn is not None:
            return getattr(self.fn, "__name__", type(self.fn).__name__)
        return _split_path(self.path or "")[1]

    @classmethod
    def from_dict(cls, d: dict) -> RewardSpec:
        """Build from a config mapping; unknown keys are an error with a suggestion."""
        known = [f.name for f in fields(cls)]
        for key in d:
            if key not in known:
                raise ValueError(
                    f"reward: unknown key {key!r}{did_you_mean(str(key), known)}; "
                    f"known keys: {', '.join(known)} (function options go under 'params')"
                )
        return cls(**d)


def _split_path(path: str) -> tuple[str, str]:
    """'some/file.py:fn' -> ('some/file.py', 'fn'); the last colon splits (Windows drives)."""
    file, sep, fn = path.rpartition(":")
    if not sep or not file or not fn:
        raise ValueError(f"reward path {path!r} must look like 'some/file.py:function_name'")
    return file, fn


def load_reward_fn(spec: RewardSpec) -> RewardFn:
    """The callable for `spec`, with `spec.params` bound by functools.partial.

    Parameters are checked at load time so that a typo fails before training starts.
    """
    if spec.name is not None:
        fn = REWARDS.get(spec.name)  # RegistryError (a ValueError) with did-you-mean
        if inspect.isclass(fn):  # a stateful reward (e.g. majority_vote): params configure it
            REWARDS.check_params(spec.name, spec.params, where=f"rewards.{spec.display_name}")
            instance = fn(**spec.params)
            instance.__name__ = spec.name  # type: ignore[attr-defined]
            return instance
        _check_builtin_params(spec.name, fn, spec.params, spec.display_name)
        where = f"reward {spec.name!r}"
    else:
        if spec.fn is not None:
            fn, where = spec.fn, f"reward {spec.display_name!r}"
        else:
            file, fn_name = _split_path(spec.path or "")
            fn = _load_from_file(file, fn_name)
            where = f"{file}:{fn_name}"
        accepted = keyword_params(fn)
        for key in spec.params:
            if accepted is not None and key not in accepted:
                raise ValueError(
                    f"{where}: no parameter {key!r}{did_you_mean(key, sorted(accepted))}; "
                    f"accepted: {', '.join(sorted(accepted))}"
                )
    if not spec.params:
        return fn
    bound = functools.partial(fn, **spec.params)
    bound.__name__ = getattr(fn, "__name__", where)  # type: ignore[attr-defined]
    return bound


def _check_builtin_params(name: str, fn: Callable, params: dict, display: str) -> None:
    """Reject unknown params of a registered reward, so that a typo fails at start-up.

    REWARDS.check_params accepts anything for a function with `**columns` (all built-ins),
    so those are checked against their named parameters (less prompts and completions).
    """
    REWARDS.check_params(name, params, where=f"rewards.{display}")
    accepted = sorted(
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.name not in ("prompts", "completions")
    )
    for key in params:
        if key not in accepted:
            raise RegistryError(
                f"rewards.{display}.{key}: reward {name!r} has no parameter {key!r}"
                f"{did_you_mean(key, accepted)}; accepted: {', '.join(accepted) or 'none'}"
            )


_MODULES: dict[Path, ModuleType] = {}  # one import per file, shared by its functions


def _load_from_file(file: str, fn_name: str) -> Callable:
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"{file}: reward file not found (looked at {path})")
    module = _MODULES.get(path)
    if module is None:
        # A unique module name per file: two "rewards.py" in different folders coexist.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        mod_name = f"grouprl_user_rewards.{path.stem}_{digest}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"{file}: cannot import this file as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise ValueError(f"{file}: error while importing: {type(e).__name__}: {e}") from e
        _MODULES[path] = module
    functions = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        what = "no function" if fn is None else "not a function:"
        raise ValueError(
            f"{file}: {what} {fn_name!r}{did_you_mean(fn_name, functions)}; "
            f"functions in the file: {', '.join(functions) or 'none'}"
        )
    return fn


# ---------------------------------------------------------------- running


@dataclass
class RewardResult:
    """Scores of one batch.

    rewards_NK: float32 [N, K], NaN where a function could not score (None, non-finite,
                or the function failed for the whole batch).
    names:      the K display names, in column order.
    errors:     per function, 1 if it failed on this batch (exception or bad output).
    nones:      per function, how many entries were None or non-finite.
    """

    rewards_NK: torch.Tensor
    names: list[str]
    errors: dict[str, int]
    nones: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)  # from functions' `last_metrics`


class _BadOutput(Exception):
    """A reward function returned something that is not N numbers or Nones."""


class RewardSet:
    """Named, weighted reward functions, run once per batch; failures become NaN, never raise."""

    def __init__(self, specs: list[RewardSpec | dict | str]) -> None:
        self.specs = [_as_spec(s) for s in specs]
        self.names = [s.display_name for s in self.specs]
        seen: set[str] = set()
        for n in self.names:
            if n in seen:
                raise ValueError(
                    f"two rewards are named {n!r}; give one an 'alias' so metrics stay apart"
                )
            seen.add(n)
        self.fns = [load_reward_fn(s) for s in self.specs]
        self.weights_K = torch.tensor([s.weight for s in self.specs], dtype=torch.float32)
        self._warned: set[str] = set()  # functions whose traceback was already logged

    @classmethod
    def from_config(cls, items: list[dict | str]) -> RewardSet:
        """From config entries: a built-in name ("format"), a "file.py:function" string,
        or a mapping of RewardSpec fields."""
        return cls(list(items))

    def __len__(self) -> int:
        return len(self.fns)

    @property
    def collapse_risk(self) -> bool:
        """Whether a registered function here declares `collapse_risk` (e.g. majority_vote)."""
        return any(
            s.name in REWARDS and REWARDS.capabilities(s.name).collapse_risk for s in self.specs
        )

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> RewardResult:
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(f"column {key!r} has {len(col)} values for {n} completions")
        rewards_NK = torch.full((n, len(self.fns)), float("nan"), dtype=torch.float32)
        errors = dict.fromkeys(self.names, 0)
        nones = dict.fromkeys(self.names, 0)
        metrics: dict[str, float] = {}
        # Columns first, so that a column can never shadow prompts or completions.
        kwargs = {**columns, "prompts": prompts, "completions": completions}
        for k, (name, fn) in enumerate(zip(self.names, self.fns, strict=True)):
            try:
                values, n_none = _to_floats(fn(**kwargs), n)
            except _BadOutput as e:
                errors[name] += 1
                logger.warning("reward %r returned a bad result (column set to NaN): %s", name, e)
                continue
            except Exception as e:
                errors[name] += 1
                self._log_failure(name, e)
                continue
            rewards_NK[:, k] = torch.tensor(values, dtype=torch.float32)
            nones[name] += n_none
            # A function may report diagnostics of this call (e.g. TTRL's majority ratio).
            target = getattr(fn, "func", fn)
            extra = getattr(target, "last_metrics", None)
            if isinstance(extra, dict):
                metrics.update({str(key): float(val) for key, val in extra.items()})
        return RewardResult(
            rewards_NK=rewards_NK,
            names=list(self.names),
            errors=errors,
            nones=nones,
            metrics=metrics,
        )

    def _log_failure(self, name: str, e: Exception) -> None:
        msg = "reward %r failed on this batch (column set to NaN): %s: %s"
        if name in self._warned:
            logger.warning(msg, name, type(e).__name__, e)
        else:  # the full traceback once per function is enough to debug it
            self._warned.add(name)
            logger.warning(msg, name, type(e).__name__, e, exc_info=e)


def _as_spec(item: RewardSpec | dict | str | Callable) -> RewardSpec:
    if isinstance(item, RewardSpec):
        return item
    if isinstance(item, dict):
        return RewardSpec.from_dict(item)
    if isinstance(item, str):
        # "file.py:fn" is a path; anything else a built-in name.
        if ".py:" in item:
            return RewardSpec(path=item)
        return RewardSpec(name=item)
    if callable(item):
        return RewardSpec(fn=item)
    raise ValueError(
        f"a reward must be a name, a mapping or a RewardSpec, got {type(item).__name__}"
    )


def _to_floats(out: Any, n: int) -> tuple[list[float], int]:
    """Check a function's output: n entries, each a number or None; None/non-finite -> NaN."""
    if isinstance(out, torch.Tensor):
        out = out.detach().reshape(-1).tolist() if out.dim() == 1 else out
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise _BadOutput(f"expected a list of {n} numbers, got {type(out).__name__}")
    if len(out) != n:
        raise _BadOutput(f"returned {len(out)} values for {n} completions")
    values: list[float] = []
    n_none = 0
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            values.append(math.nan)
            n_none += 1
        elif isinstance(v, (str, bytes, complex)) or not hasattr(v, "__float__"):
            raise _BadOutput(f"entry {i} is {type(v).__name__} {v!r:.40}, not a number or None")
        else:  # bool, int, float, numpy scalars
            f = float(v)
            if not math.isfinite(f):
                n_none += 1
                f = math.nan
            values.append(f)
    return values, n_none
