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
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from grouprl.registry import Registry, RegistryError, did_you_mean, keyword_params
from grouprl.rewards.health import FailureWindow, RewardFailureError
from grouprl.rewards.outcome import Outcome, call_reward
from grouprl.rewards.worker import RewardWorker, fork_available

RewardFn = Callable[..., list[float | None]]
REWARDS: Registry[RewardFn] = Registry("reward")
logger = logging.getLogger("grouprl.rewards")
DEFAULT_TIMEOUT = 30.0  # seconds per call of one reward function (RewardSpec.timeout)


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
    alias: the display name (default: name, or the function's name for a path);
    timeout: seconds one call may take before it is cut off and its column is NaN (the
    function runs in a worker process, `rewards/worker.py`); 0 or None runs it in this
    process without a deadline (for debugging, or a reward that needs the GPU).
    """

    name: str | None = None
    path: str | None = None
    weight: float = 1.0
    params: dict = field(default_factory=dict)
    alias: str | None = None
    fn: Callable | None = None  # a Python callable (the Python API), instead of name/path
    timeout: float | None = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.name, self.path, self.fn)) != 1:
            raise ValueError(
                f"a reward needs exactly one of 'name' (a built-in), 'path' "
                f"('file.py:function') or 'fn' (a callable), got name={self.name!r}, "
                f"path={self.path!r}"
            )
        if not isinstance(self.params, dict):
            raise ValueError(f"reward {self.display_name!r}: params must be a mapping")
        try:
            self.weight = float(self.weight)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward {self.display_name!r}: weight must be a number, got {self.weight!r}"
            ) from None
        if self.timeout is not None:
            t = self.timeout
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
                raise ValueError(
                    f"reward {self.display_name!r}: timeout must be a number of seconds >= 0 "
                    f"(0 or null: no deadline, run in-process), got {t!r}"
                )
            self.timeout = float(t)

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
    errors:     per function, 1 if it failed on this batch: raised, returned a bad result,
                timed out or crashed its worker (the last two also counted below).
    nones:      per function, how many entries were None or non-finite.
    metrics:    the functions' own `last_metrics` (e.g. ttrl/majority_ratio), and per
                function rewards/<name>/timeouts, /crashes and /seconds (its wall time).
    timeouts:   per function, 1 if it was cut off at its deadline on this batch.
    crashes:    per function, 1 if its worker died during the call (segfault, exit, OOM).
    """

    rewards_NK: torch.Tensor
    names: list[str]
    errors: dict[str, int]
    nones: dict[str, int]
    metrics: dict[str, float] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    crashes: dict[str, int] = field(default_factory=dict)


class RewardSet:
    """Named, weighted reward functions, run once per batch; failures become NaN, never raise.

    Deadlines: a function with a `timeout` (`RewardSpec.timeout`, seconds, default 30) runs
    in a worker process (`rewards/worker.py`: one per RewardSet, forked at the first call, so
    lambdas and closures work unpickled). At its deadline the worker is killed and the
    function's column is NaN for that call; a worker that dies (segfault, ``os._exit``,
    ``sys.exit``, MemoryError) gives NaN the same way; the next call forks a fresh one. A
    function's state lives in the worker, so it survives between calls until a timeout or a
    crash replaces the worker, and the parent never sees it (its `last_metrics` come back
    with each result). ``timeout: 0`` (or None) runs the function in this process, without
    a deadline. `close()` stops the worker; it is idempotent, and also runs at interpreter
    exit and when the set is garbage-collected.

    Health: each call records, per function, how many of its samples failed (it raised,
    returned a bad result, timed out or crashed; a None is not a failure).
    `check_health()` returns a `RewardFailureError` naming the first function whose failed
    share over its last `failure_window` calls exceeds `failure_limit` (a window not yet
    full never trips; limit 1.0 never trips), else None; `raise_if_unhealthy()` raises it.
    The trainer calls one of them after each step and stops the run.
    `configure_health(limit, window)` sets both later (it restarts the windows).
    """

    def __init__(
        self,
        specs: list[RewardSpec | dict | str],
        *,
        failure_limit: float = 0.5,
        failure_window: int = 20,
    ) -> None:
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
        self._health = FailureWindow(self.names, limit=failure_limit, window=failure_window)
        self._worker: RewardWorker | None = None
        if not fork_available() and any(s.timeout for s in self.specs):
            logger.warning("this platform cannot fork: reward timeouts are ignored (in-process)")

    @classmethod
    def from_config(cls, items: list[dict | str], **kwargs: Any) -> RewardSet:
        """From config entries: a built-in name ("format"), a "file.py:function" string,
        or a mapping of RewardSpec fields; `kwargs` go to the constructor."""
        return cls(list(items), **kwargs)

    def __len__(self) -> int:
        return len(self.fns)

    def __enter__(self) -> RewardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def collapse_risk(self) -> bool:
        """Whether a registered function here declares `collapse_risk` (e.g. majority_vote)."""
        return any(
            s.name in REWARDS and REWARDS.capabilities(s.name).collapse_risk for s in self.specs
        )

    # ------------------------------------------------------------ health

    def configure_health(self, limit: float = 0.5, window: int = 20) -> None:
        """Stop when a function fails on more than `limit` of its samples over its last
        `window` calls (config: train.reward_failure_limit / reward_failure_window)."""
        self._health = FailureWindow(self.names, limit=limit, window=window)

    def check_health(self) -> RewardFailureError | None:
        """The error naming a function over its failure limit (class docstring), or None."""
        return self._health.check()

    def raise_if_unhealthy(self) -> None:
        """Raise `check_health()`'s error, if any."""
        error = self._health.check()
        if error is not None:
            raise error

    def failure_share(self, name: str) -> float | None:
        """The share of `name`'s samples that failed over its window; None until it is full."""
        return self._health.share(name)

    # ------------------------------------------------------------ scoring

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
        timeouts = dict.fromkeys(self.names, 0)
        crashes = dict.fromkeys(self.names, 0)
        metrics: dict[str, float] = {}
        # Columns first, so that a column can never shadow prompts or completions.
        kwargs = {**columns, "prompts": prompts, "completions": completions}
        for k, (name, fn, spec) in enumerate(zip(self.names, self.fns, self.specs, strict=True)):
            t0 = time.perf_counter()
            if spec.timeout and fork_available():
                outcome = self._worker_for_call().run(k, kwargs, n, spec.timeout)
            else:
                outcome = call_reward(fn, kwargs, n)
            metrics[f"rewards/{name}/seconds"] = time.perf_counter() - t0
            timeouts[name] = int(outcome.status == "timeout")
            crashes[name] = int(outcome.status == "crash")
            metrics[f"rewards/{name}/timeouts"] = float(timeouts[name])
            metrics[f"rewards/{name}/crashes"] = float(crashes[name])
            self._health.record(
                name, failed=n if outcome.failed else 0, total=n, error=outcome.error
            )
            if outcome.failed:
                errors[name] += 1
                self._log_failure(name, outcome)
                continue
            rewards_NK[:, k] = torch.tensor(outcome.values, dtype=torch.float32)
            nones[name] += outcome.n_none
            # A function may report diagnostics of this call (e.g. TTRL's majority ratio).
            metrics.update(outcome.metrics)
        return RewardResult(
            rewards_NK=rewards_NK,
            names=list(self.names),
            errors=errors,
            nones=nones,
            metrics=metrics,
            timeouts=timeouts,
            crashes=crashes,
        )

    def close(self) -> None:
        """Stop the worker process, if one runs; idempotent. Later calls start a new one."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _worker_for_call(self) -> RewardWorker:
        if self._worker is None:
            self._worker = RewardWorker(self.fns)
        return self._worker

    def _log_failure(self, name: str, outcome: Outcome) -> None:
        what = _FAILURE_WORDS[outcome.status]
        msg = f"reward {name!r} {what} on this batch (column set to NaN): {outcome.error}"
        if outcome.detail and name not in self._warned:
            # the full traceback once per function is enough to debug it
            self._warned.add(name)
            msg = f"{msg}\n{outcome.detail.rstrip()}"
        logger.warning("%s", msg)


_FAILURE_WORDS = {
    "bad_output": "returned a bad result",
    "error": "failed",
    "timeout": "timed out",
    "crash": "crashed its worker",
}


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
