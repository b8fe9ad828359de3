"""Stage 4 (block plan), a grid route's tiles equal up to a shift of the grid, decided once per translation class.

Comes in: the tiles :func:`routeruns._tile_bounds` decides on a grid (query tile ``m`` by key tile ``n``,
each a piece of one grid row, :class:`routegrid.GridGeometry`), their static bounds' states, and the
choices the route is fixed to (:class:`routetiles.RunTable` runs of blocks per group). Goes out:
:func:`tile_classes`, one representative tile per class, the class of each tile; the caller decides the
representatives and copies their states.

Why a tile has its representative's states, for every choice: :func:`routeruns._tile_bounds` decides a
tile from its static bounds' states (part of the class key below: taken as they are, not argued) and,
on each cell of the tile (a piece of a query row by one block's piece of a key row), from the static
bounds' states on the cell and from how many of the cell's groups have the cell's block in the choice.
Move the tile's query rows and key rows by the same ``delta`` (per outer axis, the last axis untouched),
``delta = y - rep[y]`` for the tile's query row ``y``, ``rep`` the chains of rows ``P`` apart below, and
cells move to cells (same columns, rows shifted):

- the static bounds, unions, intersections and complements of neighborhoods, hold a pair ``(y, y')``
  exactly when they hold ``(y - P, y' - P)``, where every neighborhood's window relative to the query row
  is the same at ``y`` and ``y - P`` and ``P`` is a multiple of every dilation times stride (the argument of
  :mod:`~patterndsl.analysis.cellshift`); a key row the move would take out of the grid: the tile is
  not moved (:func:`cellshift.canonical`);
- ``P`` is also a multiple of the route's query box and key box extents on the axis, so the groups of a
  cell row move to the groups ``P / qbox`` box rows lower (same columns) and a cell's block to the block
  ``P / kbox`` block rows lower (floor division commutes with a shift by a multiple of the divisor);
- every choice has, at each box row linked to the one ``P / qbox`` lower, the blocks of that row's groups
  shifted by ``P / kbox`` block rows (checked here on the runs, :func:`_table_links`, for every outer box
  of that row: as many runs, each the partner's run with groups and blocks shifted, every block's digit
  on the axis at least the shift, so the index shift is the digit shift), so a group has a block exactly
  when its shifted group has the shifted block, and a cell's count is its shifted cell's.

A row is linked to the row ``P`` lower when both conditions hold (windows and choices), and ``rep[y]`` is
the first row of its chain of links: the conditions compose along it, and on grids of three or more axes
axis by axis (each link holds whatever the other axes' coordinates). Nothing needs the boxes to be whole:
a cell lies in one group box row and one block box, so a group holds the cell's pairs exactly when it
has the block, whatever the boxes' sizes, and a box cut by the grid's border has its own candidates,
which the choices' check compares like any other. Layouts without outer axes, bounds reading anything
but neighborhoods, ``full`` and ``empty`` get no classes (None: the caller decides every tile).
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl.analysis import cellshift


def tile_classes(engine, geo, bounds, keys: np.ndarray, tables: list, static):
    """``(rep_keys, rep_static, inverse)``: the representative tiles (keys ``m * nkb + n``, sorted, not
    necessarily among ``keys``), their static bounds' ``(lower, upper)`` states, and each tile's class;
    None when the tiles get no classes (see the module notes) or none is shared."""
    layout = engine.env.layout
    if not getattr(geo, "grid", False) or layout is None or len(layout.shape) < 2 or not len(keys):
        return None
    found = [cellshift._neighborhoods(b) for b in bounds]
    if any(p is None for p in found):
        return None
    prims = tuple(dict.fromkeys(p for ps in found for p in ps))
    reps = classes(prims, layout, geo, tables)
    m, n = keys // geo.nkb, keys % geo.nkb
    cm, cn = cellshift.canonical(reps, layout, engine.q.block, engine.k.block, m, n)
    low, up = (np.asarray(s, np.int64) for s in static)
    code = ((cm * geo.nkb + cn) * 3 + low) * 3 + up  # a static state is empty, partial or full
    uniq, first, inverse = np.unique(code, return_index=True, return_inverse=True)
    if len(uniq) == len(keys):
        return None
    cellshift.TALLY.tiles += len(keys) - len(uniq)
    return uniq // 9, (static[0][first], static[1][first]), inverse.reshape(-1)


def classes(prims: tuple, layout, geo, tables: list, whole: tuple[int, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Per outer axis, ``rep[y] <= y``: the first row of the chain ``y, y - P, ...`` of linked rows (every
    neighborhood's relative window the same, every table's runs the shifted ones: the module notes; ``P``
    also a multiple of ``whole[a]`` when given)."""
    out = []
    for a, n in enumerate(layout.shape[:-1]):
        sig, period = cellshift._signature(prims, layout, a)
        qb, kb = geo.qbox[a], geo.kbox[a]
        step = math.lcm(period, qb, kb, 1 if whole is None else whole[a])
        link = np.zeros(n, bool)
        if step < n:
            link[step:] = (sig[step:] == sig[:-step]).all(1)
            boxes = np.ones(geo.ng[a], bool)
            for table in tables:
                boxes &= _table_links(table, geo, a, step // qb, step // kb)
            link &= boxes[np.arange(n) // qb]
        out.append(cellshift._chains(link, step))
    return tuple(out)


def _table_links(table, geo, a: int, sq: int, sb: int) -> np.ndarray:
    """Per box row ``d`` of groups on outer axis ``a``: whether every outer box of groups there has the runs of
    the box ``sq`` rows lower (same count, same group columns) with blocks ``sb`` block rows higher."""
    outer = geo.ng[:-1]
    n_box = math.prod(outer)
    boxes = np.arange(n_box, dtype=np.int64)
    digit = np.unravel_index(boxes, outer)[a]
    partner = boxes - sq * math.prod(outer[a + 1 :])
    ok = digit >= sq
    box = table.group // geo.ngx
    count = np.bincount(box, minlength=n_box)
    ok &= count == count[np.where(ok, partner, 0)]
    if len(box):
        start = np.concatenate([[0], np.cumsum(count)])
        run_ok = ok[box]
        j = np.where(run_ok, np.arange(len(box)) - start[box] + start[np.where(run_ok, partner[box], 0)], 0)
        gs, bs = sq * math.prod(geo.ng[a + 1 :]), sb * math.prod(geo.nbk[a + 1 :])
        same = (table.group - gs == table.group[j]) & (table.lo - bs == table.lo[j]) & (table.hi - bs == table.hi[j])
        same &= _min_digit(table.lo, table.hi, math.prod(geo.nbk[a + 1 :]), geo.nbk[a]) >= sb
        ok[box[run_ok & ~same]] = False
    return np.bincount(digit, weights=(~ok).astype(np.float64), minlength=geo.ng[a]) == 0


def _min_digit(lo: np.ndarray, hi: np.ndarray, stride: int, radix: int) -> np.ndarray:
    """The least digit (index ``// stride % radix``) of the indices ``[lo, hi)`` (``lo < hi``)."""
    q0, q1 = lo // stride, (hi - 1) // stride
    d0, d1 = q0 % radix, q1 % radix
    return np.where((q1 - q0 >= radix) | (d1 < d0), 0, d0)
