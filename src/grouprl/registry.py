"""One small generic registry: components are registered under a name and built by it.

Every pluggable part of grouprl (advantage estimators, policy losses, aggregations,
regularizers, reward functions, rollout engines, tasks) lives in a `Registry`. Configs
name a component and its parameters; `Registry.build` checks the parameters against the
component's signature so that a typo fails at start-up, not mid-run.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """A name or parameter that a registry does not know."""


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f' (did you mean "{close[0]}"?)' if close else ""


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

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

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
