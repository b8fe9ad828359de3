"""Tile rules, residue reasoning for ``where`` predicates that repeat with small periods in ``q`` and ``k``.

Comes in: a ``where`` predicate (1-D positions) and aligned query / key pieces (progressions
``a + s * t``, ``t < n``). Goes out: the predicate's periods ``(Pq, Pk)`` when it has small ones,
and per pair of pieces the exact number of allowed pairs, from which a tile is empty, partial
or full.

A predicate that reads ``q`` and ``k`` only through ``x % c`` with ``x`` an integer polynomial
(``+ - *``) of positions and constants, and combines such values with any operator, is the same
at ``q`` and ``q + Pq`` (``Pq`` the lcm of the moduli of the terms that read ``q``; ``k`` alike):
``P(q + m) = P(q) (mod m)`` for an integer polynomial, and ``x % c`` (floor semantics, any sign
of ``c``) depends on ``x`` modulo ``|c|`` only. Its meaning is then a ``Pq x Pk`` table over the
residues, evaluated once, and a box's allowed pairs are ``hq @ T @ hk`` with ``hq``/``hk`` the
residue histograms of its query and key progressions (closed form: a progression's residues
repeat every ``P / gcd(s, P)`` steps). ``where(q % 7 == k % 5)`` is partial on every tile and
no interval rule settles it; this counts it without evaluating an element.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patterndsl import ir
from patterndsl.errors import PatternError

#: Largest period per side, and largest table ``Pq * Pk``, this reasoning takes on.
MAX_PERIOD = 1 << 10
MAX_TABLE = 1 << 12
#: Boxes (or tiles) per batch of histogram products: bounds the ``[B, P]`` temporaries.
_CHUNK = 1 << 16

#: What :func:`_shape` finds of an expression: a value the same at ``q + pq`` and ``k + pk``
#: ("periodic"), or an integer polynomial of positions and such values ("poly", which reads
#: ``q``/``k`` as flagged). None: neither.
_Shape = tuple[str, int, int, bool, bool] | None


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def _shape(e: ir.Expr) -> _Shape:
    if isinstance(e, ir.Const):
        return "periodic", 1, 1, False, False
    if isinstance(e, ir.Var):
        if e.name in ("q", "k"):
            return "poly", 1, 1, e.name == "q", e.name == "k"
        return "periodic", 1, 1, False, False  # h, Lq, Lk: constants of one plan
    if isinstance(e, ir.Neg):
        return _shape(e.operand)
    if isinstance(e, ir.Arith):
        left, right = _shape(e.left), _shape(e.right)
        if left is None or right is None:
            return None
        pq, pk = _lcm(left[1], right[1]), _lcm(left[2], right[2])
        if left[0] == right[0] == "periodic":
            return "periodic", pq, pk, False, False
        if e.op in "+-*":
            return "poly", pq, pk, left[3] or right[3], left[4] or right[4]
        if e.op == "%" and isinstance(e.right, ir.Const) and not isinstance(e.right.value, bool) and e.right.value:
            c = abs(int(e.right.value))
            return "periodic", _lcm(pq, c) if left[3] else pq, _lcm(pk, c) if left[4] else pk, False, False
        return None
    if isinstance(e, (ir.Func, ir.Cmp, ir.Logic, ir.LNot)):
        items = e.args if isinstance(e, ir.Func) else e.items if isinstance(e, ir.Logic) else None
        if items is None:
            items = (e.operand,) if isinstance(e, ir.LNot) else (e.left, e.right)
        shapes = [_shape(x) for x in items]
        if any(s is None or s[0] != "periodic" for s in shapes):
            return None
        pq = pk = 1
        for s in shapes:
            pq, pk = _lcm(pq, s[1]), _lcm(pk, s[2])
        return "periodic", pq, pk, False, False
    return None  # grid coordinates, run-time inputs


def periods(pred: ir.Expr) -> tuple[int, int] | None:
    """``(Pq, Pk)`` when ``pred`` is the same at ``q + Pq`` and at ``k + Pk`` for every position, small enough.

    Args:
        pred: a ``where`` predicate (1-D positions).

    Returns:
        The periods, or None when ``pred`` is not periodic in this sense (it reads a position
        outside ``x % c``, a grid coordinate or an input) or a period is beyond :data:`MAX_PERIOD`.
    """
    shape = _shape(pred)
    if shape is None or shape[0] != "periodic":
        return None
    pq, pk = shape[1], shape[2]
    if pq > MAX_PERIOD or pk > MAX_PERIOD or pq * pk > MAX_TABLE:
        return None
    return pq, pk


def table(prim: ir.Prim, env) -> tuple[np.ndarray, int, int] | None:
    """The predicate over one period: ``T[q % Pq, k % Pk]`` (int64 0/1), with ``Pq`` and ``Pk``; cached per plan.

    None when the predicate has no small periods, or its evaluation fails on the residues (a
    zero divisor): the tiles are then decided as before, where such an error is reported exactly.
    """
    from patterndsl.primitives.where import _where_meaning

    if env.layout is not None:
        return None
    cache = env.cache.setdefault("residue tables", {})
    key = (prim, env.head)
    if key not in cache:
        found = periods(prim.arg("pred"))
        if found is not None:
            pq, pk = found
            # each residue at the first position of that class (queries start at Lk - Lq): every
            # entry a tile reads is the meaning at a real position, within the int64 range checked
            q0 = env.offset
            q = (q0 + (torch.arange(pq, dtype=torch.int64) - q0) % pq)[:, None]
            k = torch.arange(pk, dtype=torch.int64)[None, :]
            try:
                value = _where_meaning(prim, q, k, env.head, env.sizes, None).expand(pq, pk)
                found = value.numpy().astype(np.int64), pq, pk
            except PatternError:
                found = None
        cache[key] = found
    return cache[key]


def histogram(a: np.ndarray, s: np.ndarray, n: np.ndarray, period: int) -> np.ndarray:
    """int64 ``[B, period]``: how many of ``a + s * t`` (``t < n``) fall in each residue class mod ``period``."""
    a, s, n = (np.asarray(x, np.int64).reshape(-1) for x in (a, s, n))
    out = np.zeros((len(a), period), np.int64)
    if period == 1:
        out[:, 0] = np.maximum(n, 0)
        return out
    # residues repeat every ``cycle`` steps: whole cycles, then the first ``n % cycle`` steps again
    cycle = period // np.gcd(s % period, period)
    t = np.arange(period, dtype=np.int64)[None, :]
    weight = np.where(t < cycle[:, None], n[:, None] // cycle[:, None] + (t < (n % cycle)[:, None]), 0)
    weight = np.where(n[:, None] > 0, weight, 0)
    res = (a[:, None] + (s % period)[:, None] * t) % period
    rows = np.repeat(np.arange(len(a), dtype=np.int64), period)
    out.reshape(-1)[:] = np.bincount(rows * period + res.reshape(-1), weight.reshape(-1), len(a) * period)
    return out


def _windows(a: np.ndarray, s: np.ndarray, n: np.ndarray, period: int):
    """A progression's histogram as ``cycles * 1 + weight * [window]`` when its step is 1 or 0 mod ``period``.

    Returns ``(cycles, weight, start, length, closed)``: every residue ``cycles`` times, plus
    ``weight`` times each residue of the cyclic window ``[start, start + length)``; ``closed`` is
    False where the step is neither (those boxes need :func:`histogram`).
    """
    step = s % period
    n = np.maximum(n, 0)
    unit = (step == 1 % period) | (n <= 1)
    point = (step == 0) & ~unit
    cycles = np.where(unit, n // period, 0)
    weight = np.where(unit, 1, n)
    length = np.where(unit, n % period, np.where(n > 0, 1, 0))
    return cycles, weight, a % period, length, unit | point


class _Rectangles:
    """Sums of the table over cyclic rectangles of residues, O(1) each (2-D prefix sums of the doubled table)."""

    def __init__(self, tab: np.ndarray):
        pq, pk = tab.shape
        self.pq, self.pk = pq, pk
        self.cum = np.zeros((2 * pq + 1, 2 * pk + 1), np.int64)
        self.cum[1:, 1:] = np.tile(tab, (2, 2)).cumsum(0).cumsum(1)

    def sum(self, q0, ql, k0, kl) -> np.ndarray:
        c = self.cum
        q1, k1 = q0 + ql, k0 + kl
        return c[q1, k1] - c[q0, k1] - c[q1, k0] + c[q0, k0]


def box_counts(tab: np.ndarray, pq: int, pk: int, qp, kp) -> np.ndarray:
    """Allowed pairs of every (query piece, key piece) box: ``hq @ T @ hk`` per box (int64).

    Progressions of step 1 (or 0) modulo the period have a histogram that is whole cycles plus
    one cyclic window of residues, so the product is four rectangle sums of the table: O(1) per
    box. Other steps (a token order's strided pieces) build the histograms.
    """
    rect = _Rectangles(tab)
    cq, wq, sq, lq, okq = _windows(qp.fa, qp.fs, qp.fn, pq)
    ck, wk, sk, lk, okk = _windows(kp.fa, kp.fs, kp.fn, pk)
    out = cq * ck * int(tab.sum())
    out += cq * wk * rect.sum(0 * sk, pq, sk, lk)
    out += wq * ck * rect.sum(sq, lq, 0 * sq, pk)
    out += wq * wk * rect.sum(sq, lq, sk, lk)
    rest = np.flatnonzero(~(okq & okk))
    for s in range(0, len(rest), _CHUNK):
        sel = rest[s : s + _CHUNK]
        hq = histogram(qp.fa[sel], qp.fs[sel], qp.fn[sel], pq)
        hk = histogram(kp.fa[sel], kp.fs[sel], kp.fn[sel], pk)
        out[sel] = ((hq @ tab) * hk).sum(1)
    return out


def classify(prim: ir.Prim, qp, kp, env):
    """``(nonempty, full, exact)`` of a periodic predicate on aligned 1-D pieces, or None when it is not one."""
    found = table(prim, env)
    if found is None:
        return None
    tab, pq, pk = found
    count = box_counts(tab, pq, pk, qp, kp)
    area = qp.fn * kp.fn
    return count > 0, count == area, np.ones(len(count), bool)


def tile_counts(prim: ir.Prim, engine, keys: np.ndarray) -> np.ndarray | None:
    """Allowed pairs of tiles ``keys`` (``m * nkb + n``) of a 1-D plan, or None when the predicate is not periodic.

    A tile's residue histogram is the sum of its pieces' (histograms add), so each side is
    histogrammed once per tile and every tile costs ``Pk`` operations.
    """
    found = table(prim, engine.env)
    if found is None or len(engine.q.extents) != 1:
        return None
    tab, pq, pk = found
    hq = _tile_histograms(engine.q, pq) @ tab  # [nqb, Pk]
    hk = _tile_histograms(engine.k, pk)
    out = np.zeros(len(keys), np.int64)
    for s in range(0, len(keys), _CHUNK):
        part = keys[s : s + _CHUNK]
        out[s : s + _CHUNK] = (hq[part // engine.nkb] * hk[part % engine.nkb]).sum(1)
    return out


def _tile_histograms(side, period: int) -> np.ndarray:
    out = np.zeros((side.n_tiles, period), np.int64)
    for s in range(0, len(side.tile), _CHUNK):
        sl = slice(s, s + _CHUNK)
        np.add.at(out, side.tile[sl], histogram(side.a[sl, 0], side.s[sl, 0], side.n[sl, 0], period))
    return out
