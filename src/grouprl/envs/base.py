"""Environments: what a multi-turn rollout talks to, registered by name.

The protocol is Gymnasium's reset/step, in text, as TRL's `environment_factory` has it:

    env = factory()                 # one environment per trajectory
    env.reset(row)                  # the dataset row (prompt, answer, other columns)
    result = env.step(message)      # the model's message (its text, tool calls included)
    result.observation              # messages to send back ({"role": "tool", ...}), or None
    result.done, result.reward, result.info

`tools` (a list of `Tool`, may be empty) go into the prompt's chat template so the model
knows what it may call. `data.environment: {name: NAME, ...params}` selects one from
`ENVIRONMENTS`; its parameters are checked against the class's keyword arguments at start-up.
An environment of your own: a class with `reset` and `step` (and `tools`), registered with
`@ENVIRONMENTS.register("name")` in a module your config imports (docs/environments.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from grouprl.config import ConfigError
from grouprl.envs.parsing import TOOL_PARSERS, parse_tool_calls
from grouprl.envs.tools import Tool, as_tool, call_tool
from grouprl.registry import Registry, RegistryError

ENVIRONMENTS: Registry = Registry("environment")
TOOLS: Registry = Registry("tool")  # built-in tools by name: factories returning a Tool


@dataclass
class StepResult:
    """One environment step: the messages to send back (None: nothing, e.g. at the end),
    whether the trajectory is over, named reward pieces and anything else to keep."""

    observation: list[dict[str, Any]] | None = None
    done: bool = False
    reward: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    tools: list[Tool]

    def reset(self, row: dict[str, Any]) -> None: ...

    def step(self, message: str) -> StepResult: ...


def resolve_tools(specs: list[Any], timeout: float | None = None) -> list[Tool]:
    """Tools from config entries: a built-in name (TOOLS), a "file.py:function" or
    "package.module:function" path, a function, or a Tool."""
    from grouprl.rewards.loading import load_callable

    out: list[Tool] = []
    for i, spec in enumerate(specs):
        where = f"data.environment.tools.{i}"
        if isinstance(spec, str) and ":" not in spec:
            try:
                tool = TOOLS.get(spec)()
            except RegistryError as e:
                raise ConfigError(f"{where}: {e}") from None
        elif isinstance(spec, str):
            try:
                tool = load_callable(spec)[0]
            except Exception as e:
                raise ConfigError(f"{where}: cannot load {spec!r}: {e}") from None
        else:
            tool = spec
        out.append(as_tool(tool, timeout=timeout))
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"data.environment.tools: two tools named {', '.join(dupes)}")
    return out


@ENVIRONMENTS.register("tools")
class ToolEnvironment:
    """The model may call tools; a message without a tool call is its final answer.

    Each step parses the message's calls (`parser`, default hermes), runs them (each under
    its deadline) and sends back one `tool` message per call, in order; a malformed call or
    an unknown tool gets an error message instead, and the trajectory goes on.
    info: calls (well-formed), malformed, errors (malformed or failed), the tools called.
    """

    def __init__(
        self, *, tools: list[Any] | None = None, parser: str = "hermes", timeout: float = 10.0
    ) -> None:
        if parser not in TOOL_PARSERS:
            raise ConfigError(
                f"data.environment.parser: {parser!r} is not one of {', '.join(TOOL_PARSERS)}"
            )
        self.tools = resolve_tools(list(tools or []), timeout)
        self._by_name = {t.name: t for t in self.tools}
        self.parser = parser
        self.row: dict[str, Any] = {}

    def reset(self, row: dict[str, Any]) -> None:
        self.row = row

    def step(self, message: str) -> StepResult:
        parsed = parse_tool_calls(message, self.parser)
        if not parsed.attempted:
            info = {"calls": 0, "malformed": 0, "errors": 0, "tools": []}
            return StepResult(None, done=True, info=info)
        obs = [{"role": "tool", "name": "error", "content": f"Error: {e}"} for e in parsed.errors]
        failed = len(parsed.errors)
        for call in parsed.calls:
            res = call_tool(self._by_name, call)
            failed += not res.ok
            obs.append({"role": "tool", "name": call.name, "content": res.content})
        info = {
            "calls": len(parsed.calls),
            "malformed": len(parsed.errors),
            "errors": failed,
            "tools": [c.name for c in parsed.calls],
        }
        return StepResult(obs, done=False, info=info)


def build_environment(spec: dict[str, Any] | str) -> Callable[[], Environment]:
    """A factory of fresh environments for `data.environment` (checked now, once)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("data.environment: expected a mapping with a 'name' key")
    try:
        ENVIRONMENTS.check_params(name, spec, "data.environment")
    except RegistryError as e:
        raise ConfigError(f"data.environment: {e}") from None
    cls = ENVIRONMENTS.get(name)
    first = cls(**spec)  # fails now, with its key, rather than mid-rollout
    for method in ("reset", "step"):
        if not callable(getattr(first, method, None)):
            raise ConfigError(f"data.environment: {name!r} has no {method}() method")
    made = [first]

    def factory() -> Environment:
        return made.pop() if made else cls(**spec)

    return factory
