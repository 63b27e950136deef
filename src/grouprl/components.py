"""Build the configured algorithm components from their registries.

The trainer only ever sees the objects built here, so adding a method means registering
a component and writing a recipe, never editing the trainer. Compatibility between
components is checked here too, at start-up, with the config key to blame.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grouprl.config import Config, ConfigError
from grouprl.inputs import INPUTS, allowed_inputs, probe_inputs
from grouprl.registry import BoundComponent, Capabilities, Registry, RegistryError


@dataclass
class Components:
    """The configured components, bound, with the capabilities they were registered with."""

    advantage: BoundComponent  # inputs by name -> adv_BG
    modifiers: list[BoundComponent]  # (adv_BG, inputs...) -> adv_BG
    loss: Callable[..., Any]  # PolicyInputs -> TermOutput
    loss_name: str
    loss_caps: Capabilities
    aggregation: Callable[..., Any]  # (values_NT, mask_NT, BatchNorm) -> scalar
    regularizers: list[Any]  # active ones only (a zero coefficient needs nothing)
    regularizer_caps: list[Capabilities]
    token_mask: BoundComponent | None = None
    sample_filters: list[BoundComponent] = field(default_factory=list)
    # importance weights for the sampler/trainer mismatch (None: `auto`, resolved by the
    # trainer from the engine's default, or `none`)
    mismatch: BoundComponent | None = None

    @property
    def needs_ref(self) -> bool:
        return self.loss_caps.needs_ref or any(c.needs_ref for c in self.regularizer_caps)

    @property
    def needs_entropy_grad(self) -> bool:
        return any(c.needs_entropy_grad for c in self.regularizer_caps)

    @property
    def whole_groups(self) -> bool:
        return self.loss_caps.whole_groups

    @property
    def calibrating(self) -> list[Any]:
        """Regularizers that calibrate on the whole batch (e.g. the entropy band)."""
        return [
            r for r, c in zip(self.regularizers, self.regularizer_caps, strict=True) if c.calibrates
        ]

    @property
    def refill(self) -> BoundComponent | None:
        """The sample filter whose dropped groups the collector replaces (at most one)."""
        return next((f for f in self.sample_filters if f.caps.refills), None)

    def advantage_inputs(self) -> set[str]:
        names = set(self.advantage.input_names)
        for m in self.modifiers:
            names |= set(m.input_names)
        return names

    def wanted_inputs(self) -> set[str]:
        """Every declared input some configured component names."""
        names = self.advantage_inputs()
        for f in self.sample_filters:
            names |= set(f.input_names)
        if self.token_mask is not None:
            names |= set(self.token_mask.input_names)
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


def _why(exc: Exception) -> str:
    """An exception as the tail of a ConfigError; unexpected types keep their name."""
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def split_spec(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    params = dict(spec)
    return str(params.pop("name")), params


def _bind(registry: Registry, key: str, spec: dict[str, Any], consumer: str) -> BoundComponent:
    name, params = split_spec(spec)
    try:
        bound = BoundComponent.build(registry, name, params)
    except Exception as exc:  # a constructor may fail any way on a bad value: name the key
        raise ConfigError(f"{key}: {_why(exc)}") from None
    allowed = allowed_inputs(consumer)
    unknown = [n for n in bound.input_names if n not in allowed]
    if unknown:
        raise ConfigError(
            f"{key}: {registry.kind} {name!r} asks for inputs a {consumer.replace('_', ' ')} "
            f"is not given: {unknown} (see grouprl.inputs; given: {', '.join(allowed)})"
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
    from grouprl.algorithms.regularizers import Regularizer
    from grouprl.algorithms.selection import SAMPLE_FILTERS, TOKEN_MASKS

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
    except (RegistryError, TypeError) as exc:  # TypeError: a parameter name that is no string
        raise ConfigError(f"loss: {exc}") from None
    regs, reg_caps = [], []
    for i, spec in enumerate(cfg.regularizers):
        name, params = split_spec(spec)
        try:
            reg = REGULARIZERS.build(name, **params)
            active = isinstance(reg, Regularizer) and bool(reg.active)
        except Exception as exc:  # a constructor may fail any way on a bad value
            raise ConfigError(f"regularizers.{i}: {_why(exc)}") from None
        if not isinstance(reg, Regularizer):
            raise ConfigError(f"regularizers.{i}: {name!r} is not a grouprl Regularizer")
        if active:  # a zero coefficient: no term, and nothing to compute for it
            regs.append(reg)
            reg_caps.append(REGULARIZERS.capabilities(name))
    return Components(
        advantage=_bind(ADVANTAGES, "advantage", adv_spec, "advantage"),
        modifiers=[
            _bind(ADVANTAGE_MODIFIERS, f"advantage.modifiers.{i}", m, "advantage")
            for i, m in enumerate(modifier_specs)
        ],
        loss=loss,
        loss_name=loss_name,
        loss_caps=LOSSES.capabilities(loss_name),
        aggregation=aggregation,
        regularizers=regs,
        regularizer_caps=reg_caps,
        token_mask=_bind(TOKEN_MASKS, "token_mask", cfg.token_mask, "token_mask")
        if cfg.token_mask
        else None,
        sample_filters=[
            _bind(SAMPLE_FILTERS, f"sample_filters.{i}", f, "sample_filter")
            for i, f in enumerate(cfg.sample_filters)
        ],
        mismatch=build_mismatch(cfg.rollout.mismatch_correction),
    )


MISMATCH_KEY = "rollout.mismatch_correction"


def build_mismatch(spec: dict[str, Any], default: str = "none") -> BoundComponent | None:
    """The configured correction; `auto` takes `default` (the engine's); `none` is None."""
    from grouprl.algorithms.mismatch import MISMATCH_CORRECTIONS

    name, params = split_spec(spec)
    if name == "auto":
        if params:
            raise ConfigError(f"{MISMATCH_KEY}: auto takes no parameters, got {sorted(params)}")
        name = default
    if name == "none":
        return None
    try:
        return BoundComponent.build(MISMATCH_CORRECTIONS, name, params)
    except (RegistryError, ValueError, TypeError) as exc:
        raise ConfigError(f"{MISMATCH_KEY}: {exc}") from None


def _probe_policy_inputs() -> Any:
    """The tiny start-up batch as the loss and the regularizers see it (B=2, G=2, T=3)."""
    import torch

    from grouprl.algorithms.types import BatchNorm, PolicyInputs

    inputs = probe_inputs()
    mask, logp = inputs["mask_NT"], inputs["old_logp_NT"]
    return PolicyInputs(
        logp_NT=logp.clone(),
        old_logp_NT=logp,
        mask_NT=mask,
        adv_N=inputs["adv_N"],
        entropy_NT=torch.full((4, 3), 0.5),
        ref_logp_NT=logp.clone(),
        rewards_N=inputs["rewards_BG"].reshape(-1),
        group_N=inputs["group_N"],
        norm=BatchNorm.of(mask, 3, 2),
        item_index_NT=inputs["item_index_NT"],
    )


def probe_components(cfg: Config) -> None:
    """Run fresh copies of the configured components once on a tiny synthetic batch, so a
    bad parameter value (`advantage.scale=x`, `token_mask.rho=2`) fails at start-up with
    its config key, not at the first step after the model has loaded."""
    fresh = _build_components(cfg)  # throwaway instances: no state is touched
    inputs: dict[str, Any] = {**probe_inputs(), "policy": _probe_policy_inputs()}
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
    if fresh.mismatch is not None:
        mismatch = fresh.mismatch
        policy = inputs["policy"]
        args = {
            "logp_NT": policy.old_logp_NT,
            "sampling_logp_NT": policy.old_logp_NT - 0.1,
            "mask_NT": policy.mask_NT,
        }
        checks.append((MISMATCH_KEY, lambda: mismatch(args)))
    for key, run in checks:
        try:
            run()
        except Exception as exc:  # any failure on the probe batch is this key's bad value
            raise ConfigError(f"{key}: {_why(exc)}") from None


def check_compatible(comps: Components, cfg: Config) -> None:
    """Combinations that cannot work, refused at start-up with the reason."""
    if comps.token_mask is not None and comps.whole_groups:
        raise ConfigError(
            f"token_mask: loss {comps.loss_name!r} scores whole sequences per group and "
            f"cannot use a per-token mask ({comps.token_mask.name}); drop one of them"
        )
    if comps.mismatch is not None and comps.whole_groups:
        raise ConfigError(
            f"{MISMATCH_KEY}: loss {comps.loss_name!r} normalizes itself over whole groups, so "
            f"per-token importance weights ({comps.mismatch.name}) cannot be applied to it"
        )
    if comps.advantage.caps.token_level and (comps.modifiers or comps.token_mask is not None):
        other = "advantage.modifiers" if comps.modifiers else "token_mask"
        raise ConfigError(
            f"{other}: advantage {comps.advantage.name!r} gives per-token advantages [N, T], "
            "which advantage modifiers and token masks (built for [B, G]) cannot take"
        )
    refills = [f.name for f in comps.sample_filters if f.caps.refills]
    if len(refills) > 1:
        raise ConfigError(f"sample_filters: only one refilling filter at a time, got {refills}")
    refill = comps.refill
    if refill is not None:
        late = [n for n in refill.input_names if INPUTS.get(n).stage != "collect"]
        if late:
            raise ConfigError(
                f"sample_filters: {refill.name!r} refills while sampling, before {late} exist"
            )
    if "baseline_B" in comps.advantage_inputs() and cfg.rollout.temperature == 0:
        raise ConfigError("advantage: remax's greedy baseline equals the samples at temperature 0")
    k, G = cfg.rollout.num_train_samples, cfg.rollout.num_generations
    if cfg.rollout.temperature == 0 and G > 1:
        raise ConfigError(
            f"rollout.temperature: 0 samples greedily, so the {G} completions of a prompt are "
            "identical and a group-relative advantage is 0 at every step; use a temperature > 0"
        )
    group = k if 0 < k < G else G  # the group size the update sees
    group_key = "rollout.num_train_samples" if 0 < k < G else "rollout.num_generations"
    parts = [
        ("advantage", comps.advantage.name, comps.advantage.caps),
        *((f"advantage.modifiers.{i}", m.name, m.caps) for i, m in enumerate(comps.modifiers)),
        ("loss", comps.loss_name, comps.loss_caps),
    ]
    for key, name, caps in parts:
        low, high = caps.min_group_size, caps.max_group_size
        if group < low or (high is not None and group > high):
            need = (
                f"at least {low}"
                if high is None
                else (f"exactly {low}" if low == high else f"between {low} and {high}")
            )
            raise ConfigError(
                f"{group_key}: {key} {name!r} needs {need} completions per prompt "
                f"(the update's group size), got {group}"
            )


def check_reward_specs(cfg: Config) -> None:
    """Each `rewards` / `extra_rewards` entry has a reward's shape, a registered name (if it
    names one) and a finite weight, checked at start-up without importing reward files (those
    load when the run builds its RewardSet); and not every weight is 0 (no learning signal)."""
    from grouprl.rewards import REWARDS
    from grouprl.rewards.base import as_spec

    weights: list[float] = []
    names: dict[str, str] = {}
    for section in ("rewards", "extra_rewards"):
        for i, item in enumerate(getattr(cfg, section)):
            key = f"{section}.{i}"
            try:
                spec = as_spec(item)
                for attr in ("name", "path", "alias"):
                    value = getattr(spec, attr)
                    if value is not None and (not isinstance(value, str) or not value):
                        raise ValueError(f"{attr} must be a non-empty string, got {value!r}")
                if spec.fn is not None and not callable(spec.fn):
                    raise ValueError(f"fn must be a Python callable, got {spec.fn!r}")
                if spec.name is not None:
                    REWARDS.get(spec.name)  # did-you-mean for a typo
            except Exception as exc:
                raise ConfigError(f"{key}: {_why(exc)}") from None
            if not math.isfinite(spec.weight):
                raise ConfigError(f"{key}.weight: must be a finite number, got {spec.weight}")
            if spec.display_name in names:
                raise ConfigError(
                    f"{key}: a second reward named {spec.display_name!r} (also "
                    f"{names[spec.display_name]}); give one an 'alias' so metrics stay apart"
                )
            names[spec.display_name] = key
            weights.append(spec.weight)
    if weights and not any(weights):
        raise ConfigError("rewards: every reward has weight 0, so every advantage would be 0")


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


def load_config(
    source: Any = None, overrides: list[str] | None = None, *, check: bool = True
) -> Config:
    """`config.load_config`, then every component built and probed (errors name the key).

    This is `grouprl.load_config`: the config layer itself knows nothing of the registries.
    """
    from grouprl.config import load_config as load_schema

    cfg = load_schema(source, overrides, check=check)
    if check:
        build_components(cfg)
        check_reward_specs(cfg)
    return cfg
