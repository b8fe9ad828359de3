"""Stage 2 of the pipeline: the canonical IR of a bound pattern.

Comes in: nothing (this module only defines node types); ``check.py`` builds
these nodes from the syntax tree of ``grammar/`` once parameters are bound.
Goes out: immutable, hashable nodes that every later stage (semantics,
analysis, codegen, runtime) reads.

Two small families of nodes:

* pattern nodes (:class:`Node`): :class:`Prim` (one primitive with its
  arguments filled in signature order), :class:`Union`, :class:`Inter` and
  :class:`Not`. ``A - B`` is ``Inter(A, Not(B))``.
* integer / boolean expressions (:class:`Expr`) used inside ``where(...)``:
  constants, the variables ``q k h Lq Lk``, grid coordinates ``q.AXIS``,
  arithmetic, ``abs/min/max``, comparisons and logic.

Canonical form: unions and intersections are flattened, deduplicated and
sorted by their printed form in their constructors, so equal patterns compare
and hash equal. Source spans ride along but are excluded from equality.
Use :func:`union`, :func:`inter`, :func:`complement` and :func:`difference`
to also fold identities (``A | full == full``, ``~~A == A``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Span:
    """A source range; lines and columns count from 1, ``end_column`` is exclusive."""

    file: str | None
    line: int
    column: int
    end_line: int
    end_column: int

    def with_file(self, file: str) -> Span:
        return Span(file, self.line, self.column, self.end_line, self.end_column)


def _span():
    return field(default=None, compare=False, hash=False, repr=False)


# --------------------------------------------------------------------------- expressions


class Expr:
    """Integer or boolean expression inside ``where(...)`` (after binding)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Const(Expr):
    value: int | bool
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Var(Expr):
    """One of ``q``, ``k``, ``h``, ``Lq``, ``Lk``."""

    name: str
    span: Span | None = _span()

    NAMES: ClassVar[tuple[str, ...]] = ("q", "k", "h", "Lq", "Lk")


@dataclass(frozen=True, slots=True)
class Coord(Expr):
    """Grid coordinate ``q.AXIS`` or ``k.AXIS`` of a position under the pattern's layout."""

    side: str  # "q" or "k"
    axis: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Arith(Expr):
    """Integer arithmetic; ``//`` and ``%`` have Python's floor semantics."""

    op: str  # "+", "-", "*", "//", "%"
    left: Expr
    right: Expr
    span: Span | None = _span()

    OPS: ClassVar[tuple[str, ...]] = ("+", "-", "*", "//", "%")


@dataclass(frozen=True, slots=True)
class Neg(Expr):
    operand: Expr
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Func(Expr):
    """``abs(x)``, ``min(a, b)`` or ``max(a, b)``."""

    fn: str
    args: tuple[Expr, ...]
    span: Span | None = _span()

    ARITY: ClassVar[dict[str, int]] = {"abs": 1, "min": 2, "max": 2}


@dataclass(frozen=True, slots=True)
class Cmp(Expr):
    op: str  # "==", "!=", "<", "<=", ">", ">="
    left: Expr
    right: Expr
    span: Span | None = _span()

    OPS: ClassVar[tuple[str, ...]] = ("==", "!=", "<", "<=", ">", ">=")


@dataclass(frozen=True, slots=True)
class Logic(Expr):
    """``and`` / ``or`` over two or more boolean expressions."""

    op: str  # "and", "or"
    items: tuple[Expr, ...]
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class LNot(Expr):
    operand: Expr
    span: Span | None = _span()


# --------------------------------------------------------------------------- pattern nodes


class Node:
    """A pattern: for every (head, query position, key position), allowed or not."""

    __slots__ = ()

    def __or__(self, other: Node) -> Node:
        return union(self, other)

    def __and__(self, other: Node) -> Node:
        return inter(self, other)

    def __sub__(self, other: Node) -> Node:
        return difference(self, other)

    def __invert__(self) -> Node:
        return complement(self)

    def __str__(self) -> str:
        from patterndsl.printer import node_to_source

        return node_to_source(self)


