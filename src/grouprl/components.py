"""Build the configured algorithm components from their registries.

The trainer only ever sees the objects built here, so adding a method means registering
a component and writing a recipe, never editing the trainer. Compatibility between
components is checked here too, at start-up, with the config key to blame.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grouprl.config import Config, ConfigError
from grouprl.registry import BoundComponent, Registry, RegistryError

# Inputs the trainer can hand to advantage estimators / modifiers, by parameter name.
ADVANTAGE_INPUTS = (
    "rewards_BG",
    "rewards_BGK",
    "weights_K",
    "lengths_BG",
    "truncated_BG",
    "seq_logp_BG",
    "answers_BG",
    "baseline_B",
    "prompt_keys_B",
    "adv_BG",
)


@dataclass
class Components:
    advantage: BoundComponent  # inputs by name -> adv_BG
    modifiers: list[BoundComponent]  # (adv_BG, inputs...) -> adv_BG
    loss: Callable[..., Any]  # PolicyInputs -> TermOutput
    loss_fn: Any  # the registered function (its attributes: needs_whole_groups, needs_ref)
    aggregation: Callable[..., Any]  # (values_NT, mask_NT, BatchNorm) -> scalar
    aggregation_name: str
    regularizers: list[Any]
    token_mask: BoundComponent | None = None
    sample_filters: list[BoundComponent] = field(default_factory=list)

    @property
    def needs_ref(self) -> bool:
        return bool(getattr(self.loss_fn, "needs_ref", False)) or any(
            getattr(r, "needs_ref", False) for r in self.regularizers
        )

    @property
    def needs_entropy_grad(self) -> bool:
        return any(getattr(r, "needs_entropy", False) for r in self.regularizers)

    @property
    def needs_whole_groups(self) -> bool:
        return bool(getattr(self.loss_fn, "needs_whole_groups", False))

    def advantage_inputs(self) -> set[str]:
        names = set(self.advantage.input_names)
        for m in self.modifiers:
            names |= set(m.input_names)
        return names

    def stateful(self) -> dict[str, Any]:
        """Components that keep state across steps (saved in checkpoints)."""
        out = {f"advantage/{self.advantage.name}": self.advantage}
        out.update({f"modifier/{m.name}": m for m in self.modifiers})
        if self.token_mask is not None:
            out[f"token_mask/{self.token_mask.name}"] = self.token_mask
        out.update({f"sample_filter/{f.name}": f for f in self.sample_filters})
        stateful: dict[str, Any] = {k: v for k, v in out.items() if v.instance is not None}
        for i, reg in enumerate(self.regularizers):  # e.g. entropy-band bounds
            if hasattr(reg, "state_dict"):
                stateful[f"regularizer/{i}/{type(reg).__name__}"] = reg
        return stateful


def split_spec(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    params = dict(spec)
    return str(params.pop("name")), params


def _bind(
    registry: Registry, key: str, spec: dict[str, Any], allowed: tuple[str, ...] | None = None
) -> BoundComponent:
    name, params = split_spec(spec)
    try:
        bound = BoundComponent.build(registry, name, params)
    except (RegistryError, ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if allowed is not None:
        unknown = [n for n in bound.required_inputs if n not in allowed]
        if unknown:
            raise ConfigError(
                f"{key}: {registry.kind} {name!r} needs inputs the trainer does not provide: {unknown}"
            )
    return bound


def build_components(cfg: Config) -> Components:
    comps = _build_components(cfg)
    check_compatible(comps, cfg)
    probe_components(cfg)
    return comps


def _build_components(cfg: Config) -> Components:
    from grouprl.algorithms import ADVANTAGES, AGGREGATIONS, LOSSES, REGULARIZERS
    from grouprl.algorithms.advantages import ADVANTAGE_MODIFIERS
    from grouprl.algorithms.selection import (
        SAMPLE_FILTER_INPUTS,
        SAMPLE_FILTERS,
        TOKEN_MASK_INPUTS,
        TOKEN_MASKS,
    )

    adv_spec = dict(cfg.advantage)
    modifier_specs = adv_spec.pop("modifiers", None) or []
    if not isinstance(modifier_specs, list):
        raise ConfigError("advantage.modifiers: expected a list of {name: ..., params...}")
    loss_spec = dict(cfg.loss)
    agg_name = str(loss_spec.pop("aggregation", "token_mean"))
    try:
        aggregation = AGGREGATIONS.get(agg_name)
    except RegistryError as exc:
        raise ConfigError(f"loss.aggregation: {exc}") from None
    loss_name, loss_params = split_spec(loss_spec)
    try:
        loss_fn = LOSSES.get(loss_name)
        LOSSES.check_params(loss_name, loss_params, where="loss")
        loss = functools.partial(loss_fn, **loss_params)
    except RegistryError as exc:
        raise ConfigError(f"loss: {exc}") from None
    regs = []
    for i, spec in enumerate(cfg.regularizers):
        name, params = split_spec(spec)
        try:
            regs.append(REGULARIZERS.build(name, **params))
        except (RegistryError, ValueError, TypeError) as exc:
            raise ConfigError(f"regularizers.{i}: {exc}") from None
    comps = Components(
        advantage=_bind(ADVANTAGES, "advantage", adv_spec, ADVANTAGE_INPUTS),
        modifiers=[
            _bind(ADVANTAGE_MODIFIERS, f"advantage.modifiers.{i}", m, ADVANTAGE_INPUTS)
            for i, m in enumerate(modifier_specs)
        ],
        loss=loss,
        loss_fn=loss_fn,
        aggregation=aggregation,
        aggregation_name=agg_name,
        regularizers=regs,
        token_mask=_bind(TOKEN_MASKS, "token_mask", cfg.token_mask, TOKEN_MASK_INPUTS)
        if cfg.token_mask
        else None,
        sample_filters=[
            _bind(SAMPLE_FILTERS, f"sample_filters.{i}", f, SAMPLE_FILTER_INPUTS)
            for i, f in enumerate(cfg.sample_filters)
        ],
    )
    return comps


def _probe_inputs() -> dict[str, Any]:
    """A tiny batch (B=2 prompts, G=2, T=3) of every input a component may name."""
    import torch

    from grouprl.algorithms.types import BatchNorm, PolicyInputs

    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    logp = torch.full((4, 3), -1.0)
    return {
        "rewards_BG": torch.tensor([[0.0, 1.0], [1.0, 1.0]]),
        "rewards_BGK": torch.tensor([[[0.0], [1.0]], [[1.0], [1.0]]]),
        "weights_K": torch.tensor([1.0]),
        "lengths_BG": torch.tensor([[2.0, 3.0], [1.0, 2.0]]),
        "truncated_BG": torch.zeros(2, 2, dtype=torch.bool),
        "seq_logp_BG": torch.tensor([[-2.0, -3.0], [-1.0, -2.0]]),
        "answers_BG": [["1", "2"], ["1", "1"]],
        "baseline_B": torch.tensor([0.5, 1.0]),
        "prompt_keys_B": ["probe-a", "probe-b"],
        "adv_BG": torch.tensor([[-1.0, 1.0], [0.0, 0.0]]),
        "adv_N": torch.tensor([-1.0, 1.0, 0.0, 0.0]),
        "entropy_NT": torch.tensor(
            [[0.5, 1.0, 0.0], [0.2, 0.1, 0.9], [0.3, 0.0, 0.0], [0.7, 0.4, 0.0]]
        ),
        "mask_NT": mask,
        "completion_ids_NT": torch.tensor([[1, 2, 0], [1, 3, 4], [5, 0, 0], [1, 2, 0]]),
        "group_N": torch.tensor([0, 0, 1, 1]),
        "old_logp_NT": logp,
        "step": 0,
        "max_steps": 10,
        "policy": PolicyInputs(
            logp_NT=logp.clone(),
            old_logp_NT=logp,
            mask_NT=mask,
            adv_N=torch.tensor([-1.0, 1.0, 0.0, 0.0]),
            entropy_NT=torch.full((4, 3), 0.5),
            ref_logp_NT=logp,
            rewards_N=torch.tensor([0.0, 1.0, 1.0, 1.0]),
            group_N=torch.tensor([0, 0, 1, 1]),
            norm=BatchNorm.of(mask, 3, 2),
        ),
    }


def probe_components(cfg: Config) -> None:
    """Run fresh copies of the configured components once on a tiny synthetic batch, so a
    bad parameter value (`advantage.scale=x`, `token_mask.rho=2`) fails at start-up with
    its config key, not at the first step after the model has loaded."""
    fresh = _build_components(cfg)  # throwaway instances: no state is touched
    inputs = _probe_inputs()
    checks: list[tuple[str, Callable[[], Any]]] = [
        ("advantage", lambda: fresh.advantage(inputs)),
        *(
            (f"advantage.modifiers.{i}", (lambda m=m: m(inputs)))
            for i, m in enumerate(fresh.modifiers)
        ),
        ("loss", lambda: fresh.loss(inputs["policy"])),
        *(
            (f"regularizers.{i}", (lambda r=r: r(inputs["policy"])))
            for i, r in enumerate(fresh.regularizers)
        ),
        *(
            (f"sample_filters.{i}", (lambda f=f: f(inputs)))
            for i, f in enumerate(fresh.sample_filters)
        ),
    ]
    if fresh.token_mask is not None:
        checks.append(("token_mask", lambda: fresh.token_mask(inputs)))
    for key, run in checks:
        try:
            run()
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{key}: {exc}") from None


def check_compatible(comps: Components, cfg: Config) -> None:
    """Combinations that cannot work, refused at start-up with the reason."""
    if comps.token_mask is not None and comps.needs_whole_groups:
        raise ConfigError(
            f"token_mask: loss {comps.loss_fn.__name__!r} scores whole sequences per group and "
            f"cannot use a per-token mask ({comps.token_mask.name}); drop one of them"
        )
    refills = [f.name for f in comps.sample_filters if f.refill]
    if len(refills) > 1:
        raise ConfigError(f"sample_filters: only one refilling filter at a time, got {refills}")
    if "baseline_B" in comps.advantage_inputs() and cfg.rollout.temperature == 0:
        raise ConfigError("advantage: remax's greedy baseline equals the samples at temperature 0")
    if comps.advantage.name == "single_stream" and cfg.rollout.num_generations != 1:
        raise ConfigError(
            f"rollout.num_generations: single_stream samples one completion per prompt, got {cfg.rollout.num_generations}"
        )


def build_rewards(cfg: Config) -> Any:
    from grouprl.rewards import RewardSet

    items = list(cfg.rewards) + list(cfg.extra_rewards)
    if not items:
        raise ConfigError(
            "rewards: no reward function configured; add e.g. rewards: [math_accuracy]"
        )
    try:
        return RewardSet.from_config(items)
    except ConfigError:
        raise
    except Exception as exc:  # file not found, bad function name, unknown key...
        raise ConfigError(f"rewards: {exc}") from None


def check_components(cfg: Config) -> None:
    build_components(cfg)
