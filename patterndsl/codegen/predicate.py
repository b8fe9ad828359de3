"""Stage 5 of the pipeline (codegen): a pattern node rendered as Triton integer code.

Comes in: one head group's bound pattern node (:mod:`patterndsl.ir`), the
layout and the baked-in lengths. Goes out: the body of a ``@triton.jit``
function ``_allowed_gN(i, j, h, AUX)`` that returns, for original query
indices ``i`` (``[BM, 1]``) and key indices ``j`` (``[1, BN]``) of head ``h``,
whether the pair is allowed, together with the small lookup tables
(``random``) the body reads from the ``AUX`` int8 tensor.

Rendering is two tables from node kind to code fragment: each primitive's
``triton`` rule in its registry record (:mod:`patterndsl.primitives`) and
:data:`_EXPRS` for ``where`` expressions. Triton's ``//`` and
``%`` truncate towards zero, so floor semantics go through the generated
helpers ``_fdiv``/``_fmod`` unless both operands are known non-negative.
A ``where`` whose sub-expressions can leave the int32 range (interval bounds
from :func:`patterndsl.check.expr_bounds` at the baked-in sizes) computes in
int64 from its leaves; every other predicate stays in faster int32. A divisor
that is not a constant is replaced by 1 where it is 0: ``and``/``or`` are
evaluated element-wise in the kernel, so a division a guard would have
skipped (``q > 0 and k % q == 0``) still runs, and must not trap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from patterndsl import ir, primitives
from patterndsl.errors import BackendError, PatternError

TRUE, FALSE = "True", "False"


@dataclass
class AuxTables:
    """The int8 lookup tables of every ``random`` primitive, concatenated in render order."""

    chunks: list[torch.Tensor] = field(default_factory=list)
    size: int = 0

    def add(self, table: torch.Tensor) -> int:
        """Append a flattened int8 table and return its offset."""
        offset = self.size
        flat = table.to(torch.int8).flatten()
        self.chunks.append(flat)
        self.size += int(flat.numel())
        return offset

    def tensor(self) -> torch.Tensor:
        """All tables as one int8 tensor (one zero byte when there are none: a kernel needs a pointer)."""
        if not self.chunks:
            return torch.zeros(1, dtype=torch.int8)
        return torch.cat(self.chunks)


class PredicateRenderer:
    """Renders one node into statements (``lines``) and a final boolean expression.

    Args:
        layout: the pattern's layout (None without one).
        q_len, kv_len: the baked-in lengths ``Lq`` and ``Lk``.
        aux: where ``random`` tables go.
    """

    TRUE, FALSE = TRUE, FALSE

    def __init__(self, layout: ir.Layout | None, q_len: int, kv_len: int, aux: AuxTables, heads: int = 1):
        self.layout = layout
        self.q_len = q_len
        self.kv_len = kv_len
        self.heads = heads
        self.aux = aux
        # Set while rendering a where(...) that needs int64 arithmetic (see _where).
        self.wide = False
        self.lines: list[str] = []
        self._bound: dict[str, str] = {}
        self._count = 0

    # ------------------------------------------------------------------ helpers

    def bind(self, hint: str, code: str) -> str:
        """Emit ``name = code`` once per distinct code and return the name."""
        if code in self._bound:
            return self._bound[code]
        name = f"{hint}{self._count}"
        self._count += 1
        self.lines.append(f"{name} = {code}")
        self._bound[code] = name
        return name

    def all_of(self, parts: list[str]) -> str:
        """The conjunction of boolean code fragments (``True`` when there are none)."""
        return _join("&", parts, FALSE, TRUE)

    @property
    def q_nonneg(self) -> bool:
        return self.kv_len >= self.q_len

    def where_ranges(self) -> dict:
        """Inclusive ranges of the variables a ``where`` reads here (:func:`patterndsl.check.variable_ranges`)."""
        from patterndsl import check

        return check.variable_ranges(self.q_len, self.kv_len, self.heads, self.layout)

    def needs_int64(self, pred: ir.Expr) -> bool:
        """Whether ``pred`` needs int64 arithmetic over :meth:`where_ranges`."""
        return needs_int64(pred, self.layout, self.q_len, self.kv_len, self.heads, self.where_ranges())

    def fdiv(self, a: str, b: str, nonneg: bool) -> str:
        return f"({a}) // ({b})" if nonneg else f"_fdiv({a}, {b})"

    def fmod(self, a: str, b: str, nonneg: bool) -> str:
        return f"({a}) % ({b})" if nonneg else f"_fmod({a}, {b})"

    def coord(self, side: str, axis: str) -> str:
        """Grid coordinate of ``q`` or ``k`` on ``axis`` (row-major, last axis fastest)."""
        if self.layout is None:
            raise PatternError(f"grid coordinate {side}.{axis} needs a layout grid(...)")
        names = self.layout.names
        if axis not in names:
            raise PatternError(f"layout has no axis {axis!r}")
        index = names.index(axis)
        inner = 1
        for extent in self.layout.shape[index + 1 :]:
            inner *= extent
        extent = self.layout.shape[index]
        pos = "q" if side == "q" else "k"
        scaled = pos if inner == 1 else f"{pos} // {inner}"
        return self.bind(f"{side}_{axis}_", f"({scaled}) % {extent}")

    # ------------------------------------------------------------------ entry points

    def node(self, node: ir.Node) -> str:
        """The boolean code of a pattern node."""
        if isinstance(node, ir.Prim):
            rule = primitives.lookup(node.name).triton
            if rule is None:
                raise BackendError(
                    f"primitive {node.name}(...) has no Triton fragment (its registry record opts out); "
                    "the kernel generator must replace it before rendering"
                )
            return rule(self, node)
        return _NODES[type(node)](self, node)

    def expr(self, e: ir.Expr) -> tuple[str, bool]:
        """The code of a ``where`` expression and whether it is known to be non-negative."""
        return _EXPRS[type(e)](self, e)


# ---------------------------------------------------------------------- pattern nodes


def _join(op: str, parts: list[str], absorbing: str, neutral: str) -> str:
    if absorbing in parts:
        return absorbing
    parts = [p for p in parts if p != neutral]
    if not parts:
        return neutral
    return f" {op} ".join(f"({p})" for p in parts)


def _lnot(code: str) -> str:
    if code in (TRUE, FALSE):
        return FALSE if code == TRUE else TRUE
    return f"~({code})"


_NODES: dict[type, Callable[[PredicateRenderer, ir.Node], str]] = {
    ir.Union: lambda r, n: _join("|", [r.node(x) for x in n.items], TRUE, FALSE),
    ir.Inter: lambda r, n: _join("&", [r.node(x) for x in n.items], FALSE, TRUE),
    ir.Not: lambda r, n: _lnot(r.node(n.item)),
}


_INT32 = (-(2**31), 2**31 - 1)


def needs_int64(pred: ir.Expr, layout, q_len: int, kv_len: int, heads: int, ranges: dict | None = None) -> bool:
    """Whether some sub-expression of a ``where`` predicate can leave the int32 range at these sizes.

    Args:
        pred: the ``where`` expression.
        layout, q_len, kv_len, heads: the baked-in sizes the bounds are taken at.
        ranges: the variables' ranges, when not those of these sizes (inputs, ``within``'s segments).

    Returns:
        True when int64 arithmetic is needed for exact results.
    """
    from patterndsl import check

    if ranges is None:
        ranges = check.variable_ranges(q_len, kv_len, heads, layout)
    for sub in ir.walk_expr(pred):
        lo, hi = check.expr_bounds(sub, ranges)
        if lo < _INT32[0] or hi > _INT32[1]:
            return True
    return False


# ---------------------------------------------------------------------- where expressions


def _const(r: PredicateRenderer, e: ir.Const) -> tuple[str, bool]:
    if isinstance(e.value, bool):
        return (TRUE if e.value else FALSE), True
    return (str(e.value) if e.value >= 0 else f"({e.value})"), e.value >= 0


def _var(r: PredicateRenderer, e: ir.Var) -> tuple[str, bool]:
    if e.name == "Lq":
        return str(r.q_len), True
    if e.name == "Lk":
        return str(r.kv_len), True
    nonneg = r.q_nonneg if e.name == "q" else True
    return _leaf(r, e.name, e.name), nonneg


def _leaf(r: PredicateRenderer, hint: str, code: str) -> str:
    # In a wide where(...) every variable enters as int64, so each operation on it is 64-bit.
    return r.bind(f"{hint}64_", f"({code}).to(tl.int64)") if r.wide else code


def _is_int_literal(code: str) -> bool:
    return code.lstrip("(-").rstrip(")").isdigit()


def _arith(r: PredicateRenderer, e: ir.Arith) -> tuple[str, bool]:
    (a, na), (b, nb) = r.expr(e.left), r.expr(e.right)
    if _is_int_literal(a) and _is_int_literal(b):
        value = _PY_ARITH[e.op](int(a.strip("()")), int(b.strip("()")))
        return (str(value) if value >= 0 else f"({value})"), value >= 0
    if e.op in ("//", "%") and not _is_int_literal(b):
        b = r.bind("div_", f"tl.where({b} == 0, 1, {b})")
    if e.op == "//":
        return r.fdiv(a, b, na and nb), na and nb
    if e.op == "%":
        return r.fmod(a, b, na and nb), na and nb
    return f"({a} {e.op} {b})", na and nb and e.op != "-"


_PY_ARITH = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "//": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


def _neg(r: PredicateRenderer, e: ir.Neg) -> tuple[str, bool]:
    a, _ = r.expr(e.operand)
    return f"(-{a})", False


def _func(r: PredicateRenderer, e: ir.Func) -> tuple[str, bool]:
    args = [r.expr(x) for x in e.args]
    if e.fn == "abs":
        return f"tl.abs({args[0][0]})", True
    (a, na), (b, nb) = args
    if e.fn == "min":
        return f"tl.minimum({a}, {b})", na and nb
    return f"tl.maximum({a}, {b})", na or nb


def _cmp(r: PredicateRenderer, e: ir.Cmp) -> tuple[str, bool]:
    (a, _), (b, _) = r.expr(e.left), r.expr(e.right)
    return f"{a} {e.op} {b}", True


def _logic(r: PredicateRenderer, e: ir.Logic) -> tuple[str, bool]:
    parts = [r.expr(x)[0] for x in e.items]
    if e.op == "and":
        return _join("&", parts, FALSE, TRUE), True
    return _join("|", parts, TRUE, FALSE), True


_EXPRS: dict[type, Callable] = {
    ir.Const: _const,
    ir.Var: _var,
    ir.Coord: lambda r, e: (_leaf(r, f"{e.side}_{e.axis}_", r.coord(e.side, e.axis)), True),
    ir.Arith: _arith,
    ir.Neg: _neg,
    ir.Func: _func,
    ir.Cmp: _cmp,
    ir.Logic: _logic,
    ir.LNot: lambda r, e: (_lnot(r.expr(e.operand)[0]), True),
}


def render_predicate(name: str, node: ir.Node, layout, q_len: int, kv_len: int, aux: AuxTables, heads: int = 1) -> str:
    """Render ``node`` as a ``@triton.jit`` function ``name(i, j, h, AUX)``.

    Args:
        name: the function name.
        node: the head group's pattern node.
        layout: the pattern's layout or None.
        q_len, kv_len: baked-in lengths (end alignment ``q = i + Lk - Lq``).
        aux: receives the lookup tables the function reads.
        heads: query heads (the range of ``h`` when choosing int32 or int64 arithmetic).

    Returns:
        The function's source text.
    """
    r = PredicateRenderer(layout, q_len, kv_len, aux, heads)
    body = r.node(node)
    lines = [
        "@triton.jit",
        f"def {name}(i, j, h, AUX):",
        f'    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: {node}"""',
        "    inb = (i < LQ) & (j < LK)",
        "    q = i + (LK - LQ)",
        "    k = j",
    ]
    lines += [f"    {line}" for line in r.lines]
    lines.append(f"    return inb & ({body})" if body != TRUE else "    return inb")
    if body == FALSE:
        lines[-1] = "    return inb & (i < 0)"
    return "\n".join(lines) + "\n"


#: Floor-semantics integer helpers every generated module defines (Triton's ``//`` and ``%``
#: truncate towards zero); the predicates above call them when an operand may be negative.
FLOOR_HELPERS = """@triton.jit
def _fdiv(a, b):
    # Floor division: Triton's // truncates towards zero.
    t = a // b
    return t - (((a % b) != 0) & ((a < 0) != (b < 0))).to(t.dtype)


@triton.jit
def _fmod(a, b):
    # Floor remainder (sign of the divisor), as in Python.
    r = a % b
    return r + b * (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype))"""
