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


# ---------------------------------------------------------------- values refused at start-up


@pytest.mark.parametrize(
    "override, expected",
    [
        # gradients are scaled by max_grad_norm / norm: 0 zeroes them, -1 reverses them
        ("train.max_grad_norm=-1", "train.max_grad_norm: must be > 0, got -1.0"),
        ("train.max_grad_norm=0", "train.max_grad_norm: must be > 0, got 0.0"),
        ("train.max_grad_norm=.nan", "train.max_grad_norm: must be > 0, got nan"),
        ("rollout.top_k=-1", "rollout.top_k: must be >= 0, got -1"),
        ("rollout.top_p=0", "rollout.top_p: must be in (0, 1], got 0.0"),
        ("rollout.temperature=.inf", "rollout.temperature: must be a finite number >= 0.0"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens: must be >= 1, got 0"),
        ("train.adam_betas=[0.9]", "train.adam_betas: expected two numbers in [0, 1), got [0.9]"),
        ("train.adam_betas=[0.9, 1.0]", "train.adam_betas: expected two numbers in [0, 1)"),
        ("train.adam_betas=[-0.1, 0.9]", "train.adam_betas: expected two numbers in [0, 1)"),
        ("train.adam_betas=[.nan, 0.9]", "train.adam_betas: expected two numbers in [0, 1)"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be a finite number >= 0.0"),
        ("train.learning_rate=.nan", "train.learning_rate: must be a finite number >= 0.0"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1, got 0"),
        ("train.reward_failure_limit=0", "train.reward_failure_limit: must be in (0, 1]"),
        ("train.reward_failure_limit=1.5", "train.reward_failure_limit: must be in (0, 1]"),
        ("train.reward_failure_window=0", "train.reward_failure_window: must be >= 1, got 0"),
        ("train.save_every=-1", "train.save_every: must be >= 0, got -1"),
        ("train.eval_every=-1", "train.eval_every: must be >= 0, got -1"),
        ("train.eval_samples=0", "train.eval_samples: must be >= 1, got 0"),
        ("train.eval_limit=-1", "train.eval_limit: must be >= 0, got -1"),
        ("train.seed=-1", "train.seed: must be in [0, 2**32)"),
        ("train.seed=4294967296", "train.seed: must be in [0, 2**32)"),
        ("train.output_dir=' '", "train.output_dir: must not be empty"),
        ("data.prompt_column=''", "data.prompt_column: must not be empty"),
        ("model.logprob_chunk_size=-1", "model.logprob_chunk_size: must be >= 0, got -1"),
        ("model.device=gpu", "model.device: 'gpu' is not a device (auto, cpu, cuda, cuda:N, mps)"),
        ("model.device=cuda:-1", "model.device: 'cuda:-1' is not a device"),
        ("model.device=meta", "model.device: 'meta' holds no data"),
        # G = 1 with a group-relative estimator: every advantage would be 0
        (
            "rollout.num_generations=1",
            "rollout.num_generations: advantage 'grpo' needs at least 2 completions per prompt "
            "(the update's group size), got 1",
        ),
        (
            "rollout.num_train_samples=1",
            "rollout.num_train_samples: advantage 'grpo' needs at least 2 completions per prompt",
        ),
        # greedy sampling: the G completions are identical, every advantage 0
        ("rollout.temperature=0", "rollout.temperature: 0 samples greedily, so the 8 completions"),
        ("rewards=[exact_mach]", "rewards.0: unknown reward 'exact_mach' (did you mean"),
        (
            "rewards=[5]",
            "rewards.0: expected a reward name, 'file.py:function' or 'module:function'",
        ),
        ("rewards=[{name: exact_match, wieght: 2}]", "rewards.0: reward: unknown key 'wieght'"),
        ("rewards=[{name: 5}]", "rewards.0: name must be a non-empty string, got 5"),
        ("rewards=[{name: exact_match, weight: .nan}]", "rewards.0.weight: must be a finite"),
        ("rewards=[{name: exact_match, weight: 0}]", "rewards: every reward has weight 0"),
        ("rewards=[exact_match, exact_match]", "rewards.1: a second reward named 'exact_match'"),
        ("advantage.modifiers=[5]", "advantage.modifiers.0: expected a mapping with a 'name' key"),
        ("advantage.modifiers=seed", "advantage.modifiers: expected a list"),
        ("advantage.name=5", "advantage.name: expected a component name, got 5"),
        ("loss.aggregation=[1]", "loss.aggregation: expected an aggregation name, got [1]"),
        ("recipe=5", "recipe: expected a recipe name, got 5"),
        ("train.seed.x.y=1", "train.seed.x: train.seed is 0, not a section"),
        ("train.max_steps=!!int x", "train.max_steps: cannot parse value '!!int x'"),
    ],
)
def test_values_that_cannot_work_are_refused_with_their_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config({}, [override])
    assert str(err.value).startswith(expected), str(err.value)


def test_what_the_refusals_leave_allowed():
    cfg = load_config({}, ["train.max_grad_norm=.inf", "model.device=cuda:1"])  # no clipping
    assert cfg.train.max_grad_norm == float("inf") and cfg.model.device == "cuda:1"
    assert load_config({}, ["train.learning_rate=0"]).train.learning_rate == 0.0  # frozen
    assert load_config({}, ["rollout.num_train_samples=2"]).rollout.num_train_samples == 2
    # estimators that do not compare a completion with its group work with G = 1
    assert load_config({"recipe": "remax"}, ["rollout.num_generations=1"])
    assert load_config({"recipe": "single_stream"}, ["rollout.temperature=0"])


@pytest.mark.parametrize("name", ["grpo", "rloo", "bnpo", "ngrpo", "gdpo", "riskpo"])
def test_group_relative_estimators_refuse_a_group_of_one(name):
    with pytest.raises(ConfigError, match=f"rollout.num_generations: advantage '{name}' needs"):
        load_config({"advantage": {"name": name}}, ["rollout.num_generations=1"])


@pytest.mark.parametrize(
    "source, expected",
    [
        (["train.seed=1"], "config: expected a YAML file path or a mapping, got list"),
        ({"": 1}, "'': unknown key"),
        ({"model": {"a b": 1}}, "model.'a b': unknown key"),
        ({"model": {"x\ud800": 1}}, "model.x\\ud800: unknown key"),  # printable
    ],
)
def test_odd_sources_and_keys(source, expected):
    with pytest.raises(ConfigError) as err:
        load_config(source)
    assert str(err.value).startswith(expected)
    str(err.value).encode("utf-8")


def test_odd_overrides():
    with pytest.raises(ConfigError, match="^overrides: expected a list of 'section.key=value'"):
        load_config({}, "train.seed=1")
    with pytest.raises(ConfigError, match="^override 5 is not a string"):
        load_config({}, [5])


@pytest.mark.parametrize("raw", ["|", ">", "#", "#x", "&a"])
def test_a_character_yaml_reads_as_nothing_stays_that_character(raw):
    # YAML reads `|` / `>` as empty block scalars, `#...` as a comment, `&a` as an anchor
    # of nothing: an override of a marker such as think_end=| meant the character
    cfg = load_config(
        {"rollout": {"strategy": {"name": "serial_exit"}}}, [f"rollout.strategy.think_end={raw}"]
    )
    assert cfg.rollout.strategy["think_end"] == raw


@pytest.mark.parametrize(
    "raw,want",
    [("null", None), ("~", None), ("''", ""), ("", ""), ("null  # none", None), ("!!null", None)],
)
def test_spelled_out_nothing_is_still_nothing(raw, want):
    cfg = load_config({}, [f"rollout.strategy.think_end={raw}"])
    assert cfg.rollout.strategy["think_end"] == want


def test_unreadable_file_names_the_file(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_bytes(b"train: {seed: 1}\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: cannot read"):
        load_config(p)


# ---------------------------------------------------------------- YAML 1.2 scalars


@pytest.mark.parametrize("word", ["on", "off", "auto"])
def test_on_and_off_are_strings_in_files_and_overrides(tmp_path, word):
    p = write(tmp_path, f"model: {{shared_prefix: {word}}}\ntrain: {{collapse_monitor: {word}}}\n")
    cfg = load_config(p)
    assert cfg.model.shared_prefix == word and cfg.train.collapse_monitor == word
    cfg = load_config({}, [f"model.shared_prefix={word}", f"train.collapse_monitor={word}"])
    assert cfg.model.shared_prefix == word and cfg.train.collapse_monitor == word


def test_only_true_and_false_are_booleans(tmp_path):
    cfg = load_config(write(tmp_path, "train: {progress: false, resume: true}\n"))
    assert cfg.train.progress is False and cfg.train.resume is True
    assert load_config({}, ["train.progress=False"]).train.progress is False
    for word in ("yes", "no", "on", "off", "y", "n"):
        with pytest.raises(ConfigError) as err:
            load_config({}, [f"train.progress={word}"])
        assert str(err.value) == (
            f"train.progress: expected true or false, got '{word}' (only true and false are "
            "booleans)"
        )
    # YAML 1.2 strings elsewhere: `no` is a component name here, not False
    cfg = load_config({}, ["data.split=no", "data.system_prompt=yes"])
    assert cfg.data.split == "no" and cfg.data.system_prompt == "yes"


def test_a_boolean_for_a_choice_field_says_why(tmp_path):
    # yaml.safe_load (YAML 1.1) reads `shared_prefix: on` as True
    with pytest.raises(ConfigError) as err:
        load_config({"model": {"shared_prefix": True}})
    assert str(err.value).startswith(
        "model.shared_prefix: expected one of auto, on, off, got the boolean True; a YAML 1.1 "
        "loader (yaml.safe_load) reads unquoted on/off/yes/no as booleans"
    )


def test_yaml_12_numbers(tmp_path):
    p = write(
        tmp_path, "train: {seed: 010, max_steps: 1_000, save_every: 0x10}\ndata: {split: 1:30}\n"
    )
    cfg = load_config(p)
    assert (cfg.train.seed, cfg.train.max_steps, cfg.train.save_every) == (10, 1000, 16)
    assert cfg.data.split == "1:30"  # YAML 1.1: the sexagesimal integer 90


def test_dump_config_round_trips(tmp_path):
    from grouprl.config import dump_config

    cfg = load_config(
        {"recipe": "dapo", "model": {"shared_prefix": "on"}, "data": {"split": "1e5"}},
        ["train.max_grad_norm=.inf", "data.system_prompt='010'", "data.task_params={x: 'yes'}"],
    )
    text = dump_config(cfg)
    again = load_config(write(tmp_path, text))
    assert again == cfg
    assert again.data.split == "1e5" and again.data.system_prompt == "010"
