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
sorted by a structural key (:func:`sort_key`, computed once per node, never by
printing) in their constructors, so equal patterns compare and hash equal.
Source spans ride along but are excluded from equality.
Use :func:`union`, :func:`inter`, :func:`complement` and :func:`difference`
to also fold identities (``A | full == full``, ``~~A == A``, ...).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields
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


def _derived():
    """A pattern node's cached sort key or hash: a slot outside equality, hashing and the constructor."""
    return field(init=False, compare=False, hash=False, repr=False)


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
class InputRef(Expr):
    """An entry of a run-time input (LANGUAGE.md section 7): ``NAME[i, ...]``, or bare ``NAME``.

    ``indices`` index the declared dimensions after ``batch`` (never written: always the current
    batch element), one expression each; an index outside its dimension reads the nearest entry.
    ``kind`` is the declared element type, ``"int"`` or ``"float"`` (a float is never part of a
    mask; ``score`` reads it). :func:`patterndsl.primitives.inputs.read` evaluates it.
    """

    name: str
    indices: tuple[Expr, ...] = ()
    kind: str = "int"
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

    def __reduce__(self):
        # Rebuilt through the constructor: a cached hash (of str names) is only valid in its process.
        return type(self), tuple(getattr(self, f.name) for f in fields(self) if f.init)


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
    _key: tuple = _derived()
    _hash: int = _derived()

    def __post_init__(self):
        key = (_RANK_PRIM, self.name, tuple((name, _value_key(value)) for name, value in self.args))
        _set_key(self, key, hash((self.name, self.args)))

    def __hash__(self) -> int:
        return self._hash

    def arg(self, name: str) -> Any:
        for key, value in self.args:
            if key == name:
                return value
        raise KeyError(f"{self.name} has no argument {name!r}")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)


# Canonical order. Every pattern node carries ``_key``, a tuple computed once in its
# constructor from its kind, its name and arguments and its children's keys (already computed:
# nodes are immutable and built bottom-up); equal nodes have equal keys and unequal nodes unequal
# ones, so sorting by key and dropping neighbours with equal keys is the canonical
# flatten-dedupe-sort of unions and intersections. The kind ranks put primitives first (by name,
# then arguments), then nested unions, intersections and complements: what the printed order
# mostly gave (``causal & (sink(4) | window(256))``, ``causal & ~window(4)``).
_RANK_PRIM, _RANK_UNION, _RANK_INTER, _RANK_NOT = 0, 1, 2, 3


def _value_key(value: Any) -> tuple:
    """The sort key of one argument value; a type tag first keeps unlike values comparable."""
    if isinstance(value, int):  # bool included: True == 1 for equality, so for the key too
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    if isinstance(value, tuple):
        return (2, tuple(_value_key(v) for v in value))
    if isinstance(value, Node):
        return (3, value._key)
    if isinstance(value, Expr):
        return (4, expr_key(value))
    if value is None:
        return (-1,)
    raise TypeError(f"not an IR argument value: {value!r}")


def expr_key(expr: Expr) -> tuple:
    """A structural sort key of a ``where`` expression: equal expressions, equal keys."""
    if isinstance(expr, Const):
        return (0, expr.value)
    if isinstance(expr, Var):
        return (1, expr.name)
    if isinstance(expr, Coord):
        return (2, expr.side, expr.axis)
    if isinstance(expr, (Arith, Cmp)):
        return (3 if isinstance(expr, Arith) else 6, expr.op, expr_key(expr.left), expr_key(expr.right))
    if isinstance(expr, (Neg, LNot)):
        return (4 if isinstance(expr, Neg) else 8, expr_key(expr.operand))
    if isinstance(expr, Func):
        return (5, expr.fn, tuple(expr_key(a) for a in expr.args))
    if isinstance(expr, Logic):
        return (7, expr.op, tuple(expr_key(a) for a in expr.items))
    if isinstance(expr, InputRef):
        return (9, expr.name, expr.kind, tuple(expr_key(a) for a in expr.indices))
    raise TypeError(f"not an expression: {expr!r}")


def sort_key(node: Node) -> tuple:
    """The structural key that orders the items of unions and intersections (never printed text)."""
    return node._key


_key_of = operator.attrgetter("_key")


def _set_key(node: Node, key: tuple, hashed: int) -> None:
    object.__setattr__(node, "_key", key)
    object.__setattr__(node, "_hash", hashed)


def _find(items: tuple[Node, ...], node: Node) -> int:
    """Index of ``node`` in sorted ``items``, or -1."""
    key = node._key
    at = bisect.bisect_left(items, key, key=_key_of)
    return at if at < len(items) and items[at]._key == key else -1


