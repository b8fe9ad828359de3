"""Stage 4 (block plan), candidates of bands in residue-class orders: a band's bounds mapped through the order.

Comes in: an engine's two 1-D sides in an order other than the identity whose pieces are
progressions of one step ``p`` (the planner's classes mod ``p``, their coarse levels, a sample of
their query tiles) and a static node built from bands alone (``window``, ``strided``, ``causal``,
``where`` half-planes, joined by ``|`` and ``&``). Goes out: sorted keys of candidate tiles, a
superset of the node's non-empty tiles (the engine classifies them as before), or None when that
does not apply.

Why: a query tile in classes mod ``p`` holds ``p * BM`` consecutive positions' worth of one class,
so its position hull meets every key class, and a hull test of ``causal`` keeps half of all tiles.
Inside an intersection the operand with the cheapest rule went first on those candidates:
``causal & (window(127) | strided(128))`` classified 590K candidate tiles three times at 128K tokens
for 190K tiles kept, and its plan time per tile grew with the length. Mapped through the order, a
band is exact per pair of runs instead: for a query run ``aq + p*i`` (``i < nq``) and a key run
``ak + p*j`` (``j < nk``, consecutive in the key order), ``lo <= q - k <= hi`` reads
``lo <= aq - ak + p*(i - j) <= hi``, a range ``[wlo, whi]`` of diagonals ``w = i - j``, so the keys
it reaches form one contiguous range ``max(0, -whi) <= j <= min(nk - 1, nq - 1 - wlo)`` of the key
run, and ``(q - k) % m == 0`` needs ``gcd(p, m)`` to divide ``aq - ak``. A node's pairs satisfy
one of a few bands (:func:`region`: a union keeps its operands' bands, an intersection the
pairwise intersections of its operands' bands), so its candidates are one range of key tiles per
(query piece, key run, band): ``window`` gives a few diagonal stretches per class pair, ``strided``
with the order's period the class's own block.
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir, primitives
from patterndsl.analysis.tiles import Side

#: A band ``lo <= q - k <= hi`` with ``(q - k) % mod == 0``.
Band = tuple[int, int, int]

#: Bands a node's region may hold (an intersection of unions multiplies them); beyond it, no region.
MAX_BANDS = 16
#: The (query piece, key run, band) triples tested at once.
_CHUNK = 1 << 20
#: Used only when the triples are at most this fraction of all tile pairs (else the engine's own
#: candidates, a hull test per key-tile chain, cost less).
_SHARE = 4
#: Moduli beyond this are dropped from an intersection's band (a superset: the tile rules decide).
_MAX_MODULUS = 1 << 40
#: Band limits are clipped to this (positions stay below 2**48, plans refuse longer sides).
_LIMIT = 1 << 56


def region(node: ir.Node, env) -> list[Band] | None:
    """Bands one of which every allowed pair of ``node`` satisfies, or None when a primitive is not a band.

    Only nodes made of bands have a region: a node with another primitive keeps the engine's
    own candidates, which its other operands may bound far better.

    Args:
        node: a static pattern node.
        env: the classifiers' environment (``where`` half-planes read the sizes).

    Returns:
        A list of at most :data:`MAX_BANDS` bands (empty: no pair allowed), or None.
    """
    if isinstance(node, ir.Prim):
        if node == ir.EMPTY:
            return []
        rule = primitives.lookup(node.name).band
        found = None if rule is None or node == ir.FULL else rule(node, env)
        return None if found is None else [tuple(int(x) for x in found)]
    if not isinstance(node, (ir.Union, ir.Inter)):
        return None
    union = isinstance(node, ir.Union)
    out = {} if union else {(-(1 << 62), 1 << 62, 1): None}
    # item by item, stopping at the first that has no region or past MAX_BANDS (a long union is
    # not walked whole at every level of the engine's recursion)
    for item in node.items:
        part = region(item, env)
        if part is None:
            return None
        if union:
            out.update(dict.fromkeys(part))
        else:
            out = dict.fromkeys(m for a in out for b in part if (m := _meet(a, b)) is not None)
        if len(out) > MAX_BANDS:
            return None
    return list(out)


def _meet(a: Band, b: Band) -> Band | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    mod = math.lcm(a[2], b[2])
    return None if lo > hi else (lo, hi, mod if mod <= _MAX_MODULUS else 1)


def _step(side: Side) -> int | None:
    """The common step of ``side``'s pieces of more than one position (0 when there are none; None when several)."""
    steps = np.unique(side.s[side.n[:, 0] > 1, 0])
    return None if len(steps) > 1 else int(steps[0]) if len(steps) else 0


