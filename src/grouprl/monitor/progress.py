"""Training progress display: a rich live bar on a terminal, plain status lines elsewhere."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

__all__ = ["ProgressBar", "format_postfix"]

logger = logging.getLogger("grouprl")

# Metrics shown next to the bar, in this order, with their labels.
_POSTFIX_KEYS = (("reward", "reward"), ("loss", "loss"), ("kl", "kl"))


def _short(value: float) -> str:
    """Three significant digits: 0.5312 -> '0.531', 1234.5 -> '1.23e+03'."""
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(value: Any) -> float | None:
    """A plain float from a Python/numpy/torch scalar, or None for anything else."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def format_postfix(metrics: Mapping[str, Any]) -> str:
    """Compact summary of a step's metrics, e.g. ``reward 0.53 | kl 0.0021 | 1.2s/step``.

    Shows ``reward``, ``loss`` and ``kl`` when present (and numeric), then ``time/step``.
    """
    parts = []
    for key, label in _POSTFIX_KEYS:
        value = _number(metrics.get(key))
        if value is not None:
            parts.append(f"{label} {_short(value)}")
    step_time = _number(metrics.get("time/step"))
    if step_time is not None and math.isfinite(step_time):
        parts.append(f"{step_time:.2g}s/step" if step_time < 10 else f"{step_time:.0f}s/step")
    return " | ".join(parts)


class ProgressBar:
    """Shows training progress from ``initial`` to ``total`` steps.

    On a terminal (stdout is a TTY) it is a rich live bar with the postfix of
    ``format_postfix``. Otherwise (CI logs, files, notebooks' captured output) it prints a
    one-line status about every 10% of ``total`` and at the last step, so logs stay
    readable. ``enabled=False`` shows no progress at all (e.g. non-zero ranks), but
    ``warn`` still prints. ``total=0`` (unknown length) works: the bar has no end and the
    plain mode prints every step.
    """

    def __init__(
        self,
        total: int,
        *,
        description: str = "train",
        enabled: bool = True,
        initial: int = 0,
    ) -> None:
        self.total = max(0, int(total))
        self.description = description
        self.enabled = enabled
        self.step = int(initial)
        self._initial = int(initial)
        self._postfix = ""
        self._t0 = time.monotonic()
        self._printed_step: int | None = None  # last step with a plain status line
        self._updated = False
        self._live = enabled and sys.stdout.isatty()
        self._progress: Any = None
        self._task: Any = None
        # Plain mode prints when the step crosses a multiple of this (about 10% of total).
        self._every = max(1, math.ceil(self.total / 10)) if self.total else 1

    def start(self) -> ProgressBar:
        """Start the live bar (called by ``with`` and, lazily, by the first ``update``)."""
        if self._live and self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"),
                transient=False,
            )
            self._task = self._progress.add_task(
                self.description,
                total=self.total or None,
                completed=self.step,
                postfix=self._postfix,
            )
            self._progress.start()
        return self

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance to ``step`` (absolute, not a delta) and show ``metrics``' postfix."""
        self.step = int(step)
        self._updated = True
        if metrics is not None:
            self._postfix = format_postfix(metrics)
        if not self.enabled:
            return
        if self._live:
            self.start()
            self._progress.update(self._task, completed=self.step, postfix=self._postfix)
            return
        crossed = self._printed_step is None or (
            self.step // self._every > self._printed_step // self._every
        )
        if crossed or (self.total and self.step >= self.total):
            self._print_status()

    def warn(self, message: str) -> None:
        """A warning line above the bar (without breaking it): through logging when a
        handler listens (the CLI's prints it), else printed; once either way."""
        if self._progress is not None:
            from rich.markup import escape

            self._progress.console.print(f"[yellow]warning:[/yellow] {escape(message)}")
        elif logger.hasHandlers():
            logger.warning(message)
        else:
            print(f"warning: {message}", flush=True)

    def note(self, message: str) -> None:
        """An information line above the bar (e.g. held-out results), shown even when the
        bar itself is disabled only on the process that draws it."""
        if not self.enabled:
            return
        if self._progress is not None:
            from rich.markup import escape

            self._progress.console.print(escape(message))
        else:
            print(message, flush=True)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Say on the bar what the run is doing between steps (e.g. "evaluating")."""
        if self.enabled and self._progress is not None:
            self._progress.update(self._task, description=f"{self.description} ({what})")
        elif self.enabled:
            print(f"{self.description}: {what}...", flush=True)
        try:
            yield
        finally:
            if self._progress is not None:
                self._progress.update(self._task, description=self.description)

    def close(self) -> None:
        """Stop the live bar, or print the final status line in plain mode."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self.enabled and not self._live and self._updated and self._printed_step != self.step:
            self._print_status()

    def _print_status(self) -> None:
        self._printed_step = self.step
        line = f"{self.description} {self.step}"
        if self.total:
            line += f"/{self.total} ({100 * self.step / self.total:.0f}%)"
        if self._postfix:
            line += f" | {self._postfix}"
        elapsed = time.monotonic() - self._t0
        line += f" | {_duration(elapsed)}"
        done = self.step - self._initial
        if self.total and 0 < done and self.step < self.total:
            line += f" eta {_duration(elapsed / done * (self.total - self.step))}"
        print(line, flush=True)

    def __enter__(self) -> ProgressBar:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
