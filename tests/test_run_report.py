"""What a `grouprl train` run shows and leaves: held-out results as they come, the
completions table, summary.md and curves.png, the last checkpoint's path."""

from __future__ import annotations

import json

from conftest import base_config

from grouprl.cli import main as cli_main
from grouprl.training.trainer import Trainer


def explain(prompts, completions, log_extra, log_metric, **kw):
    log_extra("why", [f"{len(c)} chars" for c in completions])
    log_metric("explain/calls", 1.0)
    return [float(len(c)) for c in completions]


def test_completions_table_eval_lines_and_report(tmp_path, tiny_model_dir, capsys):
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=2, eval_every=1)
    cfg["train"].update(eval_limit=4, eval_samples=2, log_completions_every=2, progress=True)
    cfg["data"] = {"task": "arith"}
    res = Trainer(cfg, reward_funcs=["exact_match", explain]).train()
    out = capsys.readouterr().out
    assert "evaluating after step 1" in out and "step 1: held-out pass@1" in out
    assert res.history[-1]["explain/calls"] == 1.0
    rows = [
        json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    ]
    assert {r["step"] for r in rows} == {2}  # every 2 steps
    assert len(rows) == 3 * 4  # prompts x samples
    first = rows[0]
    for key in ("prompt", "completion", "reward", "exact_match", "explain", "advantage", "why"):
        assert key in first, key
    assert first["why"] == f"{len(first['completion'])} chars"
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "## Held-out (last evaluation)" in summary and "eval/pass@1" in summary
    assert "step_0000002" in summary
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000


def test_the_cli_prints_the_last_checkpoint_and_the_report(tmp_path, tiny_model_dir, capsys):
    import yaml

    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=1)
    cfg["data"] = {"task": "arith"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "last checkpoint: " in out and "step_0000001" in out and "summary.md" in out
