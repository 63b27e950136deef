"""Built-in tools, by name in `data.environment.tools`: `calculator`, `python`."""

from __future__ import annotations

import ast
import operator

from grouprl.envs.base import TOOLS
from grouprl.envs.sandbox import python_tool
from grouprl.envs.tools import Tool, as_tool

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_MAX_POW = 64  # 9**9**9 would hang the step: exponents are bounded


def _eval(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POW:
            raise ValueError(f"exponent {right} is too large (at most {_MAX_POW})")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression: {ast.dump(node)[:60]}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / // % ** and parentheses.

    Args:
        expression: The expression, e.g. "(12 + 7) * 3".
    """
    value = _eval(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@TOOLS.register("calculator")
def calculator_tool() -> Tool:
    """Arithmetic on numbers (no names, no calls): `calculator(expression)`."""
    return as_tool(calculator, timeout=2.0)


@TOOLS.register("python")
def python_sandbox_tool() -> Tool:
    """Python in a sandboxed subprocess (envs/sandbox.py): `python(code)`, 5 s, 512 MiB."""
    return python_tool()
