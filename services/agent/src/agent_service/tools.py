"""The agent's tools: the seed's `weather`, `get_time` and `calculator`.

They are plain synchronous functions; strands runs synchronous tools in a worker
thread, so none of them blocks the event loop.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

from strands import tool

MAX_EXPRESSION_CHARS = 256
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e100

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "abs": abs,
    "round": round,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


class CalculationError(ValueError):
    """The expression is not plain arithmetic, or its value is out of bounds."""


def evaluate(expression: str) -> float | int:
    """Evaluate arithmetic without `eval`: only numbers, operators and a few math functions."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculationError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise CalculationError(f"not an arithmetic expression: {expression!r}") from exc
    value: float | int = _eval_node(tree.body)
    return value


def _eval_node(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculationError(f"exponent larger than {MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise CalculationError(str(exc)) from exc
        if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
            raise CalculationError("result out of range")
        return value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        try:
            return _FUNCTIONS[node.func.id](*(_eval_node(arg) for arg in node.args))
        except (TypeError, ValueError) as exc:
            raise CalculationError(f"{node.func.id}: {exc}") from exc
    raise CalculationError(f"unsupported element in expression: {ast.dump(node)[:60]}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as "2 * (3 + 4)" or "sqrt(2) ^ 2".

    Args:
        expression: The arithmetic expression to evaluate.
    """
    value = evaluate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{expression} = {value}"


@tool
def weather(location: str = "") -> str:
    """Get the current weather (a fixed sample answer, as in the seed).

    Args:
        location: Optional place name.
    """
    return f"sunny in {location}" if location else "sunny"


@tool
def get_time() -> str:
    """Get the current date and time of the server, with its time zone."""
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def default_tools() -> list[Any]:
    """The tools every agent gets."""
    return [weather, get_time, calculator]
