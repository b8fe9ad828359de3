"""Tile rules, interval reasoning for ``where`` predicates: bounds of an expression over boxes of positions.

Comes in: a ``where`` expression and a batch of boxes, each a range of query
positions times a range of key positions (flattened, and per grid axis).
Goes out: per box, the interval ``[lo, hi]`` an integer expression can take,
or whether a boolean expression can be true and whether it can be false, plus
whether the answer is *sound* (no divisor of ``//`` or ``%`` can be zero in
the box; such boxes are left to element-wise evaluation, which reports the
error exactly where the meaning does). Every operator of the language has a
rule: ``+ - *`` by interval arithmetic, ``//`` and ``%`` exactly on ranges that
do not cross a multiple of a constant divisor (``q // 64`` over an aligned
tile is one value), ``abs``, ``min``, ``max``, comparisons and three-valued
``and``/``or``/``not``. The bounds are over-approximations, so "cannot be
true" and "cannot be false" are always right; the engine refines the boxes
that stay undecided.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patterndsl import ir


@dataclass
class Boxes:
    """A batch of boxes: query and key position ranges, flattened and per grid axis.

    Attributes:
        qlo, qhi, klo, khi: int64 ``[B]`` flattened position ranges (inclusive).
        qalo, qahi, kalo, kahi: int64 ``[B, D]`` per-axis coordinate ranges (D = 1 in 1-D).
        qstep, kstep: int64 ``[B, D]`` per-axis steps: every position of the box is ``lo`` plus a
            multiple of the step (None: 1), which makes ``%`` exact on residue classes.
    """

    qlo: np.ndarray
    qhi: np.ndarray
    klo: np.ndarray
    khi: np.ndarray
    qalo: np.ndarray
    qahi: np.ndarray
    kalo: np.ndarray
    kahi: np.ndarray
    qstep: np.ndarray | None = None
    kstep: np.ndarray | None = None


def pieces_boxes(qp, kp) -> Boxes:
    """The hull boxes of aligned query and key pieces (:class:`~patterndsl.analysis.tiles.Pieces`)."""
    return Boxes(qp.fmin, qp.fmax, kp.fmin, kp.fmax, qp.a, qp.last, kp.a, kp.last, qp.s, kp.s)


def decide(pred: ir.Expr, boxes: Boxes, env) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whether ``pred`` can be true, can be false, and whether that answer is sound, per box."""
    sound = np.ones(len(boxes.qlo), bool)
    value = _eval(pred, boxes, env, sound)
    t, f = _as_bool(value, len(boxes.qlo))
    return t, f, sound


def _full(n, v):
    return np.full(n, v, np.int64)


def _as_int(value, n):
    kind, a, b = value[:3]
    if kind == "int":
        return a, b
    # A boolean used as a number is 0 or 1.
    return np.where(b, 0, 1).astype(np.int64), np.where(a, 1, 0).astype(np.int64)


def _congruence(value, n):
    """``(g, r)``: every value is ``r`` mod ``g`` (``g == 0``: the value is exactly ``r``)."""
    if value[0] == "int" and len(value) == 5:
        return value[3], value[4]
    return np.ones(n, np.int64), np.zeros(n, np.int64)


def _as_bool(value, n):
    kind, a, b = value[:3]
    if kind == "bool":
        return a, b
    # An integer used as a truth value: true where non-zero.
    return (a != 0) | (b != 0) | (a < 0) & (b > 0), (a <= 0) & (b >= 0)


def _var(lo, hi, step, n):
    # Positions lo + step * t: congruent to lo modulo the step (exactly lo when lo == hi).
    if step is None:
        g = np.where(lo == hi, 0, 1)
    else:
        g = np.where(lo == hi, 0, step)
    return "int", lo, hi, g.astype(np.int64), lo


def _eval(e: ir.Expr, bx: Boxes, env, sound: np.ndarray):
    n = len(bx.qlo)
    if isinstance(e, ir.Const):
        if isinstance(e.value, bool):
            return "bool", np.full(n, e.value), np.full(n, not e.value)
        return "int", _full(n, e.value), _full(n, e.value), _full(n, 0), _full(n, e.value)
    if isinstance(e, ir.Var):
        if e.name == "q":
            return _var(bx.qlo, bx.qhi, None if bx.qstep is None or bx.qstep.shape[1] != 1 else bx.qstep[:, 0], n)
        if e.name == "k":
            return _var(bx.klo, bx.khi, None if bx.kstep is None or bx.kstep.shape[1] != 1 else bx.kstep[:, 0], n)
        v = {"h": env.head, "Lq": env.q_len, "Lk": env.kv_len}[e.name]
        return "int", _full(n, v), _full(n, v), _full(n, 0), _full(n, v)
    if isinstance(e, ir.Coord):
        x = env.layout.names.index(e.axis)
        if e.side == "q":
            step = None if bx.qstep is None else bx.qstep[:, x]
            return _var(bx.qalo[:, x], bx.qahi[:, x], step, n)
        step = None if bx.kstep is None else bx.kstep[:, x]
        return _var(bx.kalo[:, x], bx.kahi[:, x], step, n)
    if isinstance(e, ir.Neg):
        inner = _eval(e.operand, bx, env, sound)
        lo, hi = _as_int(inner, n)
        g, r = _congruence(inner, n)
        return "int", -hi, -lo, g, -r
    if isinstance(e, ir.Arith):
        left, right = _eval(e.left, bx, env, sound), _eval(e.right, bx, env, sound)
        a, b = _as_int(left, n), _as_int(right, n)
        lo, hi = _ARITH[e.op](a, b, sound)
        gl, rl = _congruence(left, n)
        g, r = _combine_congruence(e.op, (gl, rl), _congruence(right, n))
        if e.op == "%":
            # x % c with x == r (mod g) and c dividing g: one value, r % c.
            c = np.where(b[0] != 0, b[0], 1)
            known = (b[0] == b[1]) & (b[0] != 0) & (gl % c == 0)
            value = np.where(known, rl % c, 0)
            lo, hi = np.where(known, value, lo), np.where(known, value, hi)
            g, r = np.where(known, 0, 1), np.where(known, value, 0)
        return "int", lo, hi, g, np.where(g == 0, lo, r)
    if isinstance(e, ir.Func):
        args = [_as_int(_eval(x, bx, env, sound), n) for x in e.args]
        if e.fn == "abs":
            lo, hi = args[0]
            return "int", np.where(lo >= 0, lo, np.where(hi <= 0, -hi, 0)), np.maximum(np.abs(lo), np.abs(hi))
        (alo, ahi), (blo, bhi) = args
        if e.fn == "min":
            return "int", np.minimum(alo, blo), np.minimum(ahi, bhi)
        return "int", np.maximum(alo, blo), np.maximum(ahi, bhi)
    if isinstance(e, ir.Cmp):
        a = _as_int(_eval(e.left, bx, env, sound), n)
        b = _as_int(_eval(e.right, bx, env, sound), n)
        return "bool", *_CMP[e.op](a, b)
    if isinstance(e, ir.Logic):
        parts = [_as_bool(_eval(x, bx, env, sound), n) for x in e.items]
        if e.op == "and":
            t = np.logical_and.reduce([p[0] for p in parts])
            f = np.logical_or.reduce([p[1] for p in parts])
        else:
            t = np.logical_or.reduce([p[0] for p in parts])
            f = np.logical_and.reduce([p[1] for p in parts])
        return "bool", t, f
    if isinstance(e, ir.LNot):
        t, f = _as_bool(_eval(e.operand, bx, env, sound), n)
        return "bool", f, t
    raise TypeError(f"unknown expression node {type(e).__name__}")


