"""The multi grader's calculate_output: a small arithmetic language, parsed with `ast` and checked node by node
against a whitelist, then evaluated by walking the tree. Never `eval`.

Allowed (OpenAI's documented set): numbers, the names of the sub-graders, + - * / and ^ (power; ** too),
unary + and -, parentheses, and the functions min, max, abs, floor, ceil, exp, sqrt, log (natural).
Every value is a float, so no expression can build a huge integer: 9^9^9 overflows at once instead of hanging.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
from typing import Callable

from tunelab.graders.base import Failed, GraderError

FUNCTIONS: dict[str, tuple[Callable, int | None]] = {  # name -> (function, argument count; None: one or more)
    "min": (min, None), "max": (max, None), "abs": (abs, 1), "floor": (math.floor, 1), "ceil": (math.ceil, 1),
    "exp": (math.exp, 1), "sqrt": (math.sqrt, 1), "log": (math.log, 1)}
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.Pow: operator.pow}
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_LENGTH, MAX_NODES = 2000, 500
ALLOWED = "use numbers, grader names, + - * / ^, parentheses and min, max, abs, floor, ceil, exp, sqrt, log"

Formula = Callable[[dict[str, float]], float]


def compile_formula(text: str, names: list[str], where: str) -> Formula:
    """Check the expression and return a function of the sub-grader rewards; GraderError names the problem."""
    if len(text) > MAX_LENGTH:
        raise GraderError(f"{where}: the formula is {len(text)} characters long; at most {MAX_LENGTH}")
    try:
        tree = ast.parse(text.replace("^", "**").strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise GraderError(f"{where}: cannot parse {text!r} ({getattr(err, 'msg', err)}); {ALLOWED}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise GraderError(f"{where}: the formula has over {MAX_NODES} parts")
    return _node(tree.body, names, where)


def _node(node: ast.AST, names: list[str], where: str) -> Formula:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        try:
            value = float(node.value)
        except OverflowError:
            raise GraderError(f"{where}: the number {node.value} is too large") from None
        return lambda env: value
    if isinstance(node, ast.Name) and node.id in names:
        return lambda env, key=node.id: env[key]
    if isinstance(node, ast.Name):
        close = difflib.get_close_matches(node.id, names, n=1)
        raise GraderError(f"{where}: unknown name {node.id!r}: the graders are {', '.join(names)}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        op, left, right = OPERATORS[type(node.op)], _node(node.left, names, where), _node(node.right, names, where)
        return lambda env: _checked(op, left(env), right(env))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        op, operand = UNARY[type(node.op)], _node(node.operand, names, where)
        return lambda env: op(operand(env))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        return _call(node, names, where)
    raise GraderError(f"{where}: {ast.unparse(node)!r} is not allowed; {ALLOWED}")


def _call(node: ast.Call, names: list[str], where: str) -> Formula:
    name = node.func.id
    if name not in FUNCTIONS:
        raise GraderError(f"{where}: unknown function {name!r}; the functions are {', '.join(FUNCTIONS)}")
    function, arity = FUNCTIONS[name]
    if any(isinstance(arg, ast.Starred) for arg in node.args) or not node.args or (
            arity is not None and len(node.args) != arity):
        raise GraderError(f"{where}: {name}() takes {arity or 'one or more'} argument{'s' if arity != 1 else ''}")
    args = [_node(arg, names, where) for arg in node.args]
    return lambda env: _checked(lambda *values: float(function(*values)), *(arg(env) for arg in args))


def _checked(function: Callable, *args: float) -> float:
    """A math error (division by zero, log of 0, overflow) fails this sample, not the run."""
    try:
        value = function(*args)
    except (ArithmeticError, ValueError) as err:
        raise Failed({"other_error": True}, f"calculate_output: {err}") from None
    if isinstance(value, complex) or not math.isfinite(value):
        raise Failed({"other_error": True}, "calculate_output: the result is not a finite real number")
    return float(value)
