"""benchmarks/crpo_repro.py end to end at toy size: both arms run and the table adds up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_crpo_repro_runs_both_arms_from_one_start(tmp_path, monkeypatch, capsys):
    import crpo_repro

    out = tmp_path / "res.json"
    argv = ["crpo_repro.py", "--seeds", "0", "--steps", "1", "--sft-steps", "2"]
    argv += ["--eval-problems", "3", "--workdir", str(tmp_path / "wd"), "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    crpo_repro.main()
    results = json.loads(out.read_text())
    assert [r["arm"] for r in results] == ["sft (start)", "grpo", "crpo"]
    for r in results:
        for column in crpo_repro.COLUMNS:
            assert 0.0 <= r["after"][column] <= 1.5, column
    # the GRPO arm trains on accuracy and format only; CRPO on all four rewards
    for arm, names in (("grpo", 2), ("crpo", 4)):
        first = json.loads(
            (tmp_path / "wd" / "seed0" / arm / "metrics.jsonl").read_text().splitlines()[0]
        )
        assert len([k for k in first if k.startswith("rewards/") and k.endswith("/mean")]) == names
    table = capsys.readouterr().out
    assert "| mean of 1 | crpo |" in table and "| 0 | sft (start) |" in table
    # a second run reuses the saved SFT model: the same start measures the same
    crpo_repro.main()
    again = json.loads(out.read_text())
    assert again[0]["after"] == results[0]["after"]


@pytest.mark.slow
def test_ablation_arms_differ_from_the_recipe_only_where_named():
    import crpo_repro

    from grouprl.config import load_recipe

    recipe = load_recipe("crpo")["rewards"]
    assert crpo_repro._crpo_rewards(0.5, True) == recipe
    assert crpo_repro.GRPO_REWARDS == recipe[:2]  # GRPO keeps CRPO's accuracy and format
    unconditioned = crpo_repro.ARMS["crpo_unconditioned"]["rewards"]
    assert unconditioned[:3] == recipe[:3]
    assert unconditioned[3]["params"]["zero_if_invented"] is False
