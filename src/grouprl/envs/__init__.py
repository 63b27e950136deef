"""Environments and tools for multi-turn rollouts: the protocol, the registry, tool calls."""

from grouprl.envs import builtins  # noqa: F401  (registers the built-in tools)
from grouprl.envs.base import ENVIRONMENTS, TOOLS, Environment, StepResult, build_environment
from grouprl.envs.parsing import TOOL_PARSERS, ParsedMessage, ToolCall, parse_tool_calls
from grouprl.envs.tools import Tool, ToolResult, as_tool, call_tool

__all__ = [
    "ENVIRONMENTS",
    "TOOLS",
    "TOOL_PARSERS",
    "Environment",
    "ParsedMessage",
    "StepResult",
    "Tool",
    "ToolCall",
    "ToolResult",
    "as_tool",
    "build_environment",
    "call_tool",
    "parse_tool_calls",
]