def key_runs(side: Side, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(a, n, start)``: maximal runs ``a + step * j`` (``j < n``) of consecutive keys in the order, and
    the order index of each run's first key (the pieces of one class, joined across tile ends).

    None when the pieces do not spell the order piece by piece (a side whose pieces are hulls of
    its tiles' positions, such as route's key blocks when they are not runs).
    """
    a, n = side.a[:, 0], side.n[:, 0]
    at = np.cumsum(n) - n  # the pieces tile the order in piece order
    if not np.array_equal(np.append(at, at[-1] + n[-1] if len(n) else 0)[side.ptr], side.starts):
        return None
    if side.order is not None and len(n):
        live = n > 0
        first, last = at[live], (at + n - 1)[live]
        if not (
            np.array_equal(side.order[first] + side.offset, a[live])
            and np.array_equal(side.order[last] + side.offset, (a + step * (n - 1))[live])
        ):
            return None
    new = np.ones(len(a), bool)
    new[1:] = a[1:] != a[:-1] + step * n[:-1]
    first = np.flatnonzero(new)
    return a[first], np.add.reduceat(n, first) if len(first) else n[:0], at[first]


def candidates(engine, node: ir.Node) -> np.ndarray | None:
    """Sorted keys of the tiles that may hold a pair of ``node``'s :func:`region`, or None when not applicable.

    Applies to 1-D sides (no layout) not both in identity order, whose pieces share one step, and
    when the work (query pieces x key runs x bands) is a small share of all tile pairs.

    Args:
        engine: the :class:`~patterndsl.analysis.engine.Engine` whose sides and environment are used.
        node: a static node.

    Returns:
        Sorted int64 keys ``m * nkb + n`` (a superset of the non-empty tiles), or None.
    """
    q, k = engine.q, engine.k
    if engine.env.layout is not None or (q.identity and k.identity) or q.a.shape[1] != 1:
        return None
    if not engine.nqb or not engine.nkb:
        return None
    bands = region(node, engine.env)
    if bands is None:
        return None
    if not bands:
        return np.zeros(0, np.int64)
    qstep, kstep = _step(q), _step(k)
    if qstep is None or kstep is None or (qstep and kstep and qstep != kstep):
        return None
    step = max(qstep, kstep, 1)
    runs = key_runs(k, step)
    if runs is None:
        return None
    ka, kn, kstart = runs
    if len(q.tile) * len(ka) * len(bands) * _SHARE > engine.nqb * engine.nkb:
        return None
    rows = max(1, _CHUNK // max(len(ka) * len(bands), 1))
    runs = []
    for s in range(0, len(q.tile), rows):
        runs.append(_ranges(q, k, slice(s, s + rows), (ka, kn, kstart), bands, step))
    from patterndsl.analysis.engine import expand_runs
    from patterndsl.analysis.hierarchy import merge_runs

    m, lo, hi = merge_runs(*(np.concatenate(x) for x in zip(*runs, strict=True)))
    m, n = expand_runs(m, lo, hi)
    return m * engine.nkb + n


def _ranges(q: Side, k: Side, rows: slice, kruns, bands: list[Band], step: int):
    """``(query tile, first key tile, end key tile)`` per (query piece in ``rows``, key run, band) that meets."""
    ka, kn, kstart = kruns
    aq, nq, tile = q.a[rows, 0][:, None], q.n[rows, 0][:, None], q.tile[rows]
    d0 = aq - ka[None, :]  # q - k at i = j = 0
    out = []
    for lo, hi, mod in bands:
        lo, hi = max(lo, -_LIMIT), min(hi, _LIMIT)  # positions are far inside: no overflow below
        wlo = -((d0 - lo) // step)  # ceil((lo - d0) / step)
        whi = (hi - d0) // step
        jlo = np.maximum(-whi, 0)
        jhi = np.minimum(kn[None, :] - 1, nq - 1 - wlo)
        ok = (wlo <= whi) & (jlo <= jhi)
        if mod > 1:
            ok &= d0 % math.gcd(step, mod) == 0
        r, c = np.nonzero(ok)
        first = kstart[c] + jlo[r, c]
        last = kstart[c] + jhi[r, c]
        out.append((tile[r], np.searchsorted(k.starts, first, "right") - 1, np.searchsorted(k.starts, last, "right")))
    return tuple(np.concatenate(x) for x in zip(*out, strict=True))
