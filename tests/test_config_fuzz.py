"""Property tests of config loading: any input gives a Config or a ConfigError naming its key.

Random config dicts mix the real sections and keys with random ones, and hold values of
every YAML type (NaN, inf, huge numbers, empty and unicode strings, lone surrogates, lists,
mappings); random overrides include malformed ones. `grouprl.load_config` must answer each
with a Config or a ConfigError whose message starts with a key path (or says what is wrong
with an override), never another exception type.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grouprl.algorithms import ADVANTAGES, AGGREGATIONS, LOSSES, REGULARIZERS
from grouprl.algorithms.advantages import ADVANTAGE_MODIFIERS
from grouprl.algorithms.selection import SAMPLE_FILTERS, TOKEN_MASKS
from grouprl.components import load_config
from grouprl.config import (
    Config,
    ConfigError,
    config_key,
    dump_config,
    load_recipe,
    recipe_names,
    required_keys,
    yaml_load,
)
from grouprl.rewards import REWARDS

FUZZ = settings(
    max_examples=int(os.environ.get("GROUPRL_FUZZ_EXAMPLES", 250)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not os.environ.get("GROUPRL_FUZZ_EXAMPLES"),  # set it to explore more
    database=None,
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config-fuzz")


SECTIONS = ("model", "data", "rollout", "train")
TOP_KEYS = [f.name for f in dataclasses.fields(Config)]
DOTTED = [
    f"{s}.{config_key(f)}" for s in SECTIONS for f in dataclasses.fields(type(getattr(Config(), s)))
]
COMPONENT_NAMES = (
    ADVANTAGES.names()
    + LOSSES.names()
    + REGULARIZERS.names()
    + TOKEN_MASKS.names()
    + SAMPLE_FILTERS.names()
    + ADVANTAGE_MODIFIERS.names()
    + AGGREGATIONS.names()
    + REWARDS.names()
)
CHOICES = ["auto", "on", "off", "error", "skip", "never", "cosine", "constant", "float32", "cpu"]

# Strings that have broken loaders: empty, blank, unicode, lone surrogates, YAML 1.1 words.
ODD_TEXT = st.sampled_from(
    ["", " ", "on", "off", "yes", "no", "y", "n", "1e5", "010", "1:30", "\ud800", "ключ", "a.b"]
)
text = st.one_of(st.text(max_size=12), ODD_TEXT, st.sampled_from(COMPONENT_NAMES + CHOICES))
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, 1e-6, 1e300, -0.0]),
)
scalars = st.one_of(numbers, text, st.booleans(), st.none())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(text, st.integers()), inner, max_size=3),
    ),
    max_leaves=6,
)


def _typed(tp: object) -> st.SearchStrategy:
    """Mostly values of the field's own type (so loading gets past the type checks to the
    range checks and the components), sometimes anything."""
    name = str(tp)
    if "bool" in name:
        right: st.SearchStrategy = st.booleans()
    elif "int" in name:
        right = st.one_of(st.integers(0, 70), st.integers(-3, 2**40))
    elif "float" in name and "list" in name:
        right = st.lists(st.one_of(st.floats(0, 1), st.floats()), max_size=3)
    elif "float" in name:
        right = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True))
    elif "dict" in name:
        right = st.dictionaries(text, values, max_size=2)
    else:
        right = text
    return st.integers(0, 9).flatmap(lambda i: values if i == 0 else right)


FIELD_TYPES = {
    s: {config_key(f): f.type for f in dataclasses.fields(type(getattr(Config(), s)))}
    for s in SECTIONS
}
PARAM_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 10),
    st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, -1.0, "group", "batch", "none", "k3", "top_k"]),
    values,
)
PARAM_NAMES = st.sampled_from(
    ["scale", "eps", "beta", "rho", "eps_low", "eps_high", "alpha", "r_max", "num_virtual", "mode"]
    + ["bundle_size", "quantile_mode", "credit", "estimator", "coef", "tau", "weight", "params"]
)


@st.composite
def component(draw: st.DrawFn, names: list[str]) -> object:
    """A component mapping: a real or random name, with real-looking or random parameters."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    spec = draw(
        st.dictionaries(st.one_of(PARAM_NAMES, PARAM_NAMES, text), PARAM_VALUES, max_size=3)
    )
    if draw(st.integers(0, 9)) > 0:
        spec["name"] = draw(st.sampled_from(names) if draw(st.integers(0, 9)) else text)
    return spec


