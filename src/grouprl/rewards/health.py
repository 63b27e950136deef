"""Failure share of each reward function over its last calls, and the error that stops a run.

A failed sample is one whose function raised, returned a bad result, timed out or crashed
its worker on that call; a None ("cannot score this one") is a legitimate answer and never
counts. A reward that fails now and then costs only NaN rewards, but one that fails most of
the time trains on the few samples it still scores, and a run that lasts days should stop
and say so instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["FailureWindow", "NoRewardError", "RewardFailureError"]

_MAX_ERROR = 300  # characters of the last error quoted in the message


class RewardFailureError(RuntimeError):
    """A reward function failed on more than the allowed share of its samples."""

    def __init__(self, name: str, share: float, window: int, limit: float, last_error: str):
        self.name, self.share, self.window = name, share, window
        self.limit, self.last_error = limit, last_error
        last = " ".join(last_error.split()) or "unknown"
        if len(last) > _MAX_ERROR:  # an exception may quote a whole completion
            last = last[: _MAX_ERROR - 3] + "..."
        super().__init__(
            f"reward {name!r} failed on {share:.0%} of its samples over its last {window} "
            f"calls (limit {limit:.0%}); last error: {last}"
        )

    def fields(self) -> tuple[str, float, int, float, str]:
        """The constructor's arguments (to rebuild the error in another process)."""
        return self.name, self.share, self.window, self.limit, self.last_error


class NoRewardError(RuntimeError):
    """No sample had a reward (every weighted reward NaN) for several consecutive steps."""


@dataclass
class _Call:
    failed: int  # samples that failed
    total: int  # samples scored


class FailureWindow:
    """Per function, the failed and total samples of its last `window` calls.

    `check()` returns the error for the first function (in the order given) whose share of
    failed samples over a full window is above `limit`; a window not yet full never trips,
    so a failure on the first calls of a run does not stop it. `limit` 1.0 never trips.
    """

    def __init__(self, names: list[str], *, limit: float = 0.5, window: int = 20) -> None:
        if not 0.0 <= limit <= 1.0:  # NaN fails too
            raise ValueError(f"failure_limit must be in [0, 1], got {limit}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"failure_window must be an integer >= 1, got {window!r}")
        self.limit, self.window = float(limit), window
        self._calls: dict[str, deque[_Call]] = {n: deque(maxlen=window) for n in names}
        self._last_error: dict[str, str] = {}

    def record(self, name: str, *, failed: int, total: int, error: str = "") -> None:
        """One call of `name`: `failed` of its `total` samples failed (`error` says why)."""
        if total <= 0:
            return
        self._calls[name].append(_Call(failed, total))
        if failed:
            self._last_error[name] = error

    def share(self, name: str) -> float | None:
        """The share of `name`'s samples that failed over its window; None until it is full."""
        calls = self._calls[name]
        if len(calls) < self.window:
            return None
        return sum(c.failed for c in calls) / sum(c.total for c in calls)

    def last_error(self, name: str) -> str:
        """The last error `name` failed with (shortened), or ""."""
        last = " ".join(self._last_error.get(name, "").split())
        return last[: _MAX_ERROR - 3] + "..." if len(last) > _MAX_ERROR else last

    def check(self) -> RewardFailureError | None:
        for name in self._calls:
            share = self.share(name)
            if share is not None and share > self.limit:
                last = self._last_error.get(name, "")
                return RewardFailureError(name, share, self.window, self.limit, last)
        return None
