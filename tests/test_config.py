"""Config loading: YAML, recipes, overrides and the errors they give."""

from __future__ import annotations

import pytest

from grouprl.components import load_config
from grouprl.config import ConfigError, recipe_names


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "model: {name_or_path: m}\ntrain: {learning_rate: 1.0e-5, max_steps: 7}\n")
    cfg = load_config(p, ["train.max_steps=9", "rollout.temperature=0.7", "loss.eps_high=0.28"])
    assert cfg.train.learning_rate == 1e-5
    assert cfg.train.max_steps == 9
    assert cfg.rollout.temperature == 0.7
    assert cfg.loss["eps_high"] == 0.28


def test_recipe_merges_under_user_config(tmp_path):
    p = write(tmp_path, "recipe: dr_grpo\nloss: {eps_high: 0.3}\n")
    cfg = load_config(p)
    assert cfg.advantage == {"name": "grpo", "scale": "none"}
    assert cfg.loss["aggregation"] == "seq_mean_token_sum_norm"
    assert cfg.loss["eps_high"] == 0.3  # the user's value wins over the recipe's
    assert cfg.regularizers == []
    grpo = load_config({"recipe": "grpo"})
    assert grpo.regularizers == [{"name": "kl", "beta": 0.04, "estimator": "k3"}]
    # recipe chosen on the command line
    assert load_config(p, ["recipe=grpo"]).advantage["scale"] == "group"
    assert {"grpo", "dr_grpo"} <= set(recipe_names())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learning_rat=1", 'train.learning_rat: unknown key (did you mean "learning_rate"?)'),
        ("trian.seed=1", 'trian: unknown key (did you mean "train"?)'),
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
        ("train.progress=maybe", "train.progress: expected true or false"),
        (
            "data.on_bad_row=skipp",
            "data.on_bad_row: 'skipp' is not one of error, skip (did you mean \"skip\"?)",
        ),
        (
            "loss.eps_hihg=0.3",
            "loss.eps_hihg: loss 'ppo_clip' has no parameter 'eps_hihg' (did you mean \"eps_high\"?)",
        ),
        ("advantage.name=grp", "advantage: unknown advantage 'grp' (did you mean \"grpo\"?)"),
        (
            "loss.aggregation=token_men",
            "loss.aggregation: unknown aggregation 'token_men' (did you mean \"token_mean\"?)",
        ),
        ("regularizers=[{name: kl, beta: -1}]", "regularizers.0:"),
        ("advantage.scale=x", "advantage: grpo: scale must be one of group, batch, none; got 'x'"),
        ("loss.eps_low=-1", "loss:"),
        ("recipe=drgrpo", "recipe: unknown recipe 'drgrpo' (did you mean \"dr_grpo\"?)"),
        ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1]"),
        ("train.max_steps", "is not of the form section.key=value"),
    ],
)
def test_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config({}, [override])
    assert expected in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_exponent_floats_are_numbers(tmp_path):
    # PyYAML's YAML 1.1 rules would read "1e-6" as a string; configs must not
    p = write(tmp_path, "train: {learning_rate: 1e-6}\nloss: {eps_high: 2e-1}\n")
    cfg = load_config(p, ["train.weight_decay=1e-2"])
    assert (
        cfg.train.learning_rate == 1e-6
        and cfg.loss["eps_high"] == 0.2
        and cfg.train.weight_decay == 0.01
    )


def test_switching_component_on_the_command_line_drops_old_params():
    cfg = load_config({"recipe": "dapo"}, ["loss.name=cispo"])
    assert cfg.loss == {"name": "cispo", "aggregation": "token_mean"}


def test_bad_component_values_fail_at_start_up():
    with pytest.raises(ConfigError, match=r"token_mask: forking_tokens.rho must be in \(0, 1\]"):
        load_config({"recipe": "forking_tokens"}, ["token_mask.rho=2"])