@dataclass(frozen=True, slots=True)
class Prim(Node):
    """A primitive with every argument bound, in the order of :data:`SIGNATURES`.

    ``args`` is a tuple of ``(name, value)`` pairs. Values are ``int``,
    ``bool``, tuples of those (grid primitives, with one entry per layout
    axis after binding), ``str`` (``route``'s ``score``), a :class:`Node`
    (``route``'s ``among``) or an :class:`Expr` (``where``'s predicate).
    """

    name: str
    args: tuple[tuple[str, Any], ...] = ()
    span: Span | None = _span()

    def arg(self, name: str) -> Any:
        for key, value in self.args:
            if key == name:
                return value
        raise KeyError(f"{self.name} has no argument {name!r}")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


def _sort_key(node: Node) -> str:
    from patterndsl.printer import node_to_source

    return node_to_source(node)


def _flatten(kind: type, items) -> tuple[Node, ...]:
    flat: dict[Node, None] = {}
    for item in items:
        if isinstance(item, kind):
            for sub in item.items:
                flat[sub] = None
        else:
            flat[item] = None
    return tuple(sorted(flat, key=_sort_key))


@dataclass(frozen=True, slots=True)
class Union(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()

    def __post_init__(self):
        object.__setattr__(self, "items", _flatten(Union, self.items))


@dataclass(frozen=True, slots=True)
class Inter(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()

    def __post_init__(self):
        object.__setattr__(self, "items", _flatten(Inter, self.items))


@dataclass(frozen=True, slots=True)
class Not(Node):
    item: Node
    span: Span | None = _span()


FULL = Prim("full")
EMPTY = Prim("empty")
CAUSAL = Prim("causal")


def union(*items: Node, span: Span | None = None) -> Node:
    """``items[0] | items[1] | ...`` with identities folded."""
    parts = _flatten(Union, items)
    if FULL in parts:
        return FULL
    parts = tuple(p for p in parts if p != EMPTY)
    if any(Not(p) in parts for p in parts):
        return FULL
    if not parts:
        return EMPTY
    if len(parts) == 1:
        return parts[0]
    return Union(parts, span)


def inter(*items: Node, span: Span | None = None) -> Node:
    """``items[0] & items[1] & ...`` with identities folded."""
    parts = _flatten(Inter, items)
    if EMPTY in parts:
        return EMPTY
    parts = tuple(p for p in parts if p != FULL)
    if any(Not(p) in parts for p in parts):
        return EMPTY
    if not parts:
        return FULL
    if len(parts) == 1:
        return parts[0]
    return Inter(parts, span)


def complement(item: Node, span: Span | None = None) -> Node:
    """``~item`` with identities folded."""
    if isinstance(item, Not):
        return item.item
    if item == FULL:
        return EMPTY
    if item == EMPTY:
        return FULL
    return Not(item, span)


def difference(a: Node, b: Node, span: Span | None = None) -> Node:
    """``a - b``, that is ``a & ~b``."""
    return inter(a, complement(b), span=span)


# --------------------------------------------------------------------------- signatures


#: Argument kinds: "int", "ints" (int or tuple of ints), "bools" (bool or tuple
#: of bools), "pred" (boolean Expr), "pattern" (a Node), "score" (a name).
@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: str
    default: Any = None  # None = required
    required: bool = False


_REGISTRY: dict | None = None  # patterndsl.primitives.REGISTRY once loaded


class _RegistryView(Mapping):
    """Read-only name -> value view of the primitive registry, loaded on first use.

    ``ir`` is imported before everything else and the registry's family modules import
    ``ir``, so the registry is looked up lazily here and never imported at module level.
    """

    def __init__(self, value: Callable[[Any], Any], keep: Callable[[Any], bool] = lambda record: True):
        self._value = value
        self._keep = keep

    @staticmethod
    def _registry() -> dict:
        global _REGISTRY
        if _REGISTRY is None:
            from patterndsl.primitives import REGISTRY

            _REGISTRY = REGISTRY
        return _REGISTRY

    def _items(self) -> dict[str, Any]:
        return {name: self._value(r) for name, r in self._registry().items() if self._keep(r)}

    def __getitem__(self, name: str) -> Any:
        record = self._registry()[name]
        if not self._keep(record):
            raise KeyError(name)
        return self._value(record)

    def __contains__(self, name: object) -> bool:
        record = self._registry().get(name)
        return record is not None and self._keep(record)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return repr(self._items())


#: Every primitive of the language: name -> parameters in positional order
#: (a view of :data:`patterndsl.primitives.REGISTRY`, where each primitive is defined).
#: ``route``'s ``qblock`` default ``None`` means "same as block".
SIGNATURES: Mapping[str, tuple[Param, ...]] = _RegistryView(lambda record: record.params)

#: Primitives whose meaning needs a ``layout grid(...)`` (a set-like view: ``name in GRID_PRIMITIVES``).
GRID_PRIMITIVES = _RegistryView(lambda record: record, lambda record: record.grid).keys()
#: Primitives decided from the data at run time.
DYNAMIC_PRIMITIVES = _RegistryView(lambda record: record, lambda record: record.dynamic).keys()
#: ``route(score=...)`` values.
SCORES = ("mean", "max", "landmark")


# --------------------------------------------------------------------------- bound pattern


@dataclass(frozen=True, slots=True)
class Layout:
    """``layout grid(a = A, b = B, ...)``: row-major, last axis fastest."""

    axes: tuple[tuple[str, int], ...]
    span: Span | None = _span()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(extent for _, extent in self.axes)

    @property
    def size(self) -> int:
        total = 1
        for _, extent in self.axes:
            total *= extent
        return total


@dataclass(frozen=True, slots=True)
class HeadRule:
    """``heads lo..hi: node`` gives heads ``lo <= h < hi`` their own pattern."""

    lo: int
    hi: int
    node: Node
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class PatternIR:
    """A checked pattern with every parameter bound: what ``compile`` returns inside a Pattern."""

    name: str
    params: tuple[tuple[str, Any], ...]
    layout: Layout | None
    heads: tuple[HeadRule, ...]
    default: Node | None
    span: Span | None = _span()

    def node_for_head(self, h: int) -> Node | None:
        """The pattern node of head ``h``: the first ``heads`` line covering it, else the default."""
        for rule in self.heads:
            if rule.lo <= h < rule.hi:
                return rule.node
        return self.default


# --------------------------------------------------------------------------- traversal


def children(node: Node) -> tuple[Node, ...]:
    """Direct sub-patterns (``route``'s ``among`` counts as one)."""
    if isinstance(node, (Union, Inter)):
        return node.items
    if isinstance(node, Not):
        return (node.item,)
    if isinstance(node, Prim):
        return tuple(v for _, v in node.args if isinstance(v, Node))
    return ()


def walk(node: Node):
    """Yield ``node`` and every sub-pattern, parents first."""
    yield node
    for child in children(node):
        yield from walk(child)


def expr_children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, (Arith, Cmp)):
        return (expr.left, expr.right)
    if isinstance(expr, (Neg, LNot)):
        return (expr.operand,)
    if isinstance(expr, (Func, Logic)):
        return expr.args if isinstance(expr, Func) else expr.items
    return ()


def walk_expr(expr: Expr):
    yield expr
    for child in expr_children(expr):
        yield from walk_expr(child)


def uses_head(node: Node) -> bool:
    """True when the pattern's meaning depends on the head index ``h``."""
    registry = _RegistryView._registry()
    for sub in walk(node):
        if isinstance(sub, Prim):
            rule = registry[sub.name].reads_head
            if rule is not None and rule(sub):
                return True
    return False


def is_dynamic(node: Node) -> bool:
    """True when the pattern contains ``route(...)``."""
    return any(isinstance(sub, Prim) and sub.name in DYNAMIC_PRIMITIVES for sub in walk(node))
