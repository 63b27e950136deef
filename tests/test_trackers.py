"""train.report_to: trackio (local store) and wandb (offline) receive every step's numbers."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import arith_rows, base_config

from grouprl.components import load_config
from grouprl.config import ConfigError
from grouprl.training.trainer import Trainer


def test_unknown_tracker_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="train.report_to.0: 'wandbb' is not one of.*wandb"):
        load_config({"train": {"report_to": ["wandbb"]}})


def test_trackio_gets_the_steps(tmp_path, tiny_model_dir):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    project = f"grouprl-tests-{tmp_path.name}"  # its own store file (TRACKIO_DIR decides where)
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    cfg["train"].update(report_to=["trackio"], report_project=project)
    Trainer(cfg, train_dataset=arith_rows()).train()
    path = SQLiteStorage.get_project_db_path(project)
    db = sqlite3.connect(path)
    rows = db.execute("select step, metrics from metrics where run_name = 'run'").fetchall()
    assert [s for s, _ in rows] == [1, 2]
    assert b'"reward"' in rows[0][1] and b'"loss"' in rows[0][1]
    db.close()
    for f in path.parent.glob(f"{project}.*"):  # leave no store behind
        f.unlink()


def test_wandb_offline_gets_the_steps(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2)
    cfg["train"]["report_to"] = ["wandb", "tensorboard"]
    Trainer(cfg, train_dataset=arith_rows()).train()
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert b"reward" in data and b"grad_norm" in data
    assert any((tmp_path / "run" / "tensorboard").iterdir())
