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
import inspect
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from grouprl.registry import Registry, RegistryError, did_you_mean, keyword_params
from grouprl.rewards.health import FailureWindow, RewardFailureError
from grouprl.rewards.loading import load_callable, split_path
from grouprl.rewards.outcome import Outcome, call_async_rewards, call_reward, is_async
from grouprl.rewards.worker import RewardWorker, fork_available

RewardFn = Callable[..., list[float | None]]
REWARDS: Registry[RewardFn] = Registry("reward")
logger = logging.getLogger("grouprl.rewards")
DEFAULT_TIMEOUT = 30.0  # seconds per call of one reward function (RewardSpec.timeout)


def last_assistant_text(messages: list[dict[str, Any]]) -> str:
    """The content of the last assistant message (a multi-turn trajectory's answer)."""
    said = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
    return said[-1] if said else ""


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
    """One reward function of a config: a built-in `name`, a `path` ("file.py:function" or
    "package.module:function", e.g. "trl.rewards:accuracy_reward"), or a `factory` (a path
    as above) called once with `args` to build the function (TRL's
    `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`).

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
    factory: str | None = None  # "module:function" (or "file.py:function") that builds it
    args: dict = field(default_factory=dict)  # the factory's arguments

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.name, self.path, self.fn, self.factory)) != 1:
            raise ValueError(
                f"a reward needs exactly one of 'name' (a built-in), 'path' "
                f"('file.py:function' or 'module:function'), 'factory' (a path whose "
                f"function builds the reward from 'args') or 'fn' (a callable), got "
                f"name={self.name!r}, path={self.path!r}, factory={self.factory!r}"
            )
        if not isinstance(self.args, dict):
            raise ValueError(f"reward {self.display_name!r}: args must be a mapping")
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
        return split_path(self.path or self.factory or "")[1]

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
        elif spec.factory is not None:
            make, where = load_callable(spec.factory)
            try:
                fn = make(**spec.args)
            except Exception as exc:
                raise ValueError(
                    f"reward factory {where} with args {spec.args}: {type(exc).__name__}: {exc}"
                ) from None
            if not callable(fn):
                raise ValueError(
                    f"reward factory {where} returned {type(fn).__name__}, not a function"
                )
        else:
            fn, where = load_callable(spec.path or "")
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
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra columns


@dataclass(frozen=True)
class TrainerState:
    """What a reward function sees of the run as `trainer_state` (TRL passes its
    TrainerState; these are the fields reward code reads): the optimizer steps done so far,
    the run's total, and the epoch of the data (a fraction)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


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
        self.specs = [as_spec(s) for s in specs]
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
        self.trainer_state: TrainerState | None = None  # set by the trainer every step
        self._async = [k for k, fn in enumerate(self.fns) if is_async(fn)]  # awaited together
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
    def needs_ema_reference(self) -> list[str]:
        """The configured functions that declare `needs_ema_reference` (care_bonus)."""
        return [
            s.display_name
            for s in self.specs
            if s.name in REWARDS and REWARDS.capabilities(s.name).needs_ema_reference
        ]

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

    def last_error(self, name: str) -> str:
        """The last error `name` failed with, or "" (it never failed)."""
        return self._health.last_error(name)

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
        if self.trainer_state is not None:
            kwargs["trainer_state"] = self.trainer_state
        extra: dict[str, list[Any]] = {}
        # async functions run together in this process, each under its own deadline
        t0 = time.perf_counter()
        calls = [(self.fns[k], self.specs[k].timeout) for k in self._async]
        outcomes = call_async_rewards(calls, kwargs, n) if calls else []
        awaited = dict(zip(self._async, outcomes, strict=True))
        async_seconds = time.perf_counter() - t0
        for k, (name, fn, spec) in enumerate(zip(self.names, self.fns, self.specs, strict=True)):
            t0 = time.perf_counter()
            if k in awaited:
                outcome = awaited[k]
            elif spec.timeout and fork_available():
                outcome = self._worker_for_call().run(k, kwargs, n, spec.timeout)
            else:
                outcome = call_reward(fn, kwargs, n)
            seconds = async_seconds if k in awaited else time.perf_counter() - t0
            metrics[f"rewards/{name}/seconds"] = seconds
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
            # A function may report diagnostics of this call (e.g. TTRL's majority ratio,
            # or anything it passed to log_metric) and columns for the completions table.
            metrics.update(outcome.metrics)
            extra.update(outcome.extra)
        return RewardResult(
            rewards_NK=rewards_NK,
            names=list(self.names),
            errors=errors,
            nones=nones,
            metrics=metrics,
            timeouts=timeouts,
            crashes=crashes,
            extra=extra,
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
        state = self.trainer_state
        where = f"step {state.global_step + 1}: " if state is not None else ""
        msg = (
            f"{where}reward {name!r} {what} on this batch (its column is NaN; the run goes "
            f"on): {outcome.error}"
        )
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


def as_spec(item: RewardSpec | dict | str | Callable) -> RewardSpec:
    """A config entry as a RewardSpec: a built-in name, a "file.py:function" or
    "module:function" path, a mapping of RewardSpec fields, or a callable."""
    if isinstance(item, RewardSpec):
        return item
    if isinstance(item, dict):
        return RewardSpec.from_dict(item)
    if isinstance(item, str):
        # "file.py:fn" or "package.module:fn" is a path; anything else a built-in name.
        if ":" in item:
            return RewardSpec(path=item)
        return RewardSpec(name=item)
    if callable(item):
        return RewardSpec(fn=item)
    raise ValueError(
        f"expected a reward name, 'file.py:function' or 'module:function', a mapping or a "
        f"callable, got {type(item).__name__} {item!r:.40}"
    )
