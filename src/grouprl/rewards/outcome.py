"""One call of one reward function, caught: its checked values, or how it failed.

`call_reward` runs the same way in-process and inside the reward worker, so both paths
check outputs alike; an `Outcome` holds only plain values, so it crosses a pipe pickled.

As in TRL, a function may be `async def` (awaited here), and may take `log_metric(name,
value)` (a number logged with the step's metrics) and `log_extra(column, values)` (a
column of N values shown beside the completions); both are made here, in the process
that runs the function, and what they collect comes back in the Outcome. They, and the
other keyword arguments, are passed only to a function that accepts them (by name or
`**kwargs`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Status = Literal["ok", "bad_output", "error", "timeout", "crash"]


@dataclass
class Outcome:
    """What one call of a reward function gave.

    status: ok; bad_output (not N numbers or Nones); error (it raised); timeout (killed at
            its deadline); crash (its worker died, or it ran out of memory).
    values: N floats, NaN where the function said None or gave a non-finite number (ok only).
    error:  one line saying what went wrong; detail: the traceback text of an exception.
    """

    status: Status
    values: list[float] | None = None
    n_none: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    detail: str = ""
    extra: dict[str, list[Any]] = field(default_factory=dict)  # log_extra's columns

    @property
    def failed(self) -> bool:
        return self.status != "ok"


class BadOutput(Exception):
    """A reward function returned something that is not N numbers or Nones."""


class _Logs:
    """The `log_metric` / `log_extra` callables one call gets, and what they collected."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.extra: dict[str, list[Any]] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[str(name)] = float(value)

    def log_extra(self, column: str, values: list[Any]) -> None:
        self.extra[str(column)] = list(values)

    def args(self, kwargs: dict[str, Any], fn: Callable[..., Any]) -> dict[str, Any]:
        extras = {"log_metric": self.log_metric, "log_extra": self.log_extra}
        return accepted({**kwargs, **extras}, fn)


def _checked(out: Any, fn: Callable[..., Any], n: int, logs: _Logs) -> Outcome:
    values, n_none = to_floats(out, n)
    metrics = {**reported_metrics(fn), **logs.metrics}
    return Outcome("ok", values=values, n_none=n_none, metrics=metrics, extra=logs.extra)


def _failed(e: BaseException) -> Outcome:
    if isinstance(e, BadOutput):
        return Outcome("bad_output", error=str(e))
    if isinstance(e, MemoryError):  # its worker is replaced, which frees what it held
        return Outcome("crash", error=f"MemoryError: {e}", detail=traceback.format_exc())
    return Outcome("error", error=f"{type(e).__name__}: {e}", detail=traceback.format_exc())


def call_reward(fn: Callable[..., Any], kwargs: dict[str, Any], n: int) -> Outcome:
    """Run `fn(**kwargs)` on a batch of `n` and check what it returns; never raises an
    Exception (SystemExit and KeyboardInterrupt pass through)."""
    logs = _Logs()
    try:
        out = fn(**logs.args(kwargs, fn))
        if inspect.isawaitable(out):  # an `async def` reward
            out = run_awaitable(out)
        return _checked(out, fn, n, logs)
    except Exception as e:
        return _failed(e)


def is_async(fn: Callable[..., Any]) -> bool:
    """An `async def` function (also behind functools.partial, or an async __call__)."""
    target = getattr(fn, "func", fn)
    if inspect.iscoroutinefunction(target):
        return True
    return not inspect.isroutine(target) and inspect.iscoroutinefunction(type(target).__call__)


def call_async_rewards(
    calls: list[tuple[Callable[..., Any], float | None]], kwargs: dict[str, Any], n: int
) -> list[Outcome]:
    """Several `async def` rewards awaited together in one event loop (as TRL runs them),
    each under its own deadline (seconds; None or 0: none); one Outcome each, in order."""

    async def one(fn: Callable[..., Any], timeout: float | None) -> Outcome:
        logs = _Logs()
        try:
            out = fn(**logs.args(kwargs, fn))
            if inspect.isawaitable(out):
                out = await (asyncio.wait_for(out, timeout) if timeout else out)
            return _checked(out, fn, n, logs)
        except asyncio.TimeoutError:
            return Outcome("timeout", error=f"no result within {timeout:g} s")
        except Exception as e:
            return _failed(e)

    async def every() -> list[Outcome]:
        return list(await asyncio.gather(*(one(fn, t) for fn, t in calls)))

    return run_awaitable(every())


def run_awaitable(awaitable: Any) -> Any:
    """Await `awaitable` to completion from synchronous code; in a thread of its own when
    this thread already runs an event loop (a notebook)."""

    async def wait() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here: the usual case
        return asyncio.run(wait())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def accepted(kwargs: dict[str, Any], fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments `fn` takes: all of them with `**kwargs`, else those it names."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: pass everything
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in kwargs.items() if k in names}


def reported_metrics(fn: Callable[..., Any]) -> dict[str, float]:
    """The diagnostics a function reports about its last call (its `last_metrics` dict, e.g.
    TTRL's majority ratio), looked up through a functools.partial."""
    extra = getattr(getattr(fn, "func", fn), "last_metrics", None)
    if not isinstance(extra, dict):
        return {}
    try:
        return {str(key): float(val) for key, val in extra.items()}
    except (TypeError, ValueError) as e:
        raise BadOutput(f"last_metrics holds a value that is not a number: {e}") from None


def to_floats(out: Any, n: int) -> tuple[list[float], int]:
    """Check a function's output: n entries, each a number or None; None/non-finite -> NaN."""
    if isinstance(out, torch.Tensor):
        out = out.detach().reshape(-1).tolist() if out.dim() == 1 else out
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise BadOutput(f"expected a list of {n} numbers, got {type(out).__name__}")
    if len(out) != n:
        raise BadOutput(f"returned {len(out)} values for {n} completions")
    values: list[float] = []
    n_none = 0
    for i, v in enumerate(out):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if v is None:
            values.append(math.nan)
            n_none += 1
        elif isinstance(v, (str, bytes, complex)) or not hasattr(v, "__float__"):
            raise BadOutput(f"entry {i} is {type(v).__name__} {v!r:.40}, not a number or None")
        else:  # bool, int, float, numpy scalars
            f = float(v)
            if not math.isfinite(f):
                n_none += 1
                f = math.nan
            values.append(f)
    return values, n_none
