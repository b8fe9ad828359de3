"""Score modifiers, stage 2: the typed nodes of a ``score`` expression, their folding and printing.

Comes in: built by :mod:`patterndsl.scores.bind` from the syntax of a ``score EXPR`` statement
(and by :mod:`patterndsl.scores.symbolic` from sympy, for derivatives). Goes out: immutable,
hashable nodes that every later stage reads (semantics, the CPU executor, Triton rendering).

One small family: :class:`Num` (a constant), :class:`Sym` (``s``, ``q``, ``k``, ``h``, ``Lq``,
``Lk``), :class:`Coord` (``q.AXIS``/``k.AXIS``), :class:`Read` (an element of a run-time input,
section 7) and :class:`Op` (every operator, function and ``select``, by name). Every node has a
``type``: ``"int"``, ``"float"`` or ``"bool"`` (``"any"`` only while checking a file without
parameter values). Integers are promoted to float where a float is needed; ``//`` and ``%``
take integers; ``/`` and ``**`` give floats; ``floor`` turns a float into an integer (the only
way a float becomes an index). :func:`make` folds constants; printing re-parses equal.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from patterndsl.errors import PatternTypeError, PatternValueError
from patterndsl.ir import Span

INT, FLOAT, BOOL, ANY = "int", "float", "bool", "any"
_MAX_INT = 2**62


def _span():
    return field(default=None, compare=False, hash=False, repr=False)


class Node:
    """A typed score-expression node."""

    __slots__ = ()
    type: str


@dataclass(frozen=True, slots=True)
class Num(Node):
    value: int | float | bool
    type: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Sym(Node):
    """``s`` (float), ``q k h Lq Lk`` (int), or an unknown parameter (``any``) while checking a file."""

    name: str
    type: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Coord(Node):
    side: str
    axis: str
    type: str = INT
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Read(Node):
    """``NAME[indices]``: one element of a run-time input (int value, or float that may carry a gradient)."""

    name: str
    indices: tuple[Node, ...]
    type: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Op(Node):
    """An operator, function or ``select`` applied to ``args`` (see :data:`OPS`)."""

    op: str
    args: tuple[Node, ...]
    type: str
    span: Span | None = _span()


def num(value: int | float | bool, span: Span | None = None) -> Num:
    kind = BOOL if isinstance(value, bool) else INT if isinstance(value, int) else FLOAT
    return Num(value, kind, span)


S = Sym("s", FLOAT)

# --------------------------------------------------------------------------- operators


def _num(*types: str) -> str:
    """Result type of arithmetic: int when every operand is, float when one is, ``any`` when unknown."""
    if FLOAT in types:
        return FLOAT
    return ANY if ANY in types else INT


def _float(*types: str) -> str:
    return FLOAT


def _bool(*types: str) -> str:
    return BOOL


def _select(pred: str, a: str, b: str) -> str:
    return _num(a, b)


def _pow(a, b):
    return math.pow(a, b)


def _div(a, b):
    return a / b


def _fmin(a, b):
    return min(a, b)


#: op -> (operand rule, result type rule, Python folding function). Operand rules: "num" (int or
#: float), "int" (integers), "bool" (conditions), "select" (a condition, then two numbers).
OPS: dict[str, tuple[str, Callable[..., str], Callable[..., Any]]] = {
    "+": ("num", _num, operator.add),
    "-": ("num", _num, operator.sub),
    "*": ("num", _num, operator.mul),
    "/": ("num", _float, _div),
    "**": ("num", _float, _pow),
    "//": ("int", _num, operator.floordiv),
    "%": ("int", _num, operator.mod),
    "neg": ("num", _num, operator.neg),
    "tanh": ("num", _float, math.tanh),
    "exp": ("num", _float, math.exp),
    "log": ("num", _float, math.log),
    "sqrt": ("num", _float, math.sqrt),
    "erf": ("num", _float, math.erf),
    "abs": ("num", _num, abs),
    "min": ("num", _num, _fmin),
    "max": ("num", _num, max),
    "floor": ("num", lambda t: INT if t != ANY else ANY, math.floor),
    "select": ("select", _select, lambda c, a, b: a if c else b),
    "==": ("num", _bool, operator.eq),
    "!=": ("num", _bool, operator.ne),
    "<": ("num", _bool, operator.lt),
    "<=": ("num", _bool, operator.le),
    ">": ("num", _bool, operator.gt),
    ">=": ("num", _bool, operator.ge),
    "and": ("bool", _bool, lambda *xs: all(xs)),
    "or": ("bool", _bool, lambda *xs: any(xs)),
    "not": ("bool", _bool, operator.not_),
}
#: The functions a source may call, with their arities.
FUNCTIONS = {"tanh": 1, "exp": 1, "log": 1, "sqrt": 1, "erf": 1, "abs": 1, "min": 2, "max": 2, "floor": 1, "select": 3}
COMPARISONS = ("==", "!=", "<", "<=", ">", ">=")

_WORDS = {INT: "an integer", FLOAT: "a float", BOOL: "a condition", ANY: "a value"}


def describe(node: Node) -> str:
    return _WORDS[node.type]


def _fits(node: Node, rule: str) -> bool:
    if node.type == ANY:
        return True
    if rule == "num":
        return node.type in (INT, FLOAT)
    if rule == "int":
        return node.type == INT
    return node.type == BOOL


def make(op: str, args: tuple[Node, ...] | list[Node], span: Span | None = None, op_span: Span | None = None) -> Node:
    """``op`` applied to ``args``, type-checked, with constants folded.

    Args:
        op: a key of :data:`OPS`.
        args: typed operands.
        span: where the whole expression is (errors about an operand use the operand's span).
        op_span: where the operator is (a constant zero divisor is reported there).

    Returns:
        An :class:`Op`, or a :class:`Num` when every operand is a constant and the value is finite.

    Raises:
        PatternTypeError: an operand of the wrong type (a float for ``//``, a number for ``and``).
        PatternValueError: a constant zero divisor of ``//`` or ``%``; an integer out of range.
    """
    args = tuple(args)
    rule, result, fold = OPS[op]
    rules = ("bool", "num", "num") if rule == "select" else (rule,) * len(args)
    for arg, want in zip(args, rules, strict=True):
        if not _fits(arg, want):
            raise PatternTypeError(_operand_message(op, want, arg), arg.span or span)
    kind = result(*(a.type for a in args))
    if op in ("//", "%") and isinstance(args[1], Num) and args[1].value == 0:
        raise PatternValueError(f"division by zero: the divisor of '{op}' is 0", op_span or span)
    if all(isinstance(a, Num) for a in args):
        folded = _fold(op, fold, [a.value for a in args], kind, span)
        if folded is not None:
            return folded
    if op == "neg" and isinstance(args[0], Op) and args[0].op == "neg":
        return args[0].args[0]
    return Op(op, args, kind, span)


def _operand_message(op: str, want: str, arg: Node) -> str:
    name = {"neg": "unary -"}.get(op, op if op in FUNCTIONS else f"'{op}'")
    if want == "int":
        return f"{name} needs integers, got {describe(arg)} (use / for true division, floor() to make an integer)"
    if want == "bool":
        return f"{name} needs a condition, got {describe(arg)}"
    return f"{name} needs a number, got {describe(arg)}"


def _fold(op: str, fold: Callable, values: list, kind: str, span: Span | None) -> Num | None:
    if kind == FLOAT:
        values = [float(v) if not isinstance(v, bool) else v for v in values]
    try:
        value = fold(*values)
    except (ArithmeticError, ValueError):
        return None  # log(-1.0), 0.0 / 0.0, ...: left to run time, where it is NaN or Inf as in IEEE
    if kind == FLOAT:
        value = float(value)
        if not math.isfinite(value):
            return None
    elif kind == INT:
        value = int(value)
        if abs(value) > _MAX_INT:
            raise PatternValueError(f"integer out of range: |value| must be at most 2**62 ({_MAX_INT})", span)
    elif kind == BOOL:
        value = bool(value)
    return Num(value, kind, span)


# --------------------------------------------------------------------------- traversal


def children(node: Node) -> tuple[Node, ...]:
    if isinstance(node, Op):
        return node.args
    if isinstance(node, Read):
        return node.indices
    return ()


def walk(node: Node) -> Iterator[Node]:
    """``node`` and every node below it, parents first."""
    yield node
    for child in children(node):
        yield from walk(child)


def uses(node: Node, leaf: Node) -> bool:
    return any(sub == leaf for sub in walk(node))


def depth(node: Node) -> int:
    """Nesting depth, without recursion (a long flat chain is a deep tree)."""
    best = 0
    stack = [(node, 1)]
    while stack:
        current, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in children(current))
    return best


# --------------------------------------------------------------------------- printing

# Binding strength (larger binds tighter), as in grammar/pattern.lark.
_PREC = {"or": 1, "and": 2, "not": 3, "cmp": 4, "+": 6, "-": 6, "*": 7, "/": 7, "//": 7, "%": 7, "neg": 8, "**": 9}
_ATOM = 99


def _number(value: int | float | bool) -> tuple[str, int]:
    if isinstance(value, bool):
        return ("true" if value else "false"), _ATOM
    text = repr(value)
    return text, (_PREC["neg"] if value < 0 or text.startswith("-") else _ATOM)


def _text(node: Node) -> tuple[str, int]:
    if isinstance(node, Num):
        return _number(node.value)
    if isinstance(node, Sym):
        return node.name, _ATOM
    if isinstance(node, Coord):
        return f"{node.side}.{node.axis}", _ATOM
    if isinstance(node, Read):
        return f"{node.name}[{', '.join(to_source(i) for i in node.indices)}]", _ATOM
    op, args = node.op, node.args
    if op in FUNCTIONS:
        return f"{op}({', '.join(to_source(a) for a in args)})", _ATOM
    if op == "neg":
        return "-" + _wrap(args[0], _PREC["neg"]), _PREC["neg"]
    if op == "not":
        return "not " + _wrap(args[0], _PREC["not"]), _PREC["not"]
    if op in ("and", "or"):
        return f" {op} ".join(_wrap(a, _PREC[op] + 1) for a in args), _PREC[op]
    if op in COMPARISONS:
        prec = _PREC["cmp"]
        return f"{_wrap(args[0], prec + 1)} {op} {_wrap(args[1], prec + 1)}", prec
    if op == "**":
        # The base is an atom in the grammar; the exponent a unary expression.
        return f"{_wrap(args[0], _ATOM)} ** {_wrap(args[1], _PREC['neg'])}", _PREC["**"]
    prec = _PREC[op]
    return f"{_wrap(args[0], prec)} {op} {_wrap(args[1], prec + 1)}", prec


def _wrap(node: Node, need: int) -> str:
    text, prec = _text(node)
    return text if prec >= need else f"({text})"


def to_source(node: Node) -> str:
    """Pattern-language text of a score expression (it binds back to an equal node)."""
    return _text(node)[0]
