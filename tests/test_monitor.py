"""Tests for grouprl.monitor: metric sinks, progress display and reports."""

import io
import json
import logging
import math
import sys

import pytest

from grouprl.monitor import (
    MetricsLogger,
    ProgressBar,
    format_postfix,
    plot_curves,
    read_metrics,
    write_summary,
)

# ---- MetricsLogger / read_metrics ------------------------------------------------------


def test_metrics_logger_writes_flushes_and_nulls_nan(tmp_path):
    logger = MetricsLogger(tmp_path / "run")
    logger.log(1, {"reward": 0.5, "n": 3, "kl": math.nan, "loss": math.inf})
    # Flushed before close: another reader sees the line now.
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "reward": 0.5, "n": 3, "kl": None, "loss": None}
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    logger.log(2, {"reward": 0.75})
    logger.close()
    logger.close()  # idempotent
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_metrics_logger_converts_tensor_and_numpy_scalars(tmp_path):
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"a": torch.tensor(1.5), "b": np.float32(2.0), "c": np.int64(4)})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "a": 1.5, "b": 2.0, "c": 4}]


def test_metrics_logger_resume_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log(step, {"reward": step / 10})
    with MetricsLogger(tmp_path, resume_step=3) as logger:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        logger.log(4, {"reward": 0.99})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["reward"] == 0.99
    assert not list(tmp_path.glob("*.tmp"))


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "reward": 0.1}\n{"step": 2, "reward": 0.2}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    # A bad line in the middle is corruption, not truncation.
    path.write_text('{"step": 1}\n{"step": 2, "re\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_metrics_logger_appends_after_truncated_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "rew')
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, {"reward": 0.2})
    assert read_metrics(path) == [{"step": 1}, {"step": 2, "reward": 0.2}]
    # A complete last record that only lacks its newline is kept.
    path.write_text('{"step": 1}')
    with MetricsLogger(tmp_path) as logger:
        logger.log(2, {})
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_metrics_logger_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        for step in range(1, 5):
            logger.log(step, {"reward": step / 10, "kl": math.nan, "note": "text"})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # Resuming at step 2 purges the later TensorBoard points as well as the jsonl lines.
    with MetricsLogger(tmp_path, tensorboard=True, resume_step=2) as logger:
        logger.log(3, {"reward": 0.9})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"reward", "kl"}
    reward = [(e.step, round(e.value, 4)) for e in acc.Scalars("reward")]
    assert reward == [(1, 0.1), (2, 0.2), (3, 0.9)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_metrics_logger_tensorboard_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, tensorboard=True)


# ---- ProgressBar -------------------------------------------------------------------------


def test_format_postfix():
    text = format_postfix({"reward": 0.5312, "time/step": 1.23, "kl": 0.00213, "other": 9})
    assert text == "reward 0.531 | kl 0.00213 | 1.2s/step"
    assert format_postfix({"loss": 2.0, "time/step": 42.4}) == "loss 2 | 42s/step"
    assert format_postfix({}) == ""


def test_progress_plain_prints_every_tenth(capsys):
    with ProgressBar(100, description="train") as bar:
        for step in range(1, 101):
            bar.update(step, {"reward": step / 100, "time/step": 0.5})
    lines = capsys.readouterr().out.strip().splitlines()
    # The first step, then each 10% mark up to 100%.
    assert len(lines) == 11
    assert lines[0].startswith("train 1/100 (1%)")
    assert lines[1].startswith("train 10/100 (10%) | reward 0.1 | 0.5s/step")
    assert lines[-1].startswith("train 100/100 (100%) | reward 1")


def test_progress_plain_prints_final_status_on_early_exit(capsys):
    with ProgressBar(1000, initial=500) as bar:
        for step in range(501, 504):
            bar.update(step, {"reward": 0.25})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("train 501/1000")
    assert lines[-1].startswith("train 503/1000 (50%) | reward 0.25")


def test_progress_warn_and_edge_cases(capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="grouprl"):
        with ProgressBar(0) as bar:  # unknown total must not crash
            bar.update(1, {"reward": 1.0})
            bar.warn("reward function 'fmt' failed on 3 samples")
            bar.update(2, {})
    out = capsys.readouterr().out
    # a handler listens (the CLI's, here caplog's): the warning goes there, once, not also
    # to stdout (it used to show twice)
    assert "failed on 3 samples" not in out
    assert "train 1 | reward 1" in out and "train 2" in out
    assert [r.getMessage() for r in caplog.records].count(
        "reward function 'fmt' failed on 3 samples"
    ) == 1

    with ProgressBar(10, enabled=False) as bar:
        bar.update(10, {"reward": 1.0})
        bar.warn("still shown")
    assert capsys.readouterr().out.strip() == ""  # no bar, no status line
    assert any(r.getMessage() == "still shown" for r in caplog.records)  # but the warning


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_live_bar_on_tty(monkeypatch):
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stdout", fake)
    with ProgressBar(5, description="train") as bar:
        assert bar._progress is not None  # the rich live bar is in use
        for step in range(1, 6):
            bar.update(step, {"reward": 0.42, "time/step": 2.0})
        bar.warn("grad norm spiked")
    out = fake.getvalue()
    assert "grad norm spiked" in out
    assert "reward 0.42" in out and "5/5" in out


# ---- reports -----------------------------------------------------------------------------


def test_plot_curves_png(tmp_path):
    records = [{"step": s, "reward": 0.1 * s, "kl": None if s % 2 else 0.01 * s} for s in range(20)]
    out = plot_curves(
        records,
        tmp_path / "plots" / "curves.png",
        keys=("reward", "kl", "absent"),
        title="demo",
        extra_points={"eval/accuracy": [(0, 0.4), (10, 0.7)], "reward": [(19, 2.0)]},
    )
    data = out.read_bytes()
    assert out == tmp_path / "plots" / "curves.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024


def test_plot_curves_skips_absent_keys(tmp_path):
    records = [{"step": s, "reward": 0.1 * s} for s in range(5)]
    one = plot_curves(records, tmp_path / "one.png", keys=("reward",)).read_bytes()
    same = plot_curves(records, tmp_path / "two.png", keys=("reward", "missing")).read_bytes()
    three = plot_curves(
        records, tmp_path / "three.png", keys=("reward",), extra_points={"acc": [(0, 1.0)]}
    ).read_bytes()
    # An absent key adds no subplot (same figure size); an extra series adds one.
    assert _png_size(one) == _png_size(same)
    assert _png_size(three)[1] > _png_size(one)[1]
    empty = plot_curves([], tmp_path / "empty.png")
    assert empty.read_bytes()[:4] == b"\x89PNG"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_write_summary_tables(tmp_path):
    path = write_summary(
        tmp_path / "sub" / "summary.md",
        "Run report",
        {
            "Command": "grouprl train recipe=grpo",
            "Final": {"reward": 0.123456, "steps": 200, "ok": True, "note": "a|b"},
            "Evals": [{"step": 0, "acc": 0.4}, {"step": 200, "acc": 0.71234, "maj@4": 0.8}],
            "Empty": [],
        },
    )
    text = path.read_text()
    assert text.startswith("# Run report\n")
    assert "## Command\n\ngrouprl train recipe=grpo" in text
    assert "| key | value |\n|---|---|\n| reward | 0.1235 |\n| steps | 200 |" in text
    assert "| ok | True |" in text and "| note | a\\|b |" in text
    assert "| step | acc | maj@4 |\n|---|---|---|\n| 0 | 0.4 |  |\n| 200 | 0.7123 | 0.8 |" in text
    assert "## Empty\n\n_(none)_" in text
