"""Stage 1 output: the syntax tree of a pattern source file.

Comes in: built by the lark Transformer in :mod:`patterndsl.grammar` from the
parse of one source text. Goes out: plain, immutable nodes that
:mod:`patterndsl.check` binds into the canonical IR. Nothing here knows about
types: one expression node family serves patterns, integers and predicates,
exactly as the grammar does. Every node carries the :class:`~patterndsl.ir.Span`
of its text; binary operators also carry the span of the operator itself so
errors (a zero divisor, ``&`` on integers) can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from patterndsl.ir import Span

# --------------------------------------------------------------------------- expressions


class Expr:
    """Any expression: a pattern, an integer, a boolean or a predicate, before type checking."""

    __slots__ = ()
    span: Span


@dataclass(frozen=True, slots=True)
class Number(Expr):
    """An integer literal, or a float literal (written with a decimal point or an exponent)."""

    value: int | float
    span: Span


@dataclass(frozen=True, slots=True)
class Boolean(Expr):
    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Name(Expr):
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Attribute(Expr):
    """``q.AXIS`` or ``k.AXIS`` (``base`` is checked to be ``q`` or ``k`` by check.py)."""

    base: str
    attr: str
    span: Span
    attr_span: Span


@dataclass(frozen=True, slots=True)
class Index(Expr):
    """``NAME[i, j, ...]``: an entry of a run-time input (section 7); ``base`` is checked by check.py."""

    base: str
    indices: tuple[Expr, ...]
    span: Span
    base_span: Span


@dataclass(frozen=True, slots=True)
class Keyword:
    """``name = value`` inside a call."""

    name: str
    value: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Call(Expr):
    """``func(positional..., keyword = value...)``; keywords keep their source order."""

    func: str
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]
    span: Span
    func_span: Span


@dataclass(frozen=True, slots=True)
class Tuple(Expr):
    items: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Unary(Expr):
    """``~x``, ``-x`` or ``not x``."""

    op: str
    operand: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Binary(Expr):
    """``left OP right`` for ``| + - & * / // % **``."""

    op: str
    left: Expr
    right: Expr
    span: Span
    op_span: Span


@dataclass(frozen=True, slots=True)
class Compare(Expr):
    """``a < b <= c ...``: Python chaining, ``a < b and b <= c``."""

    ops: tuple[str, ...]
    operands: tuple[Expr, ...]
    span: Span
    op_spans: tuple[Span, ...]


@dataclass(frozen=True, slots=True)
class BoolOp(Expr):
    """``a and b and ...`` or ``a or b or ...``."""

    op: str
    items: tuple[Expr, ...]
    span: Span


# --------------------------------------------------------------------------- statements


@dataclass(frozen=True, slots=True)
class Axis:
    name: str
    extent: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Layout:
    """``layout KIND(name = extent, ...)``; ``kind`` must be ``grid`` (checked by check.py)."""

    kind: str
    axes: tuple[Axis, ...]
    span: Span
    kind_span: Span


@dataclass(frozen=True, slots=True)
class Let:
    name: str
    value: Expr
    span: Span
    name_span: Span


@dataclass(frozen=True, slots=True)
class Heads:
    """``heads lo..hi: body``."""

    lo: Expr
    hi: Expr
    body: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Input:
    """``input NAME: KIND[DIMS]``; ``kind`` (``int``/``float``) and the dimensions are checked by check.py."""

    name: str
    kind: str
    dims: tuple[Expr, ...]
    span: Span
    name_span: Span
    kind_span: Span


@dataclass(frozen=True, slots=True)
class Score:
    """``score EXPR``: the logit modifier (a float expression of ``s``, positions, heads, ...)."""

    value: Expr
    span: Span


Statement = Layout | Let | Heads | Input | Score


# --------------------------------------------------------------------------- definitions


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    default: Expr | None
    span: Span


@dataclass(frozen=True, slots=True)
class PatternDef:
    """``pattern NAME(PARAMS) { statements... final }``."""

    name: str
    params: tuple[Param, ...]
    statements: tuple[Statement, ...]
    final: Expr | None
    span: Span
    name_span: Span


@dataclass(frozen=True, slots=True)
class Module:
    """One source file: its pattern definitions in source order."""

    patterns: tuple[PatternDef, ...]
    filename: str | None = None
    source: str | None = None
