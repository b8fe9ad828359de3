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

Tiles where a static part and the route are both partial are decided on cells (:func:`tile_bounds`: a
piece of one grid row of queries holding consecutive group columns of one box row by a piece of one grid
row of keys inside one block, on which the route is all or nothing), the static bounds' states on cells
from an engine whose tiles are the distinct cells (one per translation class of :mod:`cellshift`).
"""

from __future__ import annotations

import math

import numpy as np

from patterndsl import ir
from patterndsl.analysis import cellshift, routegrid, routeruns, routetiles, tiles, tileshift
from patterndsl.analysis import engine as eng
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
        self.layout, self.tq, self.tk = engine.env.layout, engine.q.block, engine.k.block
        self.qbox, self.kbox = tuple(qbox), tuple(kbox)
        self.n_q = math.prod(-(-n // b) for n, b in zip(shape, qbox, strict=True))
        self.n_k = math.prod(-(-n // b) for n, b in zip(shape, kbox, strict=True))
        self.ng = tuple(-(-n // b) for n, b in zip(shape, qbox, strict=True))  # groups per axis
        self.nbk = tuple(-(-n // b) for n, b in zip(shape, kbox, strict=True))  # blocks per axis
        self.ngx = self.ng[-1]
        self.full = eng.rewrite_for_plan(prim.arg("among")) == ir.FULL
        length = math.prod(shape)
        self.q_pairs = tile_boxes(shape, self.qbox, engine.q.block, length)  # (query tile, group)
        self.k_pairs = tile_boxes(shape, self.kbox, engine.k.block, length)  # (key tile, block)
        self.groups_per_tile = np.bincount(self.q_pairs[0], minlength=self.nqb).astype(np.int64)
        self.blocks_per_tile = np.bincount(self.k_pairs[0], minlength=self.nkb).astype(np.int64)

    def run_spans(self, cand: routetiles.RunTable, run_open: np.ndarray):
        """The spans :func:`routeruns.classify` reads (in the place of :class:`routegrid.GridSpans`)."""
        return FullSpans(self, cand, run_open) if self.full else PieceSpans(self, cand, run_open)

    #: ``(src, dk)`` set by :class:`PieceSpans`: query tile ``m`` is row ``src[m]`` of the spans' Steps moved by
    #: ``dk[m]`` key tiles (None: every row its own); the moved rows are one segment of zeros there.
    copy = None

    def spread_all(self, steps: list[Steps]) -> tuple[Steps, list[np.ndarray]]:
        """:meth:`routegrid.GridGeometry.spread_all`: the functions overlaid, then every moved query tile's row
        copied from its class's first tile (:class:`PieceSpans`) once for all of them."""
        key, values = merged(steps)
        key, index, dropped = self._spread(key, steps[0].width)
        assert not any(v[dropped].any() for v in values)  # nothing copied past the last key tile
        return Steps(key, index, steps[0].width), values

    def spread(self, s: Steps) -> Steps:
        """The spans' Steps with the moved query tiles' rows copied (:meth:`spread_all` of one function)."""
        key, index, dropped = self._spread(s.key, s.width)
        assert not s.value[dropped].any()
        return s if self.copy is None else _compact(key, s.value[index], s.width)

    def _spread(self, key: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment starts ``key`` with every moved query tile's row copied from its class's first tile, moved by
        its shift in key tiles (what would pass the last key tile is 0: the moved candidates lie inside the
        grid), the index of the start each copy comes from (a moved row starts with a segment of its own row,
        one segment of zeros, below the first copied one) and those of the starts not copied past the last tile."""
        if self.copy is None:
            return key, np.arange(len(key), dtype=np.int64), np.zeros(0, np.int64)
        src, dk = self.copy
        nqb, nkb = self.nqb, self.nkb
        row_start = np.searchsorted(key, np.arange(nqb + 1, dtype=np.int64) * width)
        moved = dk > 0
        rows = np.arange(nqb, dtype=np.int64)
        m, idx = eng.expand_runs(rows, row_start[src], row_start[src + 1])
        n = key[idx] % width + dk[m]
        keep = n < nkb
        dropped = idx[~keep]
        m, idx, n = m[keep], idx[keep], n[keep]
        out = m * width + n
        at = np.searchsorted(out, rows[moved] * width)
        return np.insert(out, at, rows[moved] * width), np.insert(idx, at, row_start[rows[moved]]), dropped


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
    keys = eng.sorted_set(at[piece] * n_box + boxes)  # a tile's pieces may meet the same boxes
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
        gn, inverse = unique_inverse(cand.group[run[pair]] * nkb + k_tiles[pos])
        count = np.bincount(inverse, minlength=len(gn))
        del run, block, pair, pos
        self.g, n = gn // nkb, gn % nkb
        self.count = count.astype(np.int64)
        self.covers = self.count == geo.blocks_per_tile[n]
        self.group_open = np.zeros(geo.n_q, bool)
        self.group_open[cand.group] = run_open
        # query tiles alike up to a shift of whole tiles (the candidates repeating): only the first of each
        # class is listed, the others copy its Steps (:meth:`PieceGeometry.spread_all`)
        q_pairs, geo.copy = geo.q_pairs, None
        if len(geo.shape) > 1:
            m = np.arange(geo.nqb, dtype=np.int64)
            moved = _row_moves(geo, (), [cand], m)[1]
            moved[_odd_reach(geo, cand, k_start, k_tiles)] = 0
            if moved.any():
                geo.copy = (m - moved // geo.tq, moved // geo.tk)
                keep = (moved == 0)[q_pairs[0]]
                q_pairs = (q_pairs[0][keep], q_pairs[1][keep])
        # groups meeting the same query tiles (neighbours in a box row between tiles' edges) summed first:
        # (segment, key tile) records, then spread to the segment's query tiles as (query tile, key tile)
        q_start, q_tiles, segment = _segments(q_pairs, geo.n_q)
        sn, self.to_sn = unique_inverse(segment[self.g] * nkb + n)
        s_of, n_of = sn // nkb, sn % nkb
        routegrid._check(int((q_start[s_of + 1] - q_start[s_of]).sum()))
        per_sn = q_start[s_of + 1] - q_start[s_of]
        rec, pos = eng.expand_runs(np.arange(len(sn), dtype=np.int64), q_start[s_of], q_start[s_of + 1])
        self.n_sn = len(sn)
        self.rec_start = np.zeros(len(sn) + 1, np.int64)  # record s's entries: rec_start[s]:rec_start[s + 1]
        np.cumsum(per_sn, out=self.rec_start[1:])
        # millions of entries at a million tokens: built in place, kept as int32 (indices below 2**31)
        entry = q_tiles[pos]
        del pos
        entry *= nkb
        entry += n_of[rec]
        self.rec = rec.astype(np.int32)
        del rec, s_of, n_of, sn
        keys, inv = unique_inverse(entry, scratch=True)
        del entry
        self.inv = inv.astype(np.int32)
        del inv
        # the segments of every Steps built here: each listed tile, the gaps between them, each row's start
        width = nkb + 1
        start = keys // nkb * width + keys % nkb
        rows = np.arange(geo.nqb, dtype=np.int64) * width
        # a tile's start before a gap or a row starting there (its low bit 0), the tiles in order (sorted keys)
        packed = np.sort(np.concatenate([start << 1, (start + 1) << 1 | 1, rows << 1 | 1]))
        at, is_tile = packed >> 1, (packed & 1) == 0
        tile = np.where(is_tile, np.cumsum(is_tile) - 1, -1)
        first = np.ones(len(at), bool)
        first[1:] = at[1:] != at[:-1]
        first &= at % width < nkb
        self.seg_key, self.seg_tile = at[first], tile[first]
        self.n_keys = len(keys)
        self._covers = {}

    def _steps(self, per_record: np.ndarray) -> Steps:
        """Steps of the sum over the entries of each tile of ``per_record`` (per (group, key tile))."""
        per_sn = np.bincount(self.to_sn, weights=per_record, minlength=self.n_sn)
        live = np.flatnonzero(per_sn)
        if not len(live) or not self.n_keys:  # every segment holds 0
            return _compact(self.seg_key, np.zeros(len(self.seg_key), np.int64), self.geo.nkb + 1)
        if 2 * len(live) < self.n_sn:  # few records weigh (the forced groups, the tiles over a large cap)
            _, at = eng.expand_runs(live, self.rec_start[live], self.rec_start[live + 1])
            value = np.bincount(self.inv[at], weights=per_sn[self.rec[at]], minlength=self.n_keys)
        else:
            value = np.bincount(self.inv, weights=per_sn[self.rec], minlength=self.n_keys)
        value = np.rint(value).astype(np.int64)
        seg = np.where(self.seg_tile >= 0, value[np.maximum(self.seg_tile, 0)], 0)
        return _compact(self.seg_key, seg, self.geo.nkb + 1)

    def cover(self, which: bool | None, covered: bool = True):
        """``(touched, covered)`` Steps: groups of the query tile (all; open only: True; forced only: False)
        touching / covering each key tile (``covered=False``: ``(touched, None)``)."""
        sel = np.ones(len(self.g), bool) if which is None else self.group_open[self.g] == which
        if sel.all():  # every group selected: the Steps of all of them, built once
            which = None
        if (which, covered) not in self._covers:
            touched = self._steps(sel.astype(np.int64))
            whole = self._steps((sel & self.covers).astype(np.int64)) if covered else None
            self._covers[which, covered] = (touched, whole)
            if covered:
                self._covers[which, False] = (touched, None)
        return self._covers[which, covered]

    def over(self, keep: np.ndarray, cap: np.ndarray) -> Steps:
        """Bool Steps: some group of the kept runs has more than ``cap[group]`` candidate blocks in the tile."""
        kept = np.zeros(self.geo.n_q, bool)
        kept[self.cand.group[keep]] = True
        s = self._steps((kept[self.g] & (self.count > cap[self.g])).astype(np.int64))
        return _compact(s.key, (s.value > 0).astype(np.int64), s.width)


def tile_bounds(
    engine: eng.Engine, node: ir.Node, geo: PieceGeometry, keys: np.ndarray, tables: list, sign: int, static
):
    """:func:`routeruns._tile_bounds` on a grid whose rows do not hold whole tiles: per tile ``keys`` and per
    choice in ``tables``, the pattern's state with the route fixed to it, decided on cells, not elements.

    A *cell* is a piece of one grid row of queries inside one query tile, holding a range of consecutive
    group columns of one outer box (cut at the tile's edges and the box columns), by a piece of one grid
    row of keys inside one key tile and one block. The route is all or nothing on the pairs of one group
    and one block, so a cell is decided as :func:`routeruns._cells_of_tiles` decides one: where the static
    bounds agree that is its state; where they are empty and full the route alone (counted groups); else
    the upper bound's where every group takes it, the lower one's where none does, and cells mixing both
    halved in their group columns (down to one group). The static bounds' states on cells come from an
    engine whose tiles are the distinct cells (:func:`_cell_states`, one cell per translation class)."""
    rewrite = eng.rewrite_for_plan
    low_node, up_node = rewrite(ir.route_bound(node, True)), rewrite(ir.route_bound(node, False))
    shift = _tile_classes(engine, geo, (low_node, up_node), keys, tables, static)
    if shift is not None:
        keys, static, inverse = shift
    low_s, up_s = static
    n_t = len(keys)
    full = [up_s == eng.FULL for _ in tables]
    some = [low_s > eng.EMPTY for _ in tables]
    counters = [routeruns._counter(table, geo.n_q) for table in tables]
    qcells = _query_cells(geo, engine.q.block)  # per query tile: (start, row, g0 column, g1 column, c0, c1)
    kcells = _key_cells(geo, engine.k.block)  # per key tile: (start, row, e0, e1, block)
    m, n = keys // geo.nkb, keys % geo.nkb
    chunk = max(1, routeruns.CELL_CHUNK // 64)
    for t0 in range(0, n_t, chunk):
        part = np.arange(t0, min(t0 + chunk, n_t), dtype=np.int64)
        _cells(
            engine, geo, (part, m[part], n[part]), (qcells, kcells), (low_node, up_node), counters, sign, (full, some)
        )
    states = zip(full, some, strict=True)
    out = [np.where(f, eng.FULL, np.where(sm, eng.PARTIAL, eng.EMPTY)).astype(np.int8) for f, sm in states]
    return out if shift is None else [s[inverse] for s in out]


def _pieces(geo: PieceGeometry, tile: int):
    """Per tile of ``tile`` positions: ``(start, row, c0, c1)``, its pieces of grid rows (tile ``t``'s are
    ``start[t]:start[t + 1]``), each grid row ``row`` (row-major over the outer axes) columns ``[c0, c1)``."""
    w, length = geo.shape[-1], math.prod(geo.shape)
    n_t = -(-length // tile)
    t = np.arange(n_t, dtype=np.int64)
    p0, p1 = t * tile, np.minimum((t + 1) * tile, length)
    r0, r1 = p0 // w, (p1 - 1) // w + 1
    start = np.zeros(n_t + 1, np.int64)
    np.cumsum(r1 - r0, out=start[1:])
    at, row = eng.expand_runs(t, r0, r1)
    return start, row, np.maximum(p0[at] - row * w, 0), np.minimum(p1[at] - row * w, w)


def _box_base(geo: PieceGeometry, row: np.ndarray, box: tuple[int, ...]) -> np.ndarray:
    """The index of the first box (row-major over boxes of extents ``box``) of each grid row's box row."""
    shape = geo.shape
    radix = tuple(-(-s // b) for s, b in zip(shape, box, strict=True))
    coords = np.unravel_index(row, shape[:-1])
    outer = np.ravel_multi_index(tuple(x // b for x, b in zip(coords, box, strict=False)), radix[:-1])
    return outer * radix[-1]


def _query_cells(geo: PieceGeometry, tile: int):
    """Per query tile, its pieces of rows as cells of every group column they meet: ``(start, row, ga, gb, c0,
    c1, base)``: groups ``base + [ga, gb)``, columns ``[c0, c1)``."""
    start, row, c0, c1 = _pieces(geo, tile)
    qx = geo.qbox[-1]
    return start, row, c0 // qx, (c1 - 1) // qx + 1, c0, c1, _box_base(geo, row, geo.qbox)


def _key_cells(geo: PieceGeometry, tile: int):
    """Per key tile, its pieces of rows cut at the block columns: ``(start, row, e0, e1, block)``."""
    start, row, c0, c1 = _pieces(geo, tile)
    rx = geo.kbox[-1]
    piece, col = eng.expand_runs(np.arange(len(row), dtype=np.int64), c0 // rx, (c1 - 1) // rx + 1)
    counts = np.bincount(piece, minlength=len(row))
    pstart = np.zeros(len(row) + 1, np.int64)
    np.cumsum(counts, out=pstart[1:])
    row_ = row[piece]
    e0, e1 = np.maximum(c0[piece], col * rx), np.minimum(c1[piece], (col + 1) * rx)
    return pstart[start], row_, e0, e1, _box_base(geo, row_, geo.kbox) + col


def _cells(engine, geo, tiles, cells, bounds, counters, sign, acc) -> None:
    """:func:`tile_bounds` on the tiles ``(index, m, n)``, folded into ``acc`` (per table, full and some)."""
    idx, m, n = tiles
    (qs, qrow, qga, qgb, qc0, qc1, qbase), (ks, krow, ke0, ke1, kblock) = cells
    # every (tile, query piece, key cell)
    j, qp = eng.expand_runs(np.arange(len(idx), dtype=np.int64), qs[m], qs[m + 1])
    pair, kc = eng.expand_runs(np.arange(len(j), dtype=np.int64), ks[n[j]], ks[n[j] + 1])
    owner, qp = idx[j[pair]], qp[pair]
    ga, gb = qga[qp], qgb[qp]
    b = kblock[kc]
    low_node, up_node = bounds
    while len(owner):
        a0, a1 = np.maximum(qc0[qp], ga * geo.qbox[-1]), np.minimum(qc1[qp], gb * geo.qbox[-1])
        low, up = _cell_states(engine, (low_node, up_node), (qrow[qp], a0, a1), (krow[kc], ke0[kc], ke1[kc]))
        g0, g1 = qbase[qp] + ga, qbase[qp] + gb
        rest = routeruns.decide_cells((low, up), (g0, g1, b), owner, counters, sign, acc)
        if not rest.any():
            break
        sel = np.flatnonzero(rest)
        mid = (ga[sel] + gb[sel]) // 2
        owner, qp, kc, b = (np.repeat(a[sel], 2) for a in (owner, qp, kc, b))
        ga = np.stack([ga[sel], mid], 1).reshape(-1)
        gb = np.stack([mid, gb[sel]], 1).reshape(-1)


def _cell_states(engine: eng.Engine, nodes, q, k) -> list[np.ndarray]:
    """States of each static node of ``nodes`` on the cells ``q`` x ``k`` (each ``(row, c0, c1)``: columns
    ``[c0, c1)`` of a grid row), from an engine whose tiles are the distinct cells, the query's rows moved to
    their translation class's first row and the key's by the same offsets (:mod:`cellshift`), and so their
    columns (:func:`_canonical_columns`), when every node is made of neighborhoods."""
    qrow, a0, a1 = q
    krow, e0, e1 = k
    if all(node in (ir.FULL, ir.EMPTY) for node in nodes):
        return [np.full(len(qrow), eng.FULL if node == ir.FULL else eng.EMPTY, np.int8) for node in nodes]
    layout = engine.env.layout
    found = [cellshift._neighborhoods(node) for node in nodes]
    if all(p is not None for p in found):
        prims = tuple(dict.fromkeys(p for ps in found for p in ps))
        classes = cellshift._outer_classes(prims, layout) if prims else None
        if classes is not None:
            qrow, krow = cellshift.canonical_rows(classes, tuple(layout.shape[:-1]), qrow, krow)
        if prims:
            a0, a1, e0, e1 = _canonical_columns(prims, layout, a0, a1, e0, e1)
    radix = layout.shape[-1] + 1
    uq, qi = unique_inverse((qrow * radix + a0) * radix + a1)
    uk, ki = unique_inverse((krow * radix + e0) * radix + e1)
    pairs, inverse = unique_inverse(qi * len(uk) + ki)
    cellshift.TALLY.shifted += len(qrow) - len(pairs)
    sub = eng.Engine(_cell_side(layout, uq, radix), _cell_side(layout, uk, radix), engine.env, tally=engine.tally)
    return [routeruns._cell_states(sub, node, pairs)[inverse] for node in nodes]


def _canonical_columns(prims: tuple, layout: ir.Layout, a0, a1, e0, e1):
    """Cells' columns moved along the last axis as :mod:`cellshift` moves rows along the others: where every
    neighborhood's window relative to the query column is the same from column to column (period 1: no dilation
    or stride there), a pair of columns holds exactly when the pair moved by one column does, so a cell whose
    query columns ``[a0, a1)`` lie in one such run of columns moves with its key columns towards the run's first
    column, as far as the key's stay in the grid (the same place for every cell of its class)."""
    sig, period = cellshift._signature(prims, layout, len(layout.shape) - 1)
    if period != 1:
        return a0, a1, e0, e1
    link = np.zeros(len(sig), bool)
    link[1:] = (sig[1:] == sig[:-1]).all(1)
    start = np.maximum.accumulate(np.where(link, 0, np.arange(len(sig))))  # the first column of each run
    d = np.where(start[a1 - 1] == start[a0], np.minimum(a0 - start[a0], e0), 0)
    return a0 - d, a1 - d, e0 - d, e1 - d


def _cell_side(layout: ir.Layout, cells: np.ndarray, radix: int) -> tiles.Side:
    """A side whose tiles are ``cells`` (keys ``(row * radix + c0) * radix + c1``: columns ``[c0, c1)`` of a grid
    row), one piece each, its token indices listed (not an identity order)."""
    shape = tuple(layout.shape)
    w = shape[-1]
    rest, c1 = np.divmod(cells, radix)
    row, c0 = np.divmod(rest, radix)
    size = c1 - c0
    starts = np.zeros(len(cells) + 1, np.int64)
    np.cumsum(size, out=starts[1:])
    _, order = eng.expand_runs(row, row * w + c0, row * w + c1)
    a = np.stack([*np.unravel_index(row, shape[:-1]), c0], 1).astype(np.int64)
    count = np.ones_like(a)
    count[:, -1] = size
    strides = tuple(math.prod(shape[x + 1 :]) for x in range(len(shape)))
    every = np.arange(len(cells) + 1, dtype=np.int64)
    return tiles.Side(
        int(starts[-1]), int(size.max()), 0, shape, strides, order, every, every[:-1], a, np.ones_like(a), count,
        False, starts,
    )  # fmt: skip


def _tile_classes(engine: eng.Engine, geo: PieceGeometry, bounds, keys: np.ndarray, tables: list, static):
    """``(rep_keys, rep_static, inverse)`` as :func:`tileshift.tile_classes` gives them, for tiles across grid
    rows (:func:`_row_moves`: the query tile and the key tile moved by the same rows, whole tiles on both sides),
    every key row of the key tile staying in the grid; None when no tile shares a class."""
    layout = engine.env.layout
    if layout is None or len(layout.shape) < 2 or not len(keys):
        return None
    found = [cellshift._neighborhoods(b) for b in bounds]
    if any(p is None for p in found):
        return None
    prims = tuple(dict.fromkeys(p for ps in found for p in ps))
    m, n = keys // geo.nkb, keys % geo.nkb
    delta, moved = _row_moves(geo, prims, tables, m)
    outer = tuple(layout.shape[:-1])
    kr0, kr1 = _tile_rows(n, engine.k.block, layout.shape)
    ok = np.ones(len(keys), bool)
    for step in range(int((kr1 - kr0).max()) + 1):
        at = np.minimum(kr0 + step, kr1)
        for y, d in zip(np.unravel_index(at, outer), delta, strict=True):
            ok &= y >= d
    length = math.prod(layout.shape)
    ok &= (n < geo.nkb - 1) | (length % engine.k.block == 0)  # a last tile cut short is no shifted tile
    moved = np.where(ok, moved, 0)
    cm, cn = m - moved // engine.q.block, n - moved // engine.k.block
    low, up = (np.asarray(s, np.int64) for s in static)
    uniq, inverse = unique_inverse(((cm * geo.nkb + cn) * 3 + low) * 3 + up)  # a static state: 0, 1 or 2
    if len(uniq) == len(keys):
        return None
    cellshift.TALLY.tiles += len(keys) - len(uniq)
    return uniq // 9, ((uniq // 3 % 3).astype(np.int8), (uniq % 3).astype(np.int8)), inverse


def _odd_reach(geo: PieceGeometry, cand: routetiles.RunTable, k_start: np.ndarray, k_tiles: np.ndarray) -> np.ndarray:
    """Per query tile, whether a group meeting it has a candidate block cut short by the grid's border on an
    outer axis or meeting the last key tile when that one is cut short: such a tile's counts are no shifted copy
    of another's (a whole block moved there would reach past the grid)."""
    outer = geo.nbk[:-1]
    digits = np.unravel_index(np.arange(geo.n_k, dtype=np.int64) // geo.nbk[-1], outer)
    odd = np.zeros(geo.n_k, bool)
    for d, n, b, count in zip(digits, geo.shape[:-1], geo.kbox[:-1], outer, strict=True):
        if n % b:
            odd |= d == count - 1
    if math.prod(geo.shape) % geo.tk:
        last = np.flatnonzero(k_tiles == geo.nkb - 1)
        odd[np.searchsorted(k_start, last, "right") - 1] = True  # the blocks whose tiles list it
    prefix = np.concatenate([[0], np.cumsum(odd)])
    runs = prefix[cand.hi] > prefix[cand.lo]
    group = np.zeros(geo.n_q, bool)
    group[cand.group[runs]] = True
    tile = np.zeros(geo.nqb, bool)
    tile[geo.q_pairs[0][group[geo.q_pairs[1]]]] = True
    return tile


def _tile_rows(t: np.ndarray, tile: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """The first and last grid row (row-major over the outer axes) of each tile ``t`` of ``tile`` positions."""
    w, length = shape[-1], math.prod(shape)
    return t * tile // w, (np.minimum((t + 1) * tile, length) - 1) // w


def _row_moves(geo: PieceGeometry, prims: tuple, tables: list, m: np.ndarray):
    """``(delta, moved)``: per outer axis, the rows each query tile ``m`` moves by to its class's first rows
    (:func:`tileshift.classes` of the neighborhoods ``prims`` and the choices ``tables``, the shift also a multiple
    of the rows that hold whole tiles on both sides: a shift of ``P`` rows on an axis of stride ``s`` positions
    moves the tiles' pieces, their cells and boxes alike when ``P * s`` is a multiple of both tile sizes), and
    the positions that is; 0 where the tile's rows do not all have the same offset."""
    layout, shape, tq, tk = geo.layout, geo.shape, geo.tq, geo.tk
    outer = shape[:-1]
    strides = [math.prod(shape[a + 1 :]) for a in range(len(outer))]
    whole = tuple(math.lcm(tq // math.gcd(s, tq), tk // math.gcd(s, tk)) for s in strides)
    reps = tileshift.classes(prims, layout, geo, tables, whole)
    qr0, qr1 = _tile_rows(m, tq, shape)
    delta = [y - rep[y] for y, rep in zip(np.unravel_index(qr0, outer), reps, strict=True)]
    ok = np.ones(len(m), bool)
    for step in range(1, int((qr1 - qr0).max(initial=0)) + 1):  # a tile's rows: a few
        at = np.minimum(qr0 + step, qr1)
        for y, rep, d in zip(np.unravel_index(at, outer), reps, delta, strict=True):
            ok &= y - rep[y] == d
    ok &= (m < geo.nqb - 1) | (math.prod(shape) % tq == 0)  # a last tile cut short is no shifted tile
    delta = [np.where(ok, d, 0) for d in delta]
    return delta, sum(d * s for d, s in zip(delta, strides, strict=True))


def unique_inverse(keys: np.ndarray, scratch: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` of non-negative integers by one plain sort: each key carries its
    index in its low bits (numpy's ``unique`` took 0.4 s on the 2.9M keys of a 999 x 999 route, the sort 25 ms);
    an argsort when the packed keys would not fit in 62 bits. ``scratch``: ``keys`` (int64) may be overwritten."""
    n = len(keys)
    bits = max(1, (n - 1).bit_length())
    if n and int(keys.max()) < 1 << (62 - bits):
        packed = np.left_shift(keys, bits, out=keys if scratch else None)
        packed |= np.arange(n, dtype=np.int64)
        packed.sort()
        index = packed & ((1 << bits) - 1)
        ordered = np.right_shift(packed, bits, out=packed)
    else:
        index = np.argsort(keys, kind="stable")
        ordered = keys[index]
    new = np.ones(n, bool)
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    rank = np.cumsum(new)
    rank -= 1
    inverse = np.empty(n, np.int64)
    inverse[index] = rank
    return ordered[new], inverse