@st.composite
def section(draw: st.DrawFn, name: str) -> object:
    if draw(st.integers(0, 19)) == 0:
        return draw(values)  # a section that is not a mapping
    types = FIELD_TYPES[name]
    out = {}
    for key in draw(st.lists(st.sampled_from(sorted(types)), max_size=4)):
        out[key] = draw(_typed(types[key]))
    if draw(st.integers(0, 19)) == 0:
        out[draw(text)] = draw(values)
    return out


@st.composite
def config_dicts(draw: st.DrawFn) -> dict:
    d: dict = {}
    for name in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=6, unique=True)):
        if name in SECTIONS:
            d[name] = draw(section(name))
        elif name == "advantage":
            adv = draw(component(ADVANTAGES.names()))
            if isinstance(adv, dict) and draw(st.booleans()):
                adv["modifiers"] = draw(
                    st.one_of(st.lists(component(ADVANTAGE_MODIFIERS.names()), max_size=2), values)
                )
            d[name] = adv
        elif name == "loss":
            loss = draw(component(LOSSES.names()))
            if isinstance(loss, dict) and draw(st.booleans()):
                loss["aggregation"] = draw(st.one_of(st.sampled_from(AGGREGATIONS.names()), values))
            d[name] = loss
        elif name == "token_mask":
            d[name] = draw(st.one_of(st.none(), component(TOKEN_MASKS.names())))
        elif name == "regularizers":
            d[name] = draw(st.one_of(st.lists(component(REGULARIZERS.names()), max_size=2), values))
        elif name == "sample_filters":
            d[name] = draw(
                st.one_of(st.lists(component(SAMPLE_FILTERS.names()), max_size=2), values)
            )
        elif name in ("rewards", "extra_rewards"):
            item = st.one_of(st.sampled_from(REWARDS.names()), component(REWARDS.names()), values)
            d[name] = draw(st.one_of(st.lists(item, max_size=2), values))
        elif name == "recipe":
            d[name] = draw(st.one_of(st.sampled_from(recipe_names()), values))
    if draw(st.integers(0, 19)) == 0:
        d[draw(text)] = draw(values)
    return d


override_values = st.one_of(
    text,
    st.sampled_from(
        ["1", "-1", "0", ".inf", ".nan", "1e400", "[1, 2]", "{a: 1}", "[", "{", "!!int x", "'", "~"]
    ),
    st.sampled_from(["!!float abc", "!!binary x", "&a 1", "*a", "? a", "1" * 5000]),
)
override_keys = st.one_of(
    st.sampled_from(DOTTED + ["recipe", "advantage.name", "loss.eps_high", "regularizers.0.beta"]),
    st.sampled_from(["", ".", "train.", ".seed", "train..seed", "train.seed.x", "rewards.9"]),
    text,
)
well_formed = st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), st.one_of(text, override_values)
)
anything = st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values), text)
overrides = st.lists(
    st.integers(0, 9).flatmap(lambda i: anything if i == 0 else well_formed), max_size=2
)


def _printable(s: str) -> str:
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _places(d: dict, ovs: list) -> set[str]:
    """What a message may start with: a section or key of the input, or an override's key."""
    places = set(TOP_KEYS) | {"override", "overrides", "config", "recipe"}
    places |= {_printable(str(k)) for k in d} | {_printable(repr(k)) for k in d}
    places.discard("")  # a message never starts with an empty key
    for o in ovs:
        if isinstance(o, str) and "=" in o:
            places.add(_printable(o.split("=", 1)[0].strip().split(".")[0]))
    return places


def _check_outcome(d: dict, ovs: list) -> None:
    try:
        cfg = load_config(d, ovs)
    except ConfigError as exc:
        msg = str(exc)
        msg.encode("utf-8")  # printable: no lone surrogates
        places = _places(d, ovs)
        assert any(msg.startswith((p + ":", p + ".", p + " ")) for p in places), msg
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(config_dicts(), overrides)
def test_any_config_dict_loads_or_fails_naming_its_key(d: dict, ovs: list) -> None:
    _check_outcome(d, ovs)


@FUZZ
@given(st.dictionaries(st.sampled_from(DOTTED), values, max_size=3), overrides)
def test_any_known_key_with_any_value(flat: dict, ovs: list) -> None:
    d: dict = {}
    for dotted, value in flat.items():
        sec, key = dotted.split(".")
        d.setdefault(sec, {})[key] = value
    _check_outcome(d, ovs)


# ---------------------------------------------------------------- round trip


def _nonempty(s: str) -> bool:
    return bool(s.strip())


