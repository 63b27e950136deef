"""One small generic registry: components are registered under a name and built by it.

Every pluggable part of grouprl (advantage estimators, policy losses, aggregations,
regularizers, reward functions, rollout engines, tasks) lives in a `Registry`. Configs
name a component and its parameters; `Registry.build` checks the parameters against the
component's signature so that a typo fails at start-up, not mid-run.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A name or parameter that a registry does not know."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


@dataclass(frozen=True)
class Capabilities:
    """What a component needs from the engine, declared when it is registered.

    needs_ref:           reference-policy log-probs (`ref_logp_NT`) in the update.
    needs_entropy_grad:  per-token entropy WITH gradient in the update (entropy terms).
    whole_groups:        couples the rows of a group: micro-batches are cut at group
                         boundaries and per-token masks cannot apply (DisCO, DRPO, Reg-GRPO).
    calibrates:          `calibrate(entropy_NT, mask_NT, token_weight_NT)` on the whole batch
                         before the update (SPINE's entropy band).
    refills:             a sample filter whose dropped groups are replaced by new prompts
                         (DAPO dynamic sampling).
    collapse_risk:       a reward whose optimum can be reached by collapse (a majority vote):
                         `train.collapse_monitor: auto` watches such runs.
    min_group_size / max_group_size: completions per prompt the component works with.
    token_level:         an advantage estimator that returns per-token advantages [N, T]
                         instead of [B, G] (Rank-GRPO: one advantage per list item).
    needs_items:         a loss that reads each token's item (`item_index_NT`: the line of
                         the completion it belongs to; Rank-GRPO's per-item ratio).
    needs_ema_reference: a reward that reads the EMA reference's `care_consistency` column
                         (`train.ema_reference` must be set; GRPO-CARE).
    trains_sft_rows:     a regularizer that trains a rollout strategy's demonstration rows
                         (`Rollouts.sft_N`, e.g. ExPO's self-explanations); a strategy that
                         makes such rows is refused without one.
    offline_probe:       an estimator that can start its per-prompt state from K samples of
                         the initial policy per training prompt (`offline_samples` K > 0,
                         `init_offline(keys, successes, K)`): the trainer's probe pass
                         before the first step (SPO's offline values).
    """

    needs_ref: bool = False
    needs_entropy_grad: bool = False
    whole_groups: bool = False
    calibrates: bool = False
    refills: bool = False
    collapse_risk: bool = False
    min_group_size: int = 1
    max_group_size: int | None = None
    token_level: bool = False
    needs_items: bool = False
    needs_ema_reference: bool = False
    trains_sft_rows: bool = False
    offline_probe: bool = False


CAPABILITY_NAMES = tuple(f.name for f in fields(Capabilities))


class Registry(Generic[T]):
    """A named collection of components of one kind.

    >>> ADV = Registry("advantage")
    >>> @ADV.register("grpo")
    ... def grpo(rewards, scale="group"): ...
    >>> ADV.get("grpo") is grpo
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._caps: dict[str, Capabilities] = {}

    def register(self, name: str, **capabilities: Any) -> Callable[[T], T]:
        """Register under `name`, with the component's `Capabilities` (unknown ones fail)."""
        unknown = [k for k in capabilities if k not in CAPABILITY_NAMES]
        if unknown:
            raise RegistryError(
                f"{self.kind} {name!r}: unknown capabilities {unknown}; "
                f"known: {', '.join(CAPABILITY_NAMES)}"
            )
        caps = Capabilities(**capabilities)

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            self._caps[name] = caps
            return obj

        return deco

    def capabilities(self, name: str) -> Capabilities:
        """The capabilities `name` was registered with (all off by default)."""
        self.get(name)  # did-you-mean for an unknown name
        return self._caps[name]

    def get(self, name: str) -> T:
        if name not in self._items:
            raise RegistryError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                f"known: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def check_params(self, name: str, params: dict[str, Any], where: str = "") -> None:
        """Reject parameters that the component's signature does not accept."""
        obj = self.get(name)
        accepted = keyword_params(obj)
        if accepted is None:  # takes **kwargs: anything goes
            return
        for key in params:
            if key not in accepted:
                place = f"{where}." if where else ""
                raise RegistryError(
                    f"{place}{key}: {self.kind} {name!r} has no parameter {key!r}"
                    f"{did_you_mean(key, sorted(accepted))}; accepted: {', '.join(sorted(accepted)) or 'none'}"
                )

    def build(self, name: str, **params: Any) -> Any:
        """Call (or instantiate) the component with `params` after checking them."""
        self.check_params(name, params)
        return self.get(name)(**params)  # type: ignore[operator]


def keyword_params(obj: Any) -> set[str] | None:
    """Keyword-only parameters of a callable (or a class's __init__); None if it takes **kwargs."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    names: set[str] = set()
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self":
            names.add(p.name)
    return names


def _call_target(component: Any) -> Callable[..., Any]:
    return component.__call__ if inspect.isclass(component) else component


def input_params(component: Any) -> dict[str, inspect.Parameter]:
    """Positional-or-keyword parameters (the inputs) of a function or of a class's __call__."""
    sig = inspect.signature(_call_target(component))
    return {
        n: p for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n != "self"
    }


def config_params(component: Any) -> dict[str, inspect.Parameter]:
    """Keyword-only parameters (the config) of a function or of a class's __init__."""
    target = component.__init__ if inspect.isclass(component) else component
    sig = inspect.signature(target)
    return {n: p for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


class BoundComponent:
    """A component bound to its config, called with the inputs it names.

    Calling convention (advantage estimators, their modifiers, token masks, sample filters):
    the positional-or-keyword parameters of the function (or of a class's `__call__`) name
    the inputs it wants, by name, from what the trainer has (e.g. `rewards_BG`,
    `entropy_NT`); a parameter with a default is optional. Keyword-only parameters (or a
    class's `__init__` ones) are config. A class is instantiated once per run (state).

    >>> from grouprl.algorithms.selection import TOKEN_MASKS
    >>> sel = BoundComponent.build(TOKEN_MASKS, "forking_tokens", {"rho": 0.2})
    >>> sel.required_inputs
    ['entropy_NT', 'mask_NT']
    """

    def __init__(
        self, name: str, fn: Callable[..., Any], component: Any, caps: Capabilities
    ) -> None:
        self.name = name
        self._fn = fn
        params = input_params(component)
        self.input_names = list(params)
        self.required_inputs = [n for n, p in params.items() if p.default is p.empty]
        self.caps = caps
        self.instance: Any = None  # the object, for stateful (class) components

    def state_dict(self) -> dict[str, Any]:
        return self.instance.state_dict() if hasattr(self.instance, "state_dict") else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and hasattr(self.instance, "load_state_dict"):
            self.instance.load_state_dict(state)

    @staticmethod
    def build(
        registry: Registry, name: str, params: Mapping[str, Any] | None = None
    ) -> BoundComponent:
        """Check `params` against the component's keyword-only parameters and bind them."""
        component = registry.get(name)
        params = dict(params or {})
        accepted = config_params(component)
        for key in params:
            if key not in accepted:
                raise RegistryError(
                    f"{registry.kind} {name!r} has no parameter {key!r}"
                    f"{did_you_mean(key, sorted(accepted))}; accepted: "
                    f"{', '.join(sorted(accepted)) or 'none'}"
                )
        if inspect.isclass(component):
            fn: Callable[..., Any] = component(**params)  # stateful: one instance per run
        else:

            def fn(**inputs: Any) -> Any:
                return component(**inputs, **params)

        bound = BoundComponent(name, fn, component, registry.capabilities(name))
        bound.instance = fn if inspect.isclass(component) else None
        return bound

    def __call__(self, inputs: Mapping[str, Any]) -> Any:
        missing = [n for n in self.required_inputs if inputs.get(n) is None]
        if missing:
            raise ValueError(f"{self.name}: missing inputs {', '.join(missing)}")
        return self._fn(**{n: inputs[n] for n in self.input_names if inputs.get(n) is not None})