def _flatten(kind: type, items) -> tuple[Node, ...]:
    """Items of ``kind`` nodes spliced in, sorted by key, duplicates dropped.

    Items that are ``kind`` nodes are sorted already; a canonical node and one more item (the
    Python operators applied one by one) is a binary search and one copy, not a sort.
    """
    if len(items) == 2:
        a, b = items
        if isinstance(b, kind) and not isinstance(a, kind):
            a, b = b, a
        if isinstance(a, kind) and not isinstance(b, kind):
            base = a.items
            at = bisect.bisect_left(base, b._key, key=_key_of)
            if at < len(base) and base[at]._key == b._key:
                return base
            return (*base[:at], b, *base[at:])
    flat: list[Node] = []
    for item in items:
        if isinstance(item, kind):
            flat.extend(item.items)
        else:
            flat.append(item)
    if len(flat) < 2:
        return tuple(flat)
    flat.sort(key=_key_of)
    out = [flat[0]]
    last = flat[0]._key
    for item in flat[1:]:
        key = item._key
        if key != last:
            out.append(item)
            last = key
    return tuple(out)


def _has_complement_pair(parts: tuple[Node, ...]) -> bool:
    """Whether some item's complement is an item too (complements sort last)."""
    for item in reversed(parts):
        if not isinstance(item, Not):
            return False
        if _find(parts, item.item) >= 0:
            return True
    return False


def _combined_hash(node: Union | Inter) -> int:
    # Computed on first use: unions built one operand at a time are rarely hashed on the way.
    try:
        return node._hash
    except AttributeError:
        hashed = hash((node._key[0], node.items))
        object.__setattr__(node, "_hash", hashed)
        return hashed