def _combine_congruence(op, left, right):
    (g1, r1), (g2, r2) = left, right
    if op == "+":
        return np.gcd(g1, g2), r1 + r2
    if op == "-":
        return np.gcd(g1, g2), r1 - r2
    if op == "*":
        # (r1 + g1 i)(r2 + g2 j): exact when one side is a constant (g == 0).
        const1, const2 = g1 == 0, g2 == 0
        g = np.where(const2, g1 * np.abs(r2), np.where(const1, g2 * np.abs(r1), 1))
        return g, np.where(const1 | const2, r1 * r2, 0)
    one = np.ones_like(g1)
    both = (g1 == 0) & (g2 == 0)
    return np.where(both, 0, one), np.zeros_like(r1)


def _corners(values):
    # pairwise minimum / maximum: no stacked copy of the four corners
    a, b, c, d = values
    return np.minimum(np.minimum(a, b), np.minimum(c, d)), np.maximum(np.maximum(a, b), np.maximum(c, d))


def _mul(a, b, sound):
    (alo, ahi), (blo, bhi) = a, b
    return _corners([alo * blo, alo * bhi, ahi * blo, ahi * bhi])


def _nonzero_divisor(b, sound):
    blo, bhi = b
    zero = (blo <= 0) & (bhi >= 0)
    sound &= ~zero
    # Where the divisor may be zero the box is unsound anyway; any non-zero stand-in keeps the arithmetic finite.
    return np.where(zero, 1, blo), np.where(zero, 1, bhi)


def _floordiv(a, b, sound):
    (alo, ahi) = a
    if len(b[0]) and b[0][0] > 0 and (b[0] == b[0][0]).all() and (b[1] == b[0][0]).all():
        # one positive divisor (``q // 64``): floor division is non-decreasing in a
        return alo // b[0][0], ahi // b[0][0]
    blo, bhi = _nonzero_divisor(b, sound)
    # b does not change sign, so a / b is monotone in each argument and floor keeps that:
    # the extremes are at the corners.
    return _corners([alo // blo, alo // bhi, ahi // blo, ahi // bhi])


def _mod(a, b, sound):
    (alo, ahi) = a
    blo, bhi = _nonzero_divisor(b, sound)
    const = blo == bhi
    # A constant divisor and a range inside one period: a % c = a - c * (a // c) is a shift of a.
    same = const & (alo // blo == ahi // blo)
    pos = blo > 0
    lo = np.where(pos, 0, blo + 1)
    hi = np.where(pos, bhi - 1, 0)
    # 0 <= a < b for every divisor: a % b = a.
    below = pos & (alo >= 0) & (ahi < blo)
    lo = np.where(same, alo % blo, np.where(below, alo, lo))
    hi = np.where(same, ahi % blo, np.where(below, ahi, hi))
    return lo, hi


_ARITH = {
    "+": lambda a, b, s: (a[0] + b[0], a[1] + b[1]),
    "-": lambda a, b, s: (a[0] - b[1], a[1] - b[0]),
    "*": _mul,
    "//": _floordiv,
    "%": _mod,
}


def _eq(a, b):
    (alo, ahi), (blo, bhi) = a, b
    can_true = (alo <= bhi) & (blo <= ahi)
    can_false = ~((alo == ahi) & (blo == bhi) & (alo == blo))
    return can_true, can_false


_CMP = {
    "<": lambda a, b: (a[0] < b[1], a[1] >= b[0]),
    "<=": lambda a, b: (a[0] <= b[1], a[1] > b[0]),
    ">": lambda a, b: (a[1] > b[0], a[0] <= b[1]),
    ">=": lambda a, b: (a[1] >= b[0], a[0] < b[1]),
    "==": _eq,
    "!=": lambda a, b: _eq(a, b)[::-1],
}
