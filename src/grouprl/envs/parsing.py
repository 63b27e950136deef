"""Tool calls in a model message: parsed in the format the model's chat template uses.

`hermes` (Qwen2/2.5/3, Hermes, many others): each call is a JSON object
`{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`. A message may
hold several calls; each malformed one becomes an error (what went wrong, which call), never
an exception, so the environment can answer it with an error observation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from grouprl.registry import Registry

TOOL_PARSERS: Registry = Registry("tool-call format")


@dataclass
class ToolCall:
    """One well-formed call: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any]


@dataclass
class ParsedMessage:
    """A model message: its text outside the calls, the well-formed calls in order, and one
    line per malformed call."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        """Calls the message tried to make (well-formed or not)."""
        return len(self.calls) + len(self.errors)


_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.S)


def _one_call(body: str, k: int) -> ToolCall | str:
    """A ToolCall from the JSON between the tags, or the error line for call k (1-based)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"tool call {k}: not valid JSON ({e.msg} at character {e.pos})"
    if not isinstance(obj, dict):
        return f"tool call {k}: expected a JSON object with name and arguments"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return f"tool call {k}: no tool name"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models send the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return f"tool call {k} ({name}): arguments are a string that is not JSON"
    if not isinstance(args, dict):
        return f"tool call {k} ({name}): arguments must be a JSON object"
    return ToolCall(name, args)


@TOOL_PARSERS.register("hermes")
def parse_hermes(text: str) -> ParsedMessage:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them."""
    calls, errors, content = [], [], []
    last = 0
    for k, m in enumerate(_HERMES.finditer(text), start=1):
        content.append(text[last : m.start()])
        last = m.end()
        if not m.group(2):
            errors.append(f"tool call {k}: <tool_call> is never closed by </tool_call>")
            continue
        one = _one_call(m.group(1).strip(), k)
        (errors if isinstance(one, str) else calls).append(one)
    content.append(text[last:])
    return ParsedMessage("".join(content).strip(), calls, errors)


def parse_tool_calls(text: str, fmt: str = "hermes") -> ParsedMessage:
    """The tool calls in `text`, in the format `fmt` (a TOOL_PARSERS name)."""
    return TOOL_PARSERS.get(fmt)(text)
