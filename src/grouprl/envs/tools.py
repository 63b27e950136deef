"""Tools: plain Python functions with type hints and a docstring, called by the model.

`as_tool(fn)` makes the JSON schema chat templates expect from the function's signature and
its Google-style docstring (transformers' `get_json_schema`, the same one
`apply_chat_template(tools=[fn])` uses), so a function that works as a tool in TRL or in a
chat template works here. `call_tool` runs one call: the arguments are checked against the
schema, the call runs under its deadline, and whatever happens (an unknown tool, a missing
argument, an exception, a timeout) comes back as a `ToolResult` whose text the model reads
as an error observation; the rollout goes on.

A deadline on a Python function runs it in a daemon thread: the caller stops waiting at the
deadline, but a thread cannot be killed, so a function that never returns keeps its thread.
Code that may run away (the model's own code) belongs in a subprocess: `python_tool()`
(envs/sandbox.py) is one, killed at its deadline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grouprl.config import ConfigError
from grouprl.envs.parsing import ToolCall

DEFAULT_TIMEOUT_S = 10.0
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Tool:
    """A callable tool: its name, the function, its JSON schema ({"type": "function",
    "function": {name, description, parameters}}) and its per-call deadline in seconds."""

    name: str
    fn: Callable[..., Any]
    schema: dict[str, Any]
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def parameters(self) -> dict[str, Any]:
        return self.schema["function"].get("parameters", {})


def as_tool(fn: Callable[..., Any] | Tool, *, timeout: float | None = None) -> Tool:
    """A Tool from a function (its schema from its signature and docstring), or the same
    Tool with another deadline. A function without a docstring describing every argument is
    refused with what is missing."""
    if isinstance(fn, Tool):
        return fn if timeout is None else Tool(fn.name, fn.fn, fn.schema, timeout)
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException
        name = getattr(fn, "__name__", repr(fn))
        raise ConfigError(
            f"tool {name}: {e}. A tool needs type hints and a Google-style docstring "
            "(a summary line, then 'Args:' with one line per argument)"
        ) from None
    return Tool(
        schema["function"]["name"], fn, schema, DEFAULT_TIMEOUT_S if timeout is None else timeout
    )


@dataclass
class ToolResult:
    """What one call gave: the text the model reads, whether it worked, and how long it took."""

    name: str
    content: str
    ok: bool
    seconds: float = 0.0


def check_arguments(tool: Tool, args: dict[str, Any]) -> str | None:
    """Why `args` do not fit the tool's schema (missing, unexpected, wrong JSON type), or None."""
    props: dict[str, Any] = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in args]
    if missing:
        return f"missing argument(s) {', '.join(missing)}"
    extra = [k for k in args if k not in props]
    if extra:
        return f"unexpected argument(s) {', '.join(extra)}; {tool.name} takes {', '.join(props) or 'none'}"
    for key, value in args.items():
        want = props[key].get("type")
        types = _JSON_TYPES.get(want) if isinstance(want, str) else None
        if types and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            return f"argument {key} must be a JSON {want}, got {json.dumps(value)[:60]}"
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def call_tool(tools: dict[str, Tool], call: ToolCall) -> ToolResult:
    """Run one call; every failure is a result with ok=False and a one-line reason."""
    tool = tools.get(call.name)
    if tool is None:
        known = ", ".join(tools) or "none"
        return ToolResult(call.name, f"Error: unknown tool {call.name!r}; tools: {known}", False)
    why = check_arguments(tool, call.arguments)
    if why is not None:
        return ToolResult(call.name, f"Error: {call.name}: {why}", False)
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = tool.fn(**call.arguments)
        except BaseException as e:  # the tool's failure is the model's observation
            box["error"] = f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    worker = threading.Thread(target=run, name=f"grouprl-tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout)
    took = time.perf_counter() - t0
    if worker.is_alive():
        return ToolResult(
            call.name, f"Error: {call.name} did not answer within {tool.timeout:g} s", False, took
        )
    if "error" in box:
        return ToolResult(call.name, f"Error: {call.name} raised {box['error']}", False, took)
    return ToolResult(call.name, _text(box.get("value")), True, took)
