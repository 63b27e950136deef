"""The declared inputs, the typed capabilities and the planning stage's providers agree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from grouprl.algorithms import ADVANTAGES, LOSSES, REGULARIZERS
from grouprl.algorithms.advantages import ADVANTAGE_MODIFIERS
from grouprl.algorithms.selection import SAMPLE_FILTERS, TOKEN_MASKS
from grouprl.components import load_config
from grouprl.config import ConfigError
from grouprl.inputs import CONSUMERS, INPUTS, REDUCTIONS, STAGES, allowed_inputs, probe_inputs
from grouprl.registry import Registry, RegistryError, input_params
from grouprl.rewards import REWARDS
from grouprl.training.plan import PROVIDERS

SRC = Path(__file__).resolve().parents[1] / "src" / "grouprl"


def test_every_declared_input_has_one_provider_and_a_probe():
    assert set(PROVIDERS) == set(INPUTS)
    probes = probe_inputs()
    for name in INPUTS:
        spec = INPUTS.get(name)
        assert spec.stage in STAGES and spec.reduce in REDUCTIONS, name
        assert spec.consumers and spec.consumers <= set(CONSUMERS), name
        assert probes[name] is not None, name


@pytest.mark.parametrize(
    "registry, consumer",
    [
        (ADVANTAGES, "advantage"),
        (ADVANTAGE_MODIFIERS, "advantage"),
        (TOKEN_MASKS, "token_mask"),
        (SAMPLE_FILTERS, "sample_filter"),
    ],
)
def test_every_component_input_is_declared_for_its_kind(registry, consumer):
    allowed = set(allowed_inputs(consumer))
    for name in registry:
        assert set(input_params(registry.get(name))) <= allowed, (registry.kind, name)


def test_a_component_asking_for_an_undeclared_input_is_refused(monkeypatch):
    def needs_magic(rewards_BG, magic_BG):
        return rewards_BG

    monkeypatch.setitem(ADVANTAGES._items, "needs_magic", needs_magic)
    monkeypatch.setitem(ADVANTAGES._caps, "needs_magic", ADVANTAGES.capabilities("grpo"))
    with pytest.raises(ConfigError, match=r"advantage: .*'magic_BG'"):
        load_config({"advantage": {"name": "needs_magic"}})


def test_capabilities_are_declared_at_registration():
    reg = Registry("thing")
    with pytest.raises(RegistryError, match="unknown capabilities"):
        reg.register("x", needs_reff=True)
    assert LOSSES.capabilities("reg_grpo").whole_groups
    assert REGULARIZERS.capabilities("kl").needs_ref
    assert REGULARIZERS.capabilities("entropy_band").calibrates
    assert SAMPLE_FILTERS.capabilities("dynamic_sampling").refills
    assert REWARDS.capabilities("majority_vote").collapse_risk
    assert ADVANTAGES.capabilities("single_stream").max_group_size == 1
    assert not ADVANTAGES.capabilities("grpo").refills


def test_group_size_limits_come_from_capabilities():
    with pytest.raises(
        ConfigError,
        match=r"needs exactly 1 completions per prompt \(the update's group size\), got 4",
    ):
        load_config({"recipe": "single_stream"}, ["rollout.num_generations=4"])


def _compared_strings(path: Path) -> set[str]:
    """String constants inside comparisons (`x == "name"`, `"name" in names`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    out.add(part.value)
    return out


def test_the_engine_never_checks_a_component_name():
    names = set()
    for registry in (ADVANTAGES, ADVANTAGE_MODIFIERS, LOSSES, REGULARIZERS, TOKEN_MASKS):
        names |= set(registry)
    names |= set(SAMPLE_FILTERS) | set(REWARDS)
    files = [SRC / "components.py", *sorted((SRC / "training").glob("*.py"))]
    for f in files:
        if f.name == "sft.py":
            continue
        found = _compared_strings(f) & names
        assert not found, f"{f.name} names components {found}: declare a capability instead"


def test_no_capability_is_read_with_getattr():
    for f in [SRC / "components.py", *sorted((SRC / "training").glob("*.py"))]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
                attr = node.args[1] if len(node.args) > 1 else None
                assert not (
                    isinstance(attr, ast.Constant)
                    and str(attr.value).startswith(("needs_", "refill", "calibrat"))
                ), f"{f.name}: getattr({attr.value!r})"


def test_planning_inputs_are_cpu_tensors():
    """Components get CPU inputs whatever the model's device (no device logic in any of
    them); make_train_batch moves the planned tensors to the rollouts' device (checked on
    CUDA by tests/test_gpu.py)."""
    from grouprl.rollout.base import Rollouts
    from grouprl.training.collect import ScoredBatch
    from grouprl.training.plan import StepInputs

    def rollouts(device: str) -> Rollouts:
        mask = torch.ones(4, 3, device=device)
        return Rollouts(
            prompt_ids_NP=torch.ones(4, 2, dtype=torch.long, device=device),
            prompt_mask_NP=torch.ones(4, 2, device=device),
            completion_ids_NT=torch.ones(4, 3, dtype=torch.long, device=device),
            attention_mask_NT=mask,
            loss_mask_NT=mask.clone(),
            truncated_N=torch.zeros(4, dtype=torch.bool, device=device),
            completions=["a"] * 4,
            group_size=2,
        )

    batch = ScoredBatch(
        examples=[None, None],  # type: ignore[list-item]
        indices=[0, 1],
        rollouts=rollouts("cpu"),
        rewards_NK=torch.zeros(4, 1),
        rewards_N=torch.zeros(4),
    )
    inputs = StepInputs(
        batch, torch.ones(1), lambda r, e: {}, with_entropy=False, step=0, max_steps=1
    )
    for name in ("group_N", "mask_NT", "rewards_BG", "lengths_BG"):
        assert inputs[name].device.type == "cpu", name
    assert inputs["group_N"].tolist() == [0, 0, 1, 1]
