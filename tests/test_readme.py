"""The README's examples stay valid: its YAML config loads, its reward file runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from grouprl.components import load_config
from grouprl.rewards import RewardSet

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_yaml_example_is_a_valid_config(tmp_path, monkeypatch):
    (yaml_block,) = [b for b in blocks("yaml") if "rewards:" in b]
    reward_file = next(b for b in blocks("python") if b.startswith("# my_rewards.py"))
    (tmp_path / "my_rewards.py").write_text(reward_file)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(yaml.safe_load(yaml_block))
    assert cfg.rollout.num_generations == 8
    # loss and regularizers are the recipe's; switching recipe switches them
    assert cfg.loss["eps_high"] == 0.2 and cfg.regularizers[0]["name"] == "kl"
    assert not cfg.recipe_overrides
    dr = load_config(yaml.safe_load(yaml_block), ["recipe=dr_grpo"])
    assert dr.regularizers == [] and dr.loss["aggregation"] == "seq_mean_token_sum_norm"
    rs = RewardSet.from_config(cfg.rewards)
    res = rs(["q", "q"], ["short 42", "wrong"], {"answer": ["42", "42"]})
    assert rs.names == ["math_accuracy", "concise"]
    assert res.rewards_NK[:, 1].tolist() == [1.0, 0.0]
    assert res.rewards_NK[:, 0].tolist() == [1.0, 0.0]