@dataclass(frozen=True, slots=True)
class Union(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()
    _key: tuple = _derived()
    _hash: int = _derived()

    def __post_init__(self):
        items = _flatten(Union, self.items)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_key", (_RANK_UNION, tuple(map(_key_of, items))))

    def __hash__(self) -> int:
        return _combined_hash(self)


@dataclass(frozen=True, slots=True)
class Inter(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()
    _key: tuple = _derived()
    _hash: int = _derived()

    def __post_init__(self):
        items = _flatten(Inter, self.items)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "_key", (_RANK_INTER, tuple(map(_key_of, items))))

    def __hash__(self) -> int:
        return _combined_hash(self)


@dataclass(frozen=True, slots=True)
class Not(Node):
    item: Node
    span: Span | None = _span()
    _key: tuple = _derived()
    _hash: int = _derived()

    def __post_init__(self):
        _set_key(self, (_RANK_NOT, self.item._key), hash((_RANK_NOT, self.item)))

    def __hash__(self) -> int:
        return self._hash


def _canonical(kind: type, parts: tuple[Node, ...], span: Span | None) -> Node:
    """A ``kind`` node over ``parts`` that are canonical already (sorted, deduplicated): no second sort."""
    node = object.__new__(kind)
    object.__setattr__(node, "items", parts)
    object.__setattr__(node, "span", span)
    rank = _RANK_UNION if kind is Union else _RANK_INTER
    object.__setattr__(node, "_key", (rank, tuple(map(_key_of, parts))))
    return node


FULL = Prim("full")
EMPTY = Prim("empty")
CAUSAL = Prim("causal")


def _fold(kind: type, items, span: Span | None, absorbing: Node, neutral: Node) -> Node:
    parts = _flatten(kind, items)
    if _find(parts, absorbing) >= 0 or _has_complement_pair(parts):
        return absorbing
    at = _find(parts, neutral)
    if at >= 0:
        parts = parts[:at] + parts[at + 1 :]
    if not parts:
        return neutral
    if len(parts) == 1:
        return parts[0]
    return _canonical(kind, parts, span)


def union(*items: Node, span: Span | None = None) -> Node:
    """``items[0] | items[1] | ...`` with identities folded."""
    return _fold(Union, items, span, FULL, EMPTY)


def inter(*items: Node, span: Span | None = None) -> Node:
    """``items[0] & items[1] & ...`` with identities folded."""
    return _fold(Inter, items, span, EMPTY, FULL)


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


def check_grid_axis(base: str, attr: str, layout: Layout | None, span: Span | None, attr_span: Span | None) -> None:
    """Refuse ``base.attr`` unless it names a grid coordinate: ``base`` is ``q`` or ``k`` and ``attr`` an
    axis of the declared ``layout`` (the rule of masks' ``where`` and of ``score`` alike)."""
    from patterndsl.errors import LayoutError, PatternNameError, did_you_mean

    if base not in ("q", "k"):
        raise PatternNameError(f"'{base}.{attr}': only q.AXIS and k.AXIS exist", span)
    if layout is None:
        raise LayoutError(f"'{base}.{attr}' needs a layout grid(...) declared before it", span)
    if attr not in layout.names:
        hint = did_you_mean(attr, layout.names)
        raise PatternNameError(
            f"the layout has no axis '{attr}'{hint}; its axes are {', '.join(layout.names)}", attr_span
        )


@dataclass(frozen=True, slots=True)
class HeadRule:
    """``heads lo..hi: node`` gives heads ``lo <= h < hi`` their own pattern."""

    lo: int
    hi: int
    node: Node
    span: Span | None = _span()


#: Named dimensions of an input declaration (any other dimension is an integer table extent).
INPUT_DIMS = ("batch", "token", "head", "dim")


@dataclass(frozen=True, slots=True)
class InputDecl:
    """``input NAME: KIND[DIMS]``: a run-time input the pattern receives at every call.

    ``dims`` are ``"batch"`` (first or absent), ``"token"``, ``"head"``, ``"dim"`` or an integer
    table extent; ``kind`` is ``"int"`` or ``"float"``.
    """

    name: str
    kind: str
    dims: tuple[str | int, ...]
    span: Span | None = _span()

    @property
    def batched(self) -> bool:
        return bool(self.dims) and self.dims[0] == "batch"

    @property
    def index_dims(self) -> tuple[str | int, ...]:
        """The dimensions an expression indexes (all but ``batch``)."""
        return self.dims[1:] if self.batched else self.dims


@dataclass(frozen=True, slots=True)
class PatternIR:
    """A checked pattern with every parameter bound: what ``compile`` returns inside a Pattern."""

    name: str
    params: tuple[tuple[str, Any], ...]
    layout: Layout | None
    heads: tuple[HeadRule, ...]
    default: Node | None
    span: Span | None = _span()
    #: The run-time inputs (section 7), in declaration order.
    inputs: tuple[InputDecl, ...] = ()
    #: The ``score`` statement's expression (a :class:`patterndsl.scores.Score`), or None.
    score: Any = None

    #: The ``score`` statement's expression (a :class:`patterndsl.scores.Score`), or None.
    score: Any = None

    def input(self, name: str) -> InputDecl | None:
        """The declaration of input ``name``, or None."""
        return next((d for d in self.inputs if d.name == name), None)

    def nodes(self) -> tuple[Node, ...]:
        """Every pattern node of the definition: the heads lines' and the final expression."""
        return tuple(rule.node for rule in self.heads) + (() if self.default is None else (self.default,))

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
    if isinstance(expr, InputRef):
        return expr.indices
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


def routes(node: Node) -> tuple[Prim, ...]:
    """The distinct run-time primitives (``route``) of ``node``, in the order :func:`walk` meets them."""
    return tuple(dict.fromkeys(sub for sub in walk(node) if isinstance(sub, Prim) and sub.name in DYNAMIC_PRIMITIVES))


# --------------------------------------------------------------------------- passes


def substitute(node: Node, fn: Callable[[Prim, int], Node], sign: int = 1) -> Node:
    """The pass IR -> IR that replaces primitives: each ``p`` by ``fn(p, sign)``, identities folded.

    Every "replace ``route`` by ``empty``/``full``" rewrite (the bounds of a dynamic pattern,
    its meaning where no route reaches, the corners of the run-time merge) is this pass.

    Args:
        node: a pattern node.
        fn: the replacement of a primitive; ``sign`` is its polarity, +1 under an even number of
            complements and -1 under an odd one. Return the primitive itself to keep it.
        sign: the polarity of ``node`` itself.

    Returns:
        The rewritten node; ``node`` itself (span included) when nothing changed. ``route``'s
        ``among`` is an argument, not part of the meaning: it is not entered.
    """
    if isinstance(node, Prim):
        return fn(node, sign)
    if isinstance(node, Not):
        item = substitute(node.item, fn, -sign)
        return node if item is node.item else complement(item)
    items = [substitute(item, fn, sign) for item in node.items]
    if all(new is old for new, old in zip(items, node.items, strict=True)):
        return node
    return (union if isinstance(node, Union) else inter)(*items)


def replace(node: Node, values: Mapping[Prim, Node]) -> Node:
    """``node`` with each primitive ``p`` in ``values`` replaced by ``values[p]`` (:func:`substitute`)."""
    return substitute(node, lambda prim, _sign: values.get(prim, prim))


def route_bound(node: Node, lower: bool, only: Collection[Prim] | None = None) -> Node:
    """``node`` with each route (of ``only``; all when None) replaced by ``empty``/``full`` as a bound.

    Under its polarity a route is replaced so that the result is contained in ``node`` for
    every choice (``lower``) or contains it (upper): ``empty`` / ``full`` at +1, swapped at -1.
    """

    def fn(prim: Prim, sign: int) -> Node:
        if prim.name not in DYNAMIC_PRIMITIVES or (only is not None and prim not in only):
            return prim
        return EMPTY if (sign > 0) == lower else FULL

    return substitute(node, fn)


def polarities(node: Node) -> dict[Prim, set[int]]:
    """``{route: {+1, -1}}``: the polarities (see :func:`substitute`) each route of ``node`` occurs under."""
    out: dict[Prim, set[int]] = {}

    def record(prim: Prim, sign: int) -> Node:
        if prim.name in DYNAMIC_PRIMITIVES:
            out.setdefault(prim, set()).add(sign)
        return prim

    substitute(node, record)
    return out


# --------------------------------------------------------------------------- run-time inputs


def reads_inputs(node: Node) -> bool:
    """True when ``node``'s meaning reads run-time inputs (``within``, or ``where`` over an input)."""
    return any(isinstance(sub, Prim) and prim_reads_inputs(sub) for sub in walk(node))


def prim_reads_inputs(prim: Prim) -> bool:
    """True for ``within(...)`` and for a primitive whose expression arguments read an input."""
    if prim.name in ("within", *CONTENT_PRIMITIVES):
        return True
    return any(
        isinstance(value, Expr) and any(isinstance(e, InputRef) for e in walk_expr(value)) for _, value in prim.args
    )


def mask_input_names(pattern: PatternIR) -> frozenset[str]:
    """The declared inputs the pattern's mask reads: ``within`` segments, ``cluster`` centroids, and inputs
    in primitive expressions. Inputs that only the ``score`` reads are not among them (``lsh`` reads none).
    """
    names: set[str] = set()
    for node in pattern.nodes():
        for sub in walk(node):
            if not isinstance(sub, Prim):
                continue
            if sub.name in ("within", "cluster"):
                names.add(sub.arg("seg" if sub.name == "within" else "centroids"))
            for _, value in sub.args:
                if isinstance(value, Expr):
                    names.update(e.name for e in walk_expr(value) if isinstance(e, InputRef))
    return frozenset(names)


#: Primitives that label tokens from the call's ``Q``/``K`` (``primitives/clusters.py``); planned as data.
CONTENT_PRIMITIVES = ("cluster", "lsh")


def contents(node: Node) -> tuple[Prim, ...]:
    """The distinct content primitives (``cluster``, ``lsh``) of ``node``, in the order :func:`walk` meets them."""
    return tuple(dict.fromkeys(s for s in walk(node) if isinstance(s, Prim) and s.name in CONTENT_PRIMITIVES))


def hoist_contents(node: Node) -> Node:
    """``node`` with every content primitive moved out of ``within(...)`` bodies (an exact rewrite).

    A label belongs to a token, not to a position, so segment coordinates do not change it:
    ``within(S, P) == (x & within(S, P[x := full])) | (~x & within(S, P[x := empty]))`` for a content
    primitive ``x`` of ``P`` (Shannon's expansion), repeated until no body holds one.
    """

    def fn(prim: Prim, sign: int) -> Node:
        body = prim.arg("body") if prim.name == "within" else None
        found = contents(body) if body is not None else ()
        if not found:
            return prim
        x = found[0]

        def within(value: Node) -> Node:
            if value == EMPTY:
                return EMPTY
            args = tuple((k, value if k == "body" else v) for k, v in prim.args)
            return hoist_contents(Prim(prim.name, args, prim.span))

        allowed, refused = within(replace(body, {x: FULL})), within(replace(body, {x: EMPTY}))
        return union(inter(x, allowed), inter(complement(x), refused))

    return substitute(node, fn)


def input_bound(node: Node, lower: bool) -> Node:
    """``node`` with each primitive that reads inputs replaced by ``empty``/``full`` as a bound.

    Like :func:`route_bound`: the result is contained in ``node`` for every input (``lower``)
    or contains it (upper).
    """

    def fn(prim: Prim, sign: int) -> Node:
        if not prim_reads_inputs(prim):
            return prim
        if (sign > 0) == lower:
            return EMPTY
        return _within_hull(prim) if prim.name == "within" else FULL

    return substitute(node, fn)


def _within_hull(prim: Prim) -> Node:
    """A static superset of ``within(SEG, P)`` for any data: ``P`` keeping its bands.

    A band depends on ``q - k`` only, which a segment's own coordinates do not change, so ``P``
    with every other primitive replaced by ``full`` (``empty`` under a complement) contains
    ``within(SEG, P)`` (``within(doc, causal)`` is inside ``causal``).
    """
    registry = _RegistryView._registry()

    def keep_bands(inner: Prim, sign: int) -> Node:
        rule = registry[inner.name].band
        if rule is not None and rule(inner, None) is not None:
            return inner
        return FULL if sign > 0 else EMPTY

    return substitute(prim.arg("body"), keep_bands)
