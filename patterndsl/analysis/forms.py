"""Stage 4 (block plan), closed forms: a head group's key-tile bounds as sympy floor expressions in ``m``.

Comes in: a rewritten node that is one band (``window``, ``causal``, ``full``),
the sides (identity order, 1-D) and the group's runs. Goes out: a
:class:`~patterndsl.analysis.plan.RunForm` whose ``lo/hi/full_lo/full_hi``
are built from ``+ - *``, ``floor``, ``Min`` and ``Max`` only, or None. The
form is attached only after it is checked against the runs for every query
tile, so a kernel that computes its loop bounds from it visits exactly the
planned tiles.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from patterndsl import ir
from patterndsl.analysis.classify import BIG
from patterndsl.analysis.engine import band_of
from patterndsl.analysis.plan import RunForm, Runs
from patterndsl.analysis.tiles import Side


def _floor(x):
    return sp.floor(x)


def _plain(args) -> bool:
    return not any(sp.sympify(a).has(sp.floor, sp.Min, sp.Max) for a in args)


def _min(*args):
    # Simplify only when every argument is linear in m (cheap); sympy's Min/Max reasoning on
    # nested Min/floor terms is slow and buys nothing.
    if _plain(args):
        return sp.Min(*args)
    return sp.Min(*args, evaluate=False)


def _max(*args):
    if _plain(args):
        return sp.Max(*args)
    return sp.Max(*args, evaluate=False)


def _band_forms(lo_b: int, hi_b: int, mod: int, qside: Side, kside: Side, nkb: int):
    m = sp.Symbol("m", integer=True, nonnegative=True)
    bm, bn = qside.block, kside.block
    off, lq, lk = qside.offset, qside.length, kside.length
    qmin = m * bm + off
    # with Lq a multiple of BM the last tile is whole and qmax is linear (sympy then pulls
    # m out of every floor); otherwise keep the clamp
    qmax = m * bm + bm - 1 + off if lq % bm == 0 else _min(m * bm + bm - 1, lq - 1) + off
    lo = sp.Integer(0) if hi_b >= BIG else _max(0, _floor((qmin - hi_b) / sp.Integer(bn)))
    hi = _min(nkb, _floor((qmax - lo_b) / sp.Integer(bn)) + 1)
    if mod > 1:
        return m, lo, hi, lo, lo
    full_lo = lo if hi_b >= BIG else _max(lo, -_floor(-(qmax - hi_b) / sp.Integer(bn)))
    last_ok = _min(1, _max(0, qmin - lo_b - lk + 2))
    full_hi = _min(hi, _max(_floor((qmin - lo_b + 1) / sp.Integer(bn)), nkb * last_ok))
    return m, lo, hi, full_lo, full_hi


def evaluate_form(expr, m_values: np.ndarray) -> np.ndarray:
    """Exact integer value of a form expression at every ``m`` (rational arithmetic on int64 pairs)."""
    one = np.ones(len(m_values), dtype=np.int64)

    def ev(e):
        if e.is_Integer:
            return one * int(e), one
        if e.is_Rational:
            return one * int(e.p), one * int(e.q)
        if e.is_Symbol:
            return m_values.astype(np.int64), one
        if isinstance(e, (sp.Add, sp.Mul)):
            n, d = ev(e.args[0])
            for a in e.args[1:]:
                n2, d2 = ev(a)
                n, d = (n * d2 + n2 * d, d * d2) if isinstance(e, sp.Add) else (n * n2, d * d2)
                if int(d.max()) > 1 << 20:  # keep int64 far from overflow on deep products
                    g = np.gcd(n, d)
                    n, d = n // g, d // g
            return n, d
        if isinstance(e, sp.floor):
            n, d = ev(e.args[0])
            return np.floor_divide(n, d), one
        if isinstance(e, (sp.Min, sp.Max)):
            n, d = ev(e.args[0])
            for a in e.args[1:]:
                n2, d2 = ev(a)
                take = (n2 * d < n * d2) if isinstance(e, sp.Min) else (n2 * d > n * d2)
                n, d = np.where(take, n2, n), np.where(take, d2, d)
            return n, d
        raise ValueError(f"unsupported form expression {e}")

    n, d = ev(expr)
    if (n % d != 0).any():
        raise ValueError(f"form expression {expr} is not an integer")
    return n // d


def _verify(form: RunForm, runs: Runs, nqb: int) -> bool:
    ms = np.arange(nqb, dtype=np.int64)
    lo, hi = evaluate_form(form.lo, ms), evaluate_form(form.hi, ms)
    flo, fhi = evaluate_form(form.full_lo, ms), evaluate_form(form.full_hi, ms)
    row = runs.row.numpy()
    rlo, rhi, st = runs.lo.numpy(), runs.hi.numpy(), runs.state.numpy()
    if (st == 3).any():
        return False
    width = np.maximum(hi - lo, 0)
    visited = np.bincount(row, weights=rhi - rlo, minlength=nqb).astype(np.int64)
    if not (visited == width).all():
        return False
    if len(row) and ((rlo < lo[row]) | (rhi > hi[row])).any():
        return False
    full = st == 2
    fwidth = np.maximum(np.minimum(fhi, hi) - np.maximum(flo, lo), 0)
    fcount = np.bincount(row[full], weights=(rhi - rlo)[full], minlength=nqb).astype(np.int64)
    if not (fcount == fwidth).all():
        return False
    fr = row[full]
    return not (len(fr) and ((rlo[full] < flo[fr]) | (rhi[full] > fhi[fr])).any())


def run_form(node: ir.Node, qside: Side, kside: Side, runs: Runs, nqb: int, nkb: int) -> RunForm | None:
    """The verified closed form of a group's tiles, or None when the node has none.

    Args:
        node: the group's rewritten node.
        qside, kside: the sides (forms exist for identity order on 1-D positions).
        runs: the group's runs, the ground truth the form is checked against.
        nqb, nkb: tile counts.

    Returns:
        A :class:`RunForm` or None.
    """
    if len(qside.extents) != 1 or not qside.identity or not kside.identity:
        return None
    if node == ir.FULL:
        m = sp.Symbol("m", integer=True, nonnegative=True)
        parts = (m, sp.Integer(0), sp.Integer(nkb), sp.Integer(0), sp.Integer(nkb))
    else:
        band = band_of(node)
        if band is None:
            return None
        parts = _band_forms(*band, qside, kside, nkb)
    form = RunForm(*parts)
    if not _int32_constants(form):
        # An unbounded band end (classify.BIG) left in an expression would overflow the
        # kernels' int32 loop arithmetic; such groups keep their tile lists.
        return None
    return form if _verify(form, runs, nqb) else None


def _int32_constants(form: RunForm) -> bool:
    """Every constant of the form's bounds (numerators and denominators) fits comfortably in int32."""
    exprs = (form.lo, form.hi, form.full_lo, form.full_hi)
    atoms = (a for e in exprs for a in sp.sympify(e).atoms(sp.Rational))
    return all(abs(a.p) < 1 << 30 and a.q < 1 << 30 for a in atoms)