valid_changes = st.fixed_dictionaries(
    {},
    optional={
        # valid without more input: not the recipes that need the user's reward model
        "recipe": st.sampled_from([n for n in recipe_names() if not required_keys(load_recipe(n))]),
        "model": st.fixed_dictionaries(
            {},
            optional={
                "name_or_path": st.text(max_size=8),
                "device": st.sampled_from(["auto", "cpu", "cuda:1"]),
                "shared_prefix": st.sampled_from(["auto", "on", "off"]),
                "logprob_chunk_size": st.integers(0, 10**6),
            },
        ),
        "data": st.fixed_dictionaries(
            {},
            optional={
                "path": st.one_of(st.none(), st.text(max_size=8)),
                "system_prompt": st.one_of(st.none(), text),
                "prompt_column": st.text(min_size=1, max_size=8).filter(_nonempty),
                "task_params": st.dictionaries(st.text(max_size=4), scalars, max_size=2),
            },
        ),
        "rollout": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(0.01, 10),
                "top_p": st.floats(0.01, 1),
                "top_k": st.integers(0, 100),
            },
        ),
        "train": st.fixed_dictionaries(
            {},
            optional={
                "learning_rate": st.floats(0, 1),
                "max_grad_norm": st.one_of(st.floats(1e-3, 1e6), st.just(math.inf)),
                "adam_betas": st.lists(st.floats(0, 0.999), min_size=2, max_size=2),
                "output_dir": st.text(min_size=1, max_size=8).filter(_nonempty),
                "seed": st.integers(0, 2**32 - 1),
            },
        ),
    },
)


@FUZZ
@given(valid_changes)
def test_a_valid_config_round_trips_through_dump_config(fuzz_dir: Path, d: dict) -> None:
    cfg = load_config(d)
    path = fuzz_dir / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    again = load_config(path)
    assert dump_config(again) == dump_config(cfg)  # text: NaN params compare equal too


# ---------------------------------------------------------------- component parameters

SECTION_REGISTRIES = {
    "advantage": ADVANTAGES,
    "loss": LOSSES,
    "regularizers": REGULARIZERS,
    "token_mask": TOKEN_MASKS,
    "sample_filters": SAMPLE_FILTERS,
    "advantage.modifiers": ADVANTAGE_MODIFIERS,
}


def _param_names(registry, name: str) -> list[str]:
    from grouprl.registry import config_params, keyword_params

    return sorted(config_params(registry.get(name)) or keyword_params(registry.get(name)) or [])


@st.composite
def one_component(draw: st.DrawFn) -> dict:
    """A config whose one component has its real parameter names with random values."""
    where = draw(st.sampled_from(sorted(SECTION_REGISTRIES)))
    registry = SECTION_REGISTRIES[where]
    name = draw(st.sampled_from(registry.names()))
    names = _param_names(registry, name)
    spec = {"name": name}
    if names:
        spec |= draw(st.dictionaries(st.sampled_from(names), PARAM_VALUES, max_size=3))
    if where == "advantage.modifiers":
        return {"advantage": {"name": "grpo", "modifiers": [spec]}}
    if where in ("regularizers", "sample_filters"):
        return {where: [spec]}
    return {where: spec}


@FUZZ
@given(one_component())
def test_real_component_parameters_with_any_value(d: dict) -> None:
    _check_outcome(d, [])


# pieces of YAML: structure, YAML 1.1 words, tags, anchors, escapes, control characters
YAML_PIECES = ["train:", " seed:", " {", "}", "[", "]", ": ", "\n", "  ", "- ", "on", "1e5"]
YAML_PIECES += ["!!int x", '"\\ud800"', "&a", "*a", "\t", "model: {shared_prefix: on}"]
YAML_PIECES += ["\udcff", "\x00"]
yaml_text = st.one_of(
    st.text(max_size=40), st.lists(st.sampled_from(YAML_PIECES), max_size=8).map("".join)
)


@FUZZ
@given(
    st.one_of(yaml_text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=30))
)
def test_any_yaml_file_loads_or_fails_naming_the_file_or_key(fuzz_dir: Path, raw: bytes) -> None:
    path = fuzz_dir / "any.yaml"
    path.write_bytes(raw)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        msg = str(exc)
        msg.encode("utf-8")
        if msg.startswith(str(path)):  # unreadable, not YAML, not a mapping
            return
        top = yaml_load(raw.decode("utf-8"))  # it parsed: the message names one of its keys
        places = _places(top, [])
        assert any(msg.startswith((p + ":", p + ".", p + " ")) for p in places), msg
    else:
        assert isinstance(cfg, Config)
