"""Stage 4 (block plan), grid cells of a static bound equal up to a shift of the grid's outer axes.

Comes in: a static node (a grid route's bound: the route as empty or full) and the cells
:func:`routeruns._tile_bounds` decides on a grid (a piece of one grid row of queries by a piece of one
grid row of keys, as tiles of a sub-engine). Goes out: :func:`cell_states`, the node's states on the
cells, the same as the engine's on every cell, the engine being run on one cell per class only.

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

from patterndsl import ir
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


@functools.lru_cache(maxsize=32)
def outer_classes(node: ir.Node, layout: ir.Layout) -> tuple[np.ndarray, ...] | None:
    """Per outer axis (every axis but the last), the representative row ``rep[y] <= y`` of each row
    (``y - rep[y]`` a multiple of that axis's period, every neighborhood's relative window the same
    at both and at the rows between them a period apart); None when ``node`` gets no classes."""
    prims = _neighborhoods(node)
    if prims is None or len(layout.shape) < 2:
        return None
    out = []
    for a, n in enumerate(layout.shape[:-1]):
        sig, period = [], 1
        y = np.arange(n, dtype=np.int64)
        for prim in prims:
            _n, s, d, r, causal = neighborhood_axes(prim, layout)[a]
            tlo, thi = window_table(n, s, d, r, causal)
            sig += [d * tlo + y % d - y, d * thi + y % d - y]
            period = math.lcm(period, d * r)
        rep = y.copy()
        if sig and period < n:
            sig = np.stack(sig, 1)
            same = (sig[period:] == sig[:-period]).all(1)  # row y + period repeats row y
            for c in range(period):  # each residue: runs of repeating rows share their first row
                idx = y[c::period]
                link = np.concatenate([[False], same[c::period][: len(idx) - 1]])
                start = np.maximum.accumulate(np.where(link, 0, np.arange(len(idx))))
                rep[idx] = idx[start]
        rep.flags.writeable = False
        out.append(rep)
    return tuple(out)


def canonical(classes, layout: ir.Layout, qsize: int, ksize: int, r: np.ndarray, col: np.ndarray):
    """``(r, col)`` of each cell's representative: cells of ``qsize`` queries (rows ``r``) by ``ksize`` keys
    (columns ``col``), each inside one grid row; the query's outer rows moved to their representatives
    and the key's by the same offsets (not moved when that leaves the grid)."""
    shape = tuple(layout.shape)
    outer, w = shape[:-1], shape[-1]
    pq, pk = r * qsize, col * ksize
    yq = np.unravel_index(pq // w, outer)
    yk = np.unravel_index(pk // w, outer)
    shifted_q, shifted_k = [], []
    inside = np.ones(len(r), bool)
    for a, rep in enumerate(classes):
        delta = yq[a] - rep[yq[a]]
        k2 = yk[a] - delta
        inside &= (k2 >= 0) & (k2 < outer[a])
        shifted_q.append(yq[a] - delta)
        shifted_k.append(k2)
    rq = np.ravel_multi_index(tuple(np.where(inside, s, y) for s, y in zip(shifted_q, yq, strict=True)), outer)
    rk = np.ravel_multi_index(tuple(np.where(inside, s, y) for s, y in zip(shifted_k, yk, strict=True)), outer)
    return (rq * w + pq % w) // qsize, (rk * w + pk % w) // ksize


def cell_states(sub: eng.Engine, nodes, r: np.ndarray, col: np.ndarray, states) -> list[np.ndarray]:
    """``states(sub, node, keys)`` of each of ``nodes`` on the cells ``(r, col)`` of ``sub``'s tiles (sorted
    keys ``r * sub.nkb + col``), run on one cell per class of every node when the nodes have classes."""
    layout = sub.env.layout
    keys = r * sub.nkb + col
    if layout is None or len(layout.shape) < 2:
        return [states(sub, node, keys) for node in nodes]
    out = []
    for node in nodes:
        classes = None if node in (ir.FULL, ir.EMPTY) else outer_classes(node, layout)
        if classes is None:
            out.append(states(sub, node, keys))
            continue
        cr, cc = canonical(classes, layout, sub.q.block, sub.k.block, r, col)
        uniq, inv = np.unique(cr * sub.nkb + cc, return_inverse=True)
        TALLY.shifted += len(keys) - len(uniq)
        out.append(states(sub, node, uniq)[inv.reshape(-1)])
    return out


class _Tally:
    """Cells whose state was copied from their class's representative (tests read it)."""

    shifted = 0


TALLY = _Tally()
