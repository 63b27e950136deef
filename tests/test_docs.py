"""The generated tables of docs/ match the code (registries, module layout, imports)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

GEN_PATH = Path(__file__).resolve().parents[1] / "docs" / "gen_tables.py"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_tables", GEN_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_tables"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return _load_generator()


def test_generated_tables_match_the_code(gen: ModuleType) -> None:
    diffs = gen.stale()
    stale = ", ".join(str(p.relative_to(gen.REPO)) for p in diffs)
    assert not diffs, (
        f"generated tables in {stale} differ from the code; run `{gen.REGENERATE}`\n"
        + "".join(diffs.values())
    )


def test_every_registry_has_a_table(gen: ModuleType) -> None:
    missing = gen.uncovered_registries()
    assert not missing, (
        f"registries without a table in docs/methods.md: {missing}; add them to "
        f"REGISTRY_TABLES in docs/gen_tables.py, a marker pair in docs/methods.md, and run "
        f"`{gen.REGENERATE}`"
    )


def test_no_import_cycles_between_modules(gen: ModuleType) -> None:
    # all imports, late ones (inside functions) included; TYPE_CHECKING ones excluded
    assert not gen.module_cycles(), gen.format_cycles()


def test_no_import_cycles_between_top_level_units(gen: ModuleType) -> None:
    assert not gen.unit_cycles(), gen.format_cycles()


# The start-up refusals that docs/methods.md quotes ("Combinations refused at start-up"):
# each message must be in the doc and be what load_config raises for that config.
REFUSALS = [
    (
        {"recipe": "disco"},
        ["token_mask.name=forking_tokens"],
        "token_mask: loss 'disco' scores whole sequences per group and cannot use a per-token mask",
    ),
    (
        {"sample_filters": [{"name": "dynamic_sampling"}, {"name": "dynamic_sampling"}]},
        [],
        "sample_filters: only one refilling filter at a time",
    ),
    (
        {"recipe": "remax"},
        ["rollout.temperature=0"],
        "advantage: remax's greedy baseline equals the samples at temperature 0",
    ),
    (
        {"recipe": "single_stream"},
        ["rollout.num_generations=4"],
        "rollout.num_generations: advantage 'single_stream' needs exactly 1 "
        "completions per prompt (the update's group size)",
    ),
    (
        {},
        ["rollout.num_train_samples=9"],
        "rollout.num_train_samples: must be between 0 (all) and rollout.num_generations",
    ),
    (
        {"recipe": "forking_tokens"},
        ["token_mask.roh=0.1"],
        "token_mask: token mask 'forking_tokens' has no parameter 'roh' (did you mean \"rho\"?)",
    ),
    (
        {},
        ["advantage.scale=x"],
        "advantage: grpo: scale must be one of group, batch, none; got 'x'",
    ),
    ({}, ["loss.eps_low=-1"], "loss: ppo_clip: eps_low and eps_high must be >= 0, got -1, 0.2"),
    ({"recipe": "riskpo"}, ["advantage.alpha=0.9"], "advantage: riskpo: need 0 < alpha < beta < 1"),
]


@pytest.mark.parametrize(("extra", "overrides", "message"), REFUSALS)
def test_quoted_start_up_refusals_are_what_load_config_raises(
    gen: ModuleType, extra: dict, overrides: list[str], message: str
) -> None:
    from grouprl import load_config
    from grouprl.config import ConfigError

    assert f"`{message}" in gen.METHODS_MD.read_text(encoding="utf-8"), "quote it in methods.md"
    cfg = {"model": {"name_or_path": "unused"}, "data": {"task": "arith"}, **extra}
    with pytest.raises(ConfigError) as info:
        load_config(cfg, overrides)
    assert str(info.value).startswith(message)


def test_replace_blocks_keeps_the_text_outside_the_markers(gen: ModuleType) -> None:
    text = "intro\n<!-- generated:t -->\nold\n<!-- /generated:t -->\noutro\n"
    out = gen.replace_blocks(text, {"t": "new\n"}, "doc")
    assert out == "intro\n<!-- generated:t -->\nnew\n<!-- /generated:t -->\noutro\n"
    with pytest.raises(gen.DocError, match="exactly one"):
        gen.replace_blocks("no markers", {"t": "new"}, "doc")
    with pytest.raises(gen.DocError, match="no generator: u"):
        gen.replace_blocks(text + "<!-- generated:u -->", {"t": "new"}, "doc")


def test_cycle_finder(gen: ModuleType) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert gen.strongly_connected(graph) == [["a", "b", "c"]]
