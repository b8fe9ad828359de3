"""Stage 4 (block plan), grid cells and route boxes equal up to a shift of the grid (translation classes).

Comes in: a static node (a grid route's bound: the route as empty or full) and the cells
:func:`routeruns._tile_bounds` decides on a grid (a piece of one grid row of queries by a piece of one
grid row of keys, as tiles of a sub-engine); or a route's ``among`` and its (group box x block box)
engine. Goes out: :func:`cell_states`, the node's states on the cells, the same as the engine's on every
cell, the engine being run on one cell per class only; :func:`route_box_candidates`, the candidate
(group, block) pairs, the engine being run on one group box per class only; :func:`static_tiles`, a static
node's non-empty tiles and states, the engine being run on one query row per class only.

A neighborhood on axis ``a`` holds ``(y, y')`` when ``y' = y (mod d)`` and
``y + lo[y] <= y' <= y + hi[y]``, its window relative to the query (``lo``, ``hi`` from
:func:`~patterndsl.primitives.neighborhood.window_table`). Where those relative windows of every
neighborhood of the node repeat at ``y`` and ``y - P`` (``P`` a multiple of every dilation times
stride), the pairs ``(y, y')`` and ``(y - P, y' - P)`` agree for every neighborhood, so does any
union, intersection or complement of them: a cell on outer rows ``(y, y')`` has the state of the
cell on ``(y - P, y' - P)``. Away from the borders this holds for every ``y``: on a 1,024-row grid a
cell's class is its row pair's offset and its columns, not its rows. A key row shifted outside the grid
is out of every window (the windows lie inside the grid); such cells keep their own rows. Nodes with
anything but neighborhoods, ``full`` and ``empty`` get no classes (:func:`outer_classes` is None).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng
from patterndsl.primitives.neighborhood import neighborhood_axes, window_table


def _neighborhoods(node: ir.Node) -> list[ir.Prim] | None:
    """The neighborhoods of ``node``, or None when it reads anything else (``full`` / ``empty`` aside)."""
    out = []
    for sub in ir.walk(node):
        if isinstance(sub, (ir.Union, ir.Inter, ir.Not)) or sub in (ir.FULL, ir.EMPTY):
            continue
        if not (isinstance(sub, ir.Prim) and sub.name == "neighborhood"):
            return None
        out.append(sub)
    return out


def outer_classes(node: ir.Node, layout: ir.Layout) -> tuple[np.ndarray, ...] | None:
    """Per outer axis (every axis but the last), the representative row ``rep[y] <= y`` of each row
    (``y - rep[y]`` a multiple of that axis's period, every neighborhood's relative window the same
    at both and at the rows between them a period apart); None when ``node`` gets no classes."""
    prims = _neighborhoods(node)
    return None if prims is None else _outer_classes(tuple(prims), layout)


@functools.lru_cache(maxsize=32)
def _outer_classes(prims: tuple[ir.Prim, ...], layout: ir.Layout) -> tuple[np.ndarray, ...] | None:
    """:func:`outer_classes` of the nodes whose neighborhoods are ``prims`` (classes of all of them)."""
    if len(layout.shape) < 2:
        return None
    out = []
    for a, n in enumerate(layout.shape[:-1]):
        sig, period = _signature(prims, layout, a)
        link = np.zeros(n, bool)
        if len(prims) and period < n:
            link[period:] = (sig[period:] == sig[:-period]).all(1)  # row y repeats row y - period
        rep = _chains(link, period)
        rep.flags.writeable = False
        out.append(rep)
    return tuple(out)


def _signature(prims, layout: ir.Layout, a: int) -> tuple[np.ndarray, int]:
    """``(sig, period)``: per coordinate of axis ``a``, every neighborhood's window relative to it (``[n, 2p]``),
    and a multiple of every dilation times stride (rows that far apart may repeat, whatever the stride)."""
    n = layout.shape[a]
    y = np.arange(n, dtype=np.int64)
    sig, period = [np.zeros(n, np.int64)], 1
    for prim in prims:
        _n, s, d, r, causal = neighborhood_axes(prim, layout)[a]
        tlo, thi = window_table(n, s, d, r, causal)
        sig += [d * tlo + y % d - y, d * thi + y % d - y]
        period = math.lcm(period, d * r)
    return np.stack(sig, 1), period


def _chains(link: np.ndarray, step: int) -> np.ndarray:
    """``rep[i]``: the first index of the chain ``i, i - step, ...`` while ``link`` holds (``link[i]``: ``i``
    repeats ``i - step``)."""
    i = np.arange(len(link), dtype=np.int64)
    rep = i.copy()
    for c in range(min(step, len(link))):
        idx = i[c::step]
        start = np.maximum.accumulate(np.where(link[c::step], 0, np.arange(len(idx))))
        rep[idx] = idx[start]
    return rep


def route_box_candidates(engine: eng.Engine, prim: ir.Prim, node: ir.Node, sub: eng.Engine) -> np.ndarray | None:
    """:func:`box_candidates` of a route with box groups and blocks (``node``: its rewritten ``among``; ``sub``:
    the engine on its group x block boxes), when queries and keys are the same grid; else None."""
    ctx, layout = engine.ctx, engine.env.layout
    if layout is None or engine.env.offset != 0 or ctx.q_len != ctx.kv_len:
        return None
    rank = len(layout.shape)
    block = prim.arg("block")
    qblock = block if prim.arg("qblock") is None else prim.arg("qblock")
    qbox, kbox = (semantics._per_axis(b, rank, name) for b, name in ((qblock, "route qblock"), (block, "route block")))
    return box_candidates(node, layout, tuple(qbox), tuple(kbox), lambda domain: sub.run(node, domain)[0])


def _allows_outside(node: ir.Node) -> bool:
    """Whether ``node`` allows a pair no neighborhood of it holds (``~neighborhood(3)``): such pairs reach past
    any window, to keys a shift moves out of the grid."""
    if isinstance(node, ir.Union):
        return any(_allows_outside(item) for item in node.items)
    if isinstance(node, ir.Inter):
        return all(_allows_outside(item) for item in node.items)
    if isinstance(node, ir.Not):
        return not _allows_outside(node.item)
    return node == ir.FULL


#: Most (group, block) pairs :func:`box_candidates` evaluates for the representative groups.
MAX_REP_PAIRS = 1 << 22


def box_candidates(node: ir.Node, layout: ir.Layout, qbox, kbox, run) -> np.ndarray | None:
    """Sorted keys ``g * n_k + b`` of the (query group box, key block box) pairs where ``node`` allows some
    pair, groups and blocks being boxes of ``qbox`` / ``kbox`` numbered row-major, the queries and keys
    the same grid; None when ``node`` gets no classes (or its representatives would be too many pairs).

    A group box whose coordinates repeat (relative windows the same) those ``P`` lower on an axis
    (``P`` a multiple of both boxes' extents there, both boxes whole) has the candidates of that box
    shifted by ``P`` (no key a window holds leaves the grid): ``run(domain)`` (the engine's non-empty
    keys among the sorted ``domain``) is called on the first group box of each class only."""
    prims = _neighborhoods(node)
    if not prims or layout is None or _allows_outside(node):
        return None
    shape = tuple(layout.shape)
    ng = tuple(-(-n // b) for n, b in zip(shape, qbox, strict=True))
    nb = tuple(-(-n // b) for n, b in zip(shape, kbox, strict=True))
    n_q, n_k = math.prod(ng), math.prod(nb)
    reps, shifts, reach = [], [], []
    for a, n in enumerate(shape):
        qb, kb = qbox[a], kbox[a]
        sig, _period = _signature(prims, layout, a)
        reach.append(_block_reach(sig, qb, kb))
        shift = math.lcm(qb, kb)
        step = shift // qb
        i = np.arange(ng[a], dtype=np.int64)
        same = np.zeros(n, bool)
        if shift < n:
            same[shift:] = (sig[shift:] == sig[:-shift]).all(1)
        whole = (i + 1) * qb <= n
        box_same = np.zeros(ng[a], bool)
        full = int(whole.sum())
        box_same[:full] = same[: full * qb].reshape(full, qb).all(1)
        rep = _chains((i >= step) & whole & box_same, step)
        reps.append(rep)
        shifts.append((i - rep) * qb // kb)  # in blocks along the axis
    digits = np.unravel_index(np.arange(n_q, dtype=np.int64), ng)
    rep_g = np.ravel_multi_index(tuple(r[x] for r, x in zip(reps, digits, strict=True)), ng)
    heads = np.unique(rep_g)
    if len(heads) * n_k > MAX_REP_PAIRS:
        return None
    # each representative's pairs with the blocks its groups' windows reach (the node allows no pair outside
    # every window of its neighborhoods): the engine's answer on every block, for a fraction of the pairs
    owner, block = np.arange(len(heads), dtype=np.int64), np.zeros(len(heads), np.int64)
    for a, digit in enumerate(np.unravel_index(heads, ng)):
        lo, hi = reach[a]
        at, x = eng.expand_runs(np.arange(len(owner), dtype=np.int64), lo[digit[owner]], hi[digit[owner]] + 1)
        owner, block = owner[at], block[at] * nb[a] + x
    found = run(heads[owner] * n_k + block)
    ptr = np.searchsorted(found // n_k, np.append(heads, n_q))  # each representative's candidates
    at = np.searchsorted(heads, rep_g)
    g, pos = eng.expand_runs(np.arange(n_q, dtype=np.int64), ptr[at], ptr[at + 1])
    bd = np.unravel_index(found[pos] % n_k, nb)
    moved = []
    for a in range(len(shape)):
        x = bd[a] + shifts[a][digits[a][g]]
        if (x >= nb[a]).any():  # a candidate block past the grid (not expected): no shortcut
            return None
        moved.append(x)
    TALLY.copied += len(g) - len(found)
    return g * n_k + np.ravel_multi_index(tuple(moved), nb)


def _block_reach(sig: np.ndarray, qb: int, kb: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group box on an axis (of ``qb`` coordinates), the first and last block (of ``kb``) some window
    of its coordinates reaches (``sig``: :func:`_signature`'s relative windows, lows and highs alternating)."""
    n = len(sig)
    y = np.arange(n, dtype=np.int64)[:, None]
    starts = np.arange(0, n, qb)
    lo = np.minimum.reduceat((y + sig[:, 1::2]).min(1), starts)
    hi = np.maximum.reduceat((y + sig[:, 2::2]).max(1), starts)
    return lo // kb, hi // kb


def canonical(classes, layout: ir.Layout, qsize: int, ksize: int, r: np.ndarray, col: np.ndarray):
    """``(r, col)`` of each cell's representative: cells of ``qsize`` queries (rows ``r``) by ``ksize`` keys
    (columns ``col``), each inside one grid row; the query's outer rows moved to their representatives
    and the key's by the same offsets (not moved when that leaves the grid)."""
    shape = tuple(layout.shape)
    outer, w = shape[:-1], shape[-1]
    pq, pk = r * qsize, col * ksize
    if len(outer) == 1:  # 2-D: the row is the outer coordinate
        (rep,) = classes
        yq, yk = pq // w, pk // w
        delta = yq - rep[yq]
        delta[(yk < delta) | (yk - delta >= outer[0])] = 0  # key rows leaving the grid: not moved
        return r - delta * (w // qsize), col - delta * (w // ksize)
    rq, rk = canonical_rows(classes, outer, pq // w, pk // w)
    return (rq * w + pq % w) // qsize, (rk * w + pk % w) // ksize


def canonical_rows(classes, outer: tuple[int, ...], qrow: np.ndarray, krow: np.ndarray):
    """Grid rows (row-major over the ``outer`` axes) of query and key: the query's moved to their
    representatives per axis, the key's by the same offsets; a pair whose key row would leave the grid is
    not moved."""
    yq, yk = np.unravel_index(qrow, outer), np.unravel_index(krow, outer)
    shifted_q, shifted_k = [], []
    inside = np.ones(len(qrow), bool)
    for a, rep in enumerate(classes):
        delta = yq[a] - rep[yq[a]]
        k2 = yk[a] - delta
        inside &= (k2 >= 0) & (k2 < outer[a])
        shifted_q.append(yq[a] - delta)
        shifted_k.append(k2)
    rq = np.ravel_multi_index(tuple(np.where(inside, s, y) for s, y in zip(shifted_q, yq, strict=True)), outer)
    rk = np.ravel_multi_index(tuple(np.where(inside, s, y) for s, y in zip(shifted_k, yk, strict=True)), outer)
    return rq, rk


def cell_states(sub: eng.Engine, nodes, r: np.ndarray, col: np.ndarray, states) -> list[np.ndarray]:
    """``states(sub, node, keys)`` of each of ``nodes`` on the cells ``(r, col)`` of ``sub``'s tiles (sorted
    keys ``r * sub.nkb + col``), run on one cell per class of every node when the nodes have classes."""
    layout = sub.env.layout
    keys = r * sub.nkb + col
    if layout is None or len(layout.shape) < 2:
        return [states(sub, node, keys) for node in nodes]
    # one set of classes for every node: those of all their neighborhoods together (one canonical pass)
    found = [_neighborhoods(node) for node in nodes]
    if any(p is None for p in found):
        return [states(sub, node, keys) for node in nodes]
    prims = tuple(dict.fromkeys(p for ps in found for p in ps))
    classes = _outer_classes(prims, layout)
    if classes is None:
        return [states(sub, node, keys) for node in nodes]
    cr, cc = canonical(classes, layout, sub.q.block, sub.k.block, r, col)
    uniq, inv = np.unique(cr * sub.nkb + cc, return_inverse=True)
    TALLY.shifted += len(keys) - len(uniq)
    inv = inv.reshape(-1)
    return [states(sub, node, uniq)[inv] for node in nodes]


def static_tiles(engine: eng.Engine, node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """``engine.run(node)`` on a grid (sorted non-empty tile keys and their states), the engine being run on the
    query tiles of one grid row per class only; None when that does not apply (see below).

    Tiles lie in grid rows (a row of the grid holds whole query and key tiles, queries and keys the same
    grid in identity order). A query row repeating its class's first row ``P`` rows lower (on the outer
    axes) has that row's non-empty key tiles ``P`` rows lower, with their states: ``node`` made of
    neighborhoods allowing no pair outside their windows (which lie inside the grid), its non-empty key
    tiles are in those windows, shifted inside the grid too. The representative rows are planned on the key
    rows their windows reach."""
    layout, ctx = engine.env.layout, engine.ctx
    if layout is None or len(layout.shape) < 2 or ctx.offset != 0 or not (ctx.q_len == ctx.kv_len == layout.size):
        return None
    q, k = engine.q, engine.k
    w = layout.shape[-1]
    if not (q.identity and k.identity) or q.order is not None or k.order is not None or w % q.block or w % k.block:
        return None
    prims = _neighborhoods(node)
    if not prims or _allows_outside(node):
        return None
    prims = tuple(dict.fromkeys(prims))
    classes = _outer_classes(prims, layout)
    if classes is None:
        return None
    outer = tuple(layout.shape[:-1])
    tq, tk = w // q.block, w // k.block
    coords = np.unravel_index(np.arange(math.prod(outer), dtype=np.int64), outer)
    rep_row = np.ravel_multi_index(tuple(rep[c] for rep, c in zip(classes, coords, strict=True)), outer)
    reps = np.flatnonzero(rep_row == np.arange(len(rep_row)))
    if len(reps) * 4 > len(rep_row):  # too few rows repeat to pay
        return None
    # the key tiles the windows of each representative's query tiles reach: a box of key rows on the outer
    # axes, a range of key tiles along the rows
    reach = []
    for a, n in enumerate(layout.shape):
        sig, _period = _signature(prims, layout, a)
        y = np.arange(n, dtype=np.int64)
        reach.append(((y + sig[:, 1::2].T).min(0), (y + sig[:, 2::2].T).max(0)))
    row, key_row = reps, np.zeros(len(reps), np.int64)
    for a, n in enumerate(outer):
        lo, hi = reach[a]
        c = coords[a][row]
        at, x = eng.expand_runs(np.arange(len(row), dtype=np.int64), lo[c], hi[c] + 1)
        row, key_row = row[at], key_row[at] * n + x
    lo, hi = reach[-1]
    first = np.minimum.reduceat(lo, np.arange(0, w, q.block)) // k.block  # per query tile of a row
    last = np.maximum.reduceat(hi, np.arange(0, w, q.block)) // k.block
    pair = np.repeat(np.arange(len(row), dtype=np.int64), tq)
    col = np.tile(np.arange(tq, dtype=np.int64), len(row))
    at, kcol = eng.expand_runs(np.arange(len(pair), dtype=np.int64), first[col], last[col] + 1)
    pair, col = pair[at], col[at]
    domain = np.sort((row[pair] * tq + col) * engine.nkb + key_row[pair] * tk + kcol)
    keys, state = engine.run(node, domain)
    # every query tile reads its representative's, shifted by as many key rows as it lies below it
    rm = keys // engine.nkb
    start = np.searchsorted(rm, np.arange(engine.nqb + 1, dtype=np.int64))
    mm = np.arange(engine.nqb, dtype=np.int64)
    grid_row = mm // tq
    m0 = rep_row[grid_row] * tq + mm % tq
    mm, pos = eng.expand_runs(mm, start[m0], start[m0 + 1])
    shift = (grid_row - rep_row[grid_row]) * tk  # per query tile, its key tiles' offset from its representative's
    out = (mm - rm[pos]) * engine.nkb + keys[pos] + shift[mm]
    TALLY.static += len(pos) - len(keys)
    return out, state[pos]


class _Tally:
    """Cells whose state was copied from their class's representative, candidate pairs copied from their
    group's, tiles whose states were copied from their class's (:mod:`~patterndsl.analysis.tileshift`), a
    static node's tiles copied from their query row's representative (tests read them)."""

    shifted = 0
    copied = 0
    tiles = 0
    static = 0


TALLY = _Tally()
