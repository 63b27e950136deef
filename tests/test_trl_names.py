"""TRL GRPOConfig names in a grouprl config: mapped with one log line each, refused with
the reason where grouprl has no equivalent; and the start-up lines of a run."""

from __future__ import annotations

import logging

import pytest
import yaml
from conftest import arith_rows, base_config

from grouprl.components import load_config
from grouprl.config import ConfigError
from grouprl.training.trainer import Trainer

TRL_YAML = """
# a GRPOConfig, as a TRL user writes it
output_dir: runs/trl-style
learning_rate: 1.0e-6
max_steps: 200
num_generations: 16
max_prompt_length: 256
max_completion_length: 1024
temperature: 0.9
beta: 0.001
loss_type: dr_grpo
epsilon: 0.2
epsilon_high: 0.28
scale_rewards: batch
mask_truncated_completions: true
top_entropy_quantile: 0.2
num_iterations: 2
lr_scheduler_type: cosine
warmup_steps: 10
save_steps: 50
bf16: true
use_vllm: true
vllm_mode: server
vllm_server_base_url: http://127.0.0.1:8000
rewards: [math_accuracy]
"""


def test_a_grpoconfig_style_yaml_resolves_to_the_documented_values():
    cfg = load_config(yaml.safe_load(TRL_YAML))
    assert cfg.train.output_dir == "runs/trl-style" and cfg.train.learning_rate == 1e-6
    assert cfg.train.max_steps == 200 and cfg.train.num_iterations == 2
    assert cfg.train.lr_schedule == "cosine" and cfg.train.warmup_steps == 10
    assert cfg.train.save_every == 50
    assert cfg.rollout.num_generations == 16 and cfg.rollout.max_new_tokens == 1024
    assert cfg.rollout.temperature == 0.9 and cfg.data.max_prompt_length == 256
    assert cfg.regularizers == [{"name": "kl", "beta": 0.001, "estimator": "k3"}]
    assert cfg.loss["aggregation"] == "seq_mean_token_sum_norm"
    assert cfg.loss["eps_low"] == 0.2 and cfg.loss["eps_high"] == 0.28
    assert cfg.advantage["scale"] == "batch"
    assert cfg.sample_filters == [{"name": "mask_truncated"}]
    assert cfg.token_mask == {"name": "forking_tokens", "rho": 0.2}
    assert cfg.model.dtype == "bfloat16"
    assert cfg.rollout.engine == "vllm" and cfg.rollout.vllm["mode"] == "server"
    assert cfg.rollout.vllm["server_url"] == "http://127.0.0.1:8000"
    assert len(cfg.trl_mappings) == 22  # one line per GRPOConfig name above
    assert "TRL loss_type='dr_grpo' -> loss.aggregation='seq_mean_token_sum_norm'" in (
        cfg.trl_mappings
    )


def test_a_trl_section_and_command_line_names_work_too():
    cfg = load_config(
        {"trl": {"num_generations": 4, "beta": 0.0, "report_to": ["wandb"]}},
        ["max_completion_length=32"],
    )
    assert cfg.rollout.num_generations == 4 and cfg.regularizers == []
    assert cfg.train.report_to == ["wandb"]
    assert cfg.rollout.max_new_tokens == 32


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_train_epochs": 3}, "num_train_epochs: TRL's num_train_epochs has no grouprl"),
        (
            {"trl": {"per_device_train_batch_size": 8}},
            "trl.per_device_train_batch_size: .*prompts_per_step",
        ),
        ({"loss_type": "sapo"}, "loss_type: loss_type 'sapo' has no grouprl equivalent"),
        ({"beta": 0.1, "regularizers": []}, "beta: TRL's beta sets regularizers, which the config"),
        ({"train": {"num_train_epochs": 3}}, "train.num_train_epochs: unknown key \\(TRL's"),
        ({"trl": {"not_a_trl_name": 1}}, "trl.not_a_trl_name: not a GRPOConfig name"),
    ],
)
def test_names_without_an_equivalent_are_refused_with_the_reason(config, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_the_start_up_log_lists_mappings_and_recipe_overrides(tmp_path, tiny_model_dir, caplog):
    cfg = base_config(tmp_path / "run", tiny_model_dir, max_steps=1)
    for key in ("advantage", "loss", "regularizers"):
        cfg.pop(key)
    cfg["recipe"] = "dr_grpo"
    cfg["loss"] = {"aggregation": "token_mean"}
    cfg["num_generations"] = 2
    cfg["rollout"].pop("num_generations")
    with caplog.at_level(logging.INFO, logger="grouprl"):
        Trainer(cfg, train_dataset=arith_rows()).train()
    text = caplog.text
    assert "TRL num_generations=2 -> rollout.num_generations=2" in text
    assert "recipe dr_grpo: Dr. GRPO" in text
    assert (
        "overrides the recipe's loss.aggregation: 'seq_mean_token_sum_norm' -> 'token_mean'" in text
    )
    assert "reference policy: none (no KL term)" in text and "shared prefix on" in text


def test_the_yaml_of_docs_from_trl_resolves():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "from_trl.md").read_text()
    block = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "loss_type" in b]
    cfg = load_config(yaml.safe_load(block[0]))
    assert cfg.train.output_dir == "runs/qwen-grpo" and cfg.train.max_steps == 500
    assert cfg.rollout.max_new_tokens == 1024 and cfg.rollout.engine == "vllm"
    assert cfg.regularizers[0]["beta"] == 0.04 and cfg.advantage["scale"] == "batch"
    assert cfg.loss["aggregation"] == "seq_mean_token_sum_norm"
    assert cfg.rewards == ["trl.rewards:accuracy_reward"]
