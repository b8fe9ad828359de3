"""Stage 4 (block plan), grid routes whose tiles span grid rows, as runs: O(tiles' pieces), or O(candidates' tiles).

Comes in: what :func:`routegrid.geometry` takes (identity order, ``Lq = Lk``, one ``route`` of one
polarity on a grid of two or more axes) when a row of the grid does not hold whole tiles (250 x 250,
999 x 999, 14 x 30 x 30 at 128-token tiles). Goes out: the geometry :func:`routeruns.classify` works
with (:class:`PieceGeometry`, its :meth:`~PieceGeometry.run_spans` in the place of
:class:`routegrid.GridSpans`), so the tiles come back as :class:`~patterndsl.analysis.routeruns.RoutedRuns`.

A tile of such a grid is a union of pieces of rows (a tail of one row, whole rows, a head of another):
the groups it meets and the blocks it meets are the union of its pieces' box ranges, which can overlap
(two rows of one box row meet the same boxes): :func:`tile_boxes` lists the distinct (tile, box) pairs,
a few dozen a tile. The per-tile quantities :func:`routeruns.classify` reads are, per (query tile
``m``, key tile ``n``), over the groups ``a`` meeting ``m``: how many touch ``n`` (have a candidate
among the blocks meeting ``n``), how many cover it (have every such block), the same of the forced and
of the open groups, and whether an open group has more than ``cap[a]`` of them (the box test).

- ``among = full`` (BiFormer, :class:`FullSpans`): every group has every block, so every group has the
  same ``n_a`` and ``k_a`` and is open or forced with all the others; the counts are one segment a query
  tile (all groups of the tile, or none) and the box flag is ``blocks(n) > cap``, the same on every query
  tile: one run of key tiles per query tile when every tile meets more than ``topk`` blocks (128-token
  tiles, 8 x 8 blocks). No per-tile list: BiFormer on 999 x 999 in about 0.1 s.
- another ``among`` (:class:`PieceSpans`): the candidate pairs ``(a, b)`` and the key tiles each block
  meets give ``c(a, n)``, the candidate blocks of ``a`` meeting ``n`` (a block's tiles listed once),
  so ``a`` touches ``n`` when ``c > 0``, covers it when ``c`` is the blocks meeting ``n``, and passes the
  cap when ``c > cap[a]``; summed over consecutive groups meeting the same query tiles (:func:`_segments`;
  few on such grids, the tiles' edges moving from row to row: 2.9M entries for 3.7M on 999 x 999), spread
  to those query tiles and summed per ``(m, n)``. Its cost follows the (group, key tile) pairs the
  candidates touch times the query tiles of a group; past :data:`routegrid.MAX_ENTRIES` such entries the
  other plans take over (``among = neighborhood((3, 9, 9))`` on 14 x 250 x 250: 17M).

Tiles where a static part and the route are both partial have their elements evaluated with the
choices fixed by :func:`routeruns._other_tiles` (no cells: a cell of ``qblock`` queries would cross rows
here); when that could pass :data:`routegrid.MAX_ELEMENTS` (two bounds, whole tiles) the other plans
take over.
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routegrid, routetiles
from patterndsl.analysis.routeruns import Steps, _compact, merged, ranges


class PieceGeometry:
    """How box groups and blocks meet the tiles of a grid whose rows do not hold whole tiles.

    Attributes:
        nqb, nkb: query and key tiles; ``n_q``, ``n_k``: groups and blocks.
        groups_per_tile: int64 ``[nqb]``: distinct groups meeting each query tile.
        blocks_per_tile: int64 ``[nkb]``: distinct blocks meeting each key tile.
        full: ``among`` is ``full``.
        grid: True; cells: False (:func:`routeruns._other_tiles` decides tiles with the choices fixed).
    """

    grid = True
    cells = False

    def __init__(self, engine: eng.Engine, prim: ir.Prim, qbox: tuple[int, ...], kbox: tuple[int, ...]):
        shape = tuple(engine.env.layout.shape)
        self.shape, self.nqb, self.nkb = shape, engine.nqb, engine.nkb
        self.qbox, self.kbox = tuple(qbox), tuple(kbox)
        self.n_q = math.prod(-(-n // b) for n, b in zip(shape, qbox, strict=True))
        self.n_k = math.prod(-(-n // b) for n, b in zip(shape, kbox, strict=True))
        self.full = eng.rewrite_for_plan(prim.arg("among")) == ir.FULL
        length = math.prod(shape)
        self.q_pairs = tile_boxes(shape, self.qbox, engine.q.block, length)  # (query tile, group)
        self.k_pairs = tile_boxes(shape, self.kbox, engine.k.block, length)  # (key tile, block)
        self.groups_per_tile = np.bincount(self.q_pairs[0], minlength=self.nqb).astype(np.int64)
        self.blocks_per_tile = np.bincount(self.k_pairs[0], minlength=self.nkb).astype(np.int64)

    def run_spans(self, cand: routetiles.RunTable, run_open: np.ndarray):
        """The spans :func:`routeruns.classify` reads (in the place of :class:`routegrid.GridSpans`)."""
        return FullSpans(self, cand, run_open) if self.full else PieceSpans(self, cand, run_open)

    # the spans' Steps are over every query tile already (no shared tiles): GridGeometry's copies as none

    def spread_all(self, steps: list[Steps]) -> tuple[Steps, list[np.ndarray]]:
        """:meth:`routegrid.GridGeometry.spread_all` without copies: the functions overlaid."""
        key, values = merged(steps)
        return Steps(key, np.arange(len(key), dtype=np.int64), steps[0].width), values

    def spread(self, s: Steps) -> Steps:
        return s


def tile_boxes(shape: tuple[int, ...], box: tuple[int, ...], tile: int, length: int):
    """``(tile, box)``: the distinct boxes of extents ``box`` (row-major over the boxes, cut at the grid's
    edges) each tile of ``tile`` positions (row-major over ``shape``, the last one cut at ``length``) meets,
    sorted by (tile, box), from the tiles' pieces of rows (one range of box columns each)."""
    w = shape[-1]
    n_t = -(-length // tile)
    t = np.arange(n_t, dtype=np.int64)
    p0, p1 = t * tile, np.minimum((t + 1) * tile, length)
    at, row = eng.expand_runs(t, p0 // w, (p1 - 1) // w + 1)  # (tile, grid row) pieces
    c0 = np.maximum(p0[at] - row * w, 0)
    c1 = np.minimum(p1[at] - row * w, w)
    radix = tuple(-(-n // b) for n, b in zip(shape, box, strict=True))
    coords = np.unravel_index(row, shape[:-1])
    outer = np.ravel_multi_index(tuple(x // b for x, b in zip(coords, box, strict=False)), radix[:-1])
    base = outer * radix[-1]
    pieces = np.arange(len(at), dtype=np.int64)
    piece, boxes = eng.expand_runs(pieces, base + c0 // box[-1], base + (c1 - 1) // box[-1] + 1)
    n_box = math.prod(radix)
    keys = np.unique(at[piece] * n_box + boxes)  # a tile's pieces may meet the same boxes
    return keys // n_box, keys % n_box


def _by_box(pairs, n_box: int):
    """``(start, tiles)``: the tiles of box ``i`` are ``tiles[start[i]:start[i + 1]]`` (sorted, distinct)."""
    tile, box = pairs
    order = np.argsort(box, kind="stable")
    start = np.zeros(n_box + 1, np.int64)
    np.cumsum(np.bincount(box, minlength=n_box), out=start[1:])
    return start, tile[order]


def _segments(pairs, n_q: int):
    """``(start, tiles, segment)``: runs of consecutive groups meeting the same query tiles (``pairs``: (tile,
    group)) as *segments*, ``segment[a]`` that of group ``a``; segment ``s`` meets ``tiles[start[s]:start[s+1]]``."""
    start, tiles = _by_box(pairs, n_q)
    count = np.diff(start)
    same = np.zeros(n_q, bool)
    same[1:] = count[1:] == count[:-1]
    g = np.flatnonzero(same)
    at, pos = eng.expand_runs(g, start[g], start[g + 1])
    same[at[tiles[pos] != tiles[pos - count[at]]]] = False  # compared with the previous group's tiles
    segment = np.cumsum(~same) - 1
    firsts = np.flatnonzero(~same)
    seg_start = np.zeros(len(firsts) + 1, np.int64)
    np.cumsum(count[firsts], out=seg_start[1:])
    _, pos = eng.expand_runs(firsts, start[firsts], start[firsts + 1])
    return seg_start, tiles[pos], segment


class FullSpans:
    """:class:`routegrid.GridSpans`'s :meth:`cover` and :meth:`over` when every group has every block."""

    def __init__(self, geo: PieceGeometry, cand: routetiles.RunTable, run_open: np.ndarray):
        # every group one run of every block (routegrid.candidates): all open or all forced
        assert len(cand.group) == geo.n_q and (cand.hi - cand.lo == geo.n_k).all()
        assert run_open.all() or not run_open.any()
        self.geo, self.open = geo, bool(run_open.any())

    def _rows(self, weight: np.ndarray) -> Steps:
        geo = self.geo
        rows = np.arange(geo.nqb, dtype=np.int64)
        return ranges(rows, rows * 0, np.full(geo.nqb, geo.nkb, np.int64), weight, geo.nqb, geo.nkb)

    def cover(self, which: bool | None, covered: bool = True):
        """``(touched, covered)`` Steps (all groups; open only: True; forced only: False): every group of a
        query tile touches and covers every key tile, or none does."""
        on = which is None or which == self.open
        s = self._rows(self.geo.groups_per_tile * int(on))
        return s, s if covered else None

    def over(self, keep: np.ndarray, cap: np.ndarray) -> Steps:
        """Bool Steps: some kept group has more than its cap of candidate blocks in the tile (``blocks(n)``)."""
        geo = self.geo
        if not keep.any():
            return self._rows(np.zeros(geo.nqb, np.int64))
        kept = cap[np.flatnonzero(keep)]  # one run a group, in order
        assert (kept == kept[0]).all()  # every group the same n_a and k_a
        hot = np.concatenate([[False], geo.blocks_per_tile > kept[0], [False]])
        edge = np.flatnonzero(hot[1:] != hot[:-1])
        lo, hi = edge[0::2], edge[1::2]
        routegrid._check(geo.nqb * len(lo))
        rows = np.repeat(np.arange(geo.nqb, dtype=np.int64), len(lo))
        s = ranges(rows, np.tile(lo, geo.nqb), np.tile(hi, geo.nqb), 1, geo.nqb, geo.nkb)
        return _compact(s.key, (s.value > 0).astype(np.int64), s.width)


class PieceSpans:
    """:class:`routegrid.GridSpans`'s :meth:`cover` and :meth:`over` from (group, key tile) counts (see the
    module notes), summed over the groups of each query tile."""

    def __init__(self, geo: PieceGeometry, cand: routetiles.RunTable, run_open: np.ndarray):
        self.geo, self.cand = geo, cand
        nkb = geo.nkb
        routegrid._check(int((cand.hi - cand.lo).sum()))
        run, block = eng.expand_runs(np.arange(len(cand.group), dtype=np.int64), cand.lo, cand.hi)
        k_start, k_tiles = _by_box(geo.k_pairs, geo.n_k)
        routegrid._check(int((k_start[block + 1] - k_start[block]).sum()))
        pair, pos = eng.expand_runs(np.arange(len(block), dtype=np.int64), k_start[block], k_start[block + 1])
        # (group, key tile): candidate blocks of the group meeting the tile (each block's tiles distinct)
        gn, count = np.unique(cand.group[run[pair]] * nkb + k_tiles[pos], return_counts=True)
        del run, block, pair, pos
        self.g, n = gn // nkb, gn % nkb
        self.count = count.astype(np.int64)
        self.covers = self.count == geo.blocks_per_tile[n]
        self.group_open = np.zeros(geo.n_q, bool)
        self.group_open[cand.group] = run_open
        # groups meeting the same query tiles (neighbours in a box row between tiles' edges) summed first:
        # (segment, key tile) records, then spread to the segment's query tiles as (query tile, key tile)
        q_start, q_tiles, segment = _segments(geo.q_pairs, geo.n_q)
        sn, self.to_sn = np.unique(segment[self.g] * nkb + n, return_inverse=True)
        s_of, n_of = sn // nkb, sn % nkb
        routegrid._check(int((q_start[s_of + 1] - q_start[s_of]).sum()))
        self.rec, pos = eng.expand_runs(np.arange(len(sn), dtype=np.int64), q_start[s_of], q_start[s_of + 1])
        self.n_sn = len(sn)
        keys, self.inv = np.unique(q_tiles[pos] * nkb + n_of[self.rec], return_inverse=True)
        del pos, s_of, n_of, sn
        # the segments of every Steps built here: each listed tile, the gaps between them, each row's start
        width = nkb + 1
        start = keys // nkb * width + keys % nkb
        rows = np.arange(geo.nqb, dtype=np.int64) * width
        at = np.concatenate([start, start + 1, rows])
        tile = np.concatenate([np.arange(len(keys)), np.full(len(keys) + geo.nqb, -1)])
        order = np.argsort(at, kind="stable")  # a tile's start before a gap starting there
        at, tile = at[order], tile[order]
        first = np.ones(len(at), bool)
        first[1:] = at[1:] != at[:-1]
        first &= at % width < nkb
        self.seg_key, self.seg_tile = at[first], tile[first]
        self.n_keys = len(keys)

    def _steps(self, per_record: np.ndarray) -> Steps:
        """Steps of the sum over the entries of each tile of ``per_record`` (per (group, key tile))."""
        per_sn = np.bincount(self.to_sn, weights=per_record, minlength=self.n_sn)
        value = np.bincount(self.inv, weights=per_sn[self.rec], minlength=self.n_keys)
        value = np.rint(value).astype(np.int64)
        if not len(value):  # no (query tile, key tile) entry: every segment holds 0
            return _compact(self.seg_key, np.zeros(len(self.seg_key), np.int64), self.geo.nkb + 1)
        seg = np.where(self.seg_tile >= 0, value[np.maximum(self.seg_tile, 0)], 0)
        return _compact(self.seg_key, seg, self.geo.nkb + 1)

    def cover(self, which: bool | None, covered: bool = True):
        """``(touched, covered)`` Steps: groups of the query tile (all; open only: True; forced only: False)
        touching / covering each key tile (``covered=False``: ``(touched, None)``)."""
        sel = np.ones(len(self.g), bool) if which is None else self.group_open[self.g] == which
        touched = self._steps(sel.astype(np.int64))
        return touched, self._steps((sel & self.covers).astype(np.int64)) if covered else None

    def over(self, keep: np.ndarray, cap: np.ndarray) -> Steps:
        """Bool Steps: some group of the kept runs has more than ``cap[group]`` candidate blocks in the tile."""
        kept = np.zeros(self.geo.n_q, bool)
        kept[self.cand.group[keep]] = True
        s = self._steps((kept[self.g] & (self.count > cap[self.g])).astype(np.int64))
        return _compact(s.key, (s.value > 0).astype(np.int64), s.width)
