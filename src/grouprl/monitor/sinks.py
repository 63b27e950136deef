"""Metric sinks: an append-only ``metrics.jsonl`` per run, optionally mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["COMPLETIONS_FILE", "METRICS_FILE", "MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"  # the completions tables, one JSON row per sample


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: NaN/inf -> None; numpy/torch scalars -> Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()  # 0-d tensors and numpy scalars
    if value is None or isinstance(value, (bool, int, str)):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _parse_lines(text: str, path: Path) -> list[dict[str, Any]]:
    """Parse jsonl text; an unparsable *last* line is a write cut short and is dropped."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON: {e}") from e
    return records


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (or of a run directory holding one), in file order.

    A truncated last line, left by a run killed mid-write, is ignored; a bad line elsewhere
    raises ValueError. Non-finite values read back as None.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _parse_lines(path.read_text(encoding="utf-8"), path)


class MetricsLogger:
    """Writes one JSON object per ``log`` call to ``<run_dir>/metrics.jsonl``.

    Each line is ``{"step": step, **metrics}`` (an explicit ``step`` argument wins over a
    ``"step"`` metric), with NaN/inf written as null, flushed at once so a killed run keeps
    every line. An existing file is appended to. With ``resume_step``, lines with
    ``step > resume_step`` are dropped first (atomic rewrite), so a run resumed from a
    checkpoint does not log those steps twice. ``tensorboard=True`` also writes scalars to
    ``<run_dir>/tensorboard`` (events past ``resume_step`` are purged there too).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        resume_step: int | None = None,
        trackers: list[Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.completions_path = self.run_dir / COMPLETIONS_FILE
        for path in (self.path, self.completions_path):
            if resume_step is not None and path.exists():
                _truncate_after(path, resume_step)
            if path.exists():
                _drop_partial_line(path)
        self._writer = None
        if tensorboard:
            self._writer = _summary_writer(self.run_dir / "tensorboard", resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._trackers = list(trackers or [])  # monitor/trackers.py (trackio, wandb)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record for ``step``; also send numeric values to TensorBoard."""
        if self._file.closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if key != "step":
                record[key] = _json_value(value)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                value = value.item() if hasattr(value, "item") else value
                if key != "step" and isinstance(value, (int, float)):  # NaN kept: TB shows it
                    self._writer.add_scalar(key, float(value), int(step))
            self._writer.flush()
        for tracker in self._trackers:
            tracker.log(step, metrics)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A completions table of `step` (prompt, completion, rewards, advantage, ...):
        appended to completions.jsonl one row per line, and the first rows as a markdown
        table in TensorBoard's text tab."""
        with self.completions_path.open("a", encoding="utf-8") as f:
            for row in rows:
                record = {"step": int(step), **{k: _json_cell(v) for k, v in row.items()}}
                f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._writer is not None and rows:
            head = list(rows[0])
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for row in rows[:8]:
                cells = [
                    str(_json_cell(row.get(k))).replace("|", "\\|").replace("\n", " ") for k in head
                ]
                lines.append("| " + " | ".join(cells) + " |")
            self._writer.add_text("completions", "\n".join(lines), int(step))
            self._writer.flush()

    def close(self) -> None:
        """Close the file and the TensorBoard writer; safe to call twice."""
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _json_cell(value: Any) -> Any:
    """A JSON-safe table cell: text as is, numbers as `_json_value`, else its str."""
    if isinstance(value, str):
        return value
    try:
        return _json_value(value)
    except (TypeError, ValueError):
        return str(value)


def _truncate_after(path: Path, resume_step: int) -> None:
    """Drop the records of steps after `resume_step` (atomic rewrite)."""
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    records = _parse_lines("\n".join(lines), path)  # drops a cut-off last line
    kept = [
        line
        for line, r in zip(lines, records, strict=False)
        if not isinstance(r.get("step"), (int, float)) or r["step"] <= resume_step
    ]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves either the old or the new file


def _drop_partial_line(path: Path) -> None:
    """Mend a last line left without its newline by a killed run, so appends stay valid.

    A complete JSON record just gets its newline; a cut-off one is removed.
    """
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline; what follows it is the unfinished line.
        cut = 0
        pos = size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            nl = f.read(pos - start).rfind(b"\n")
            if nl >= 0:
                cut = start + nl + 1
                break
            pos = start
        f.seek(cut)
        try:
            json.loads(f.read())
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            f.truncate(cut)
        else:
            f.write(b"\n")


def _summary_writer(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "MetricsLogger(tensorboard=True) needs the tensorboard package: "
            "pip install tensorboard  (or: pip install 'grouprl[tensorboard]')"
        ) from e
    # purge_step hides events logged after the checkpoint by the run that crashed.
    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge)
