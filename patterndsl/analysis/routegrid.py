"""Stage 4 (block plan), route patterns on a grid (2-D, 3-D video, ...), as runs: O(groups x their tiles), not O(tiles).

Comes in: what :mod:`patterndsl.analysis.routeruns` takes, on a grid layout of two or more axes with
box groups and blocks (``route(block = (r, r))``, BiFormer; ``block = (1, r, r)`` on video frames):
the identity-order engine of one head group, one ``route`` of one polarity, ``among`` not reading
``h``, ``Lq = Lk``, and every tile within one row of the grid (a line along the last axis, whose
length is a multiple of both tile sizes). Goes out: the geometry :func:`routeruns.classify` works with
(:class:`GridGeometry`), so the tiles come back as :class:`~patterndsl.analysis.routeruns.RoutedRuns`.
Grids whose rows do not hold whole tiles: :mod:`~patterndsl.analysis.routepieces`.

Blocks are numbered row-major over boxes. A key tile of row ``y`` holding columns ``[c0, c1)``
meets the blocks of the block row over ``y`` (the boxes holding it on the axes before the last) with
block columns ``[c0 // rx, (c1 - 1) // rx]``: one contiguous range of block indices. So a group's run of
candidate blocks ``[lo, hi)`` (disjoint, not touching) touches, covers whole, and meets with a given
count exactly what its boxes do: a range of indices in row-major order is at most two boxes per axis
(:func:`mixed_radix_boxes`: a prefix of fixed blocks, a range on one axis, anything after it). A box
whose last axis is whole holds whole rows: one range of key tiles, all covered, per row of its fixed
prefix's blocks (one range in 2-D; a tile is covered by the union of a group's runs only when one run
covers it, its blocks being one range); a box of a range of block columns gives one range of tiles
per row it spans, with at most two end tiles, whose counts of candidate blocks are summed per group.
A group's query tiles are one range per row it spans, and every row of a box of groups holds the same
groups at a tile column: the quantities below are built on one *shared* query tile per box and tile
column and copied to the box's rows (:meth:`GridGeometry.spread`). Every per-tile quantity
:func:`routeruns.classify` reads (cover counts of the candidates, of the forced and the open groups,
the box test's over-the-cap flags) is then a :class:`routeruns.Steps` built from (shared query tile,
key-tile range) entries, a few per group and tile column: BiFormer at a million tokens (16,384 groups
and blocks, 67 million tiles a head decided at run time) is 8,192 runs, and so is its routing on 16
video frames of 256 x 256. Tiles where a static part and the route are both partial are decided on
cells of one row (:func:`routeruns._tile_bounds`, :meth:`GridGeometry.cell_groups` and
:meth:`GridGeometry.cell_blocks`) when the boxes' extents on the last axis divide the tiles.

Candidates: ``among = full`` gives every group one run of every block; another ``among`` is planned
on the (group x block) boxes (:meth:`Engine.route_candidates`, its cost following the candidates) and
listed when there are at most :data:`MAX_CANDIDATE_PAIRS` of them, else the geometry is not used.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routetiles
from patterndsl.analysis.routeruns import Steps, _compact, _summed, end_tiles, merged, ranges

#: Most candidate (group, block) pairs listed (``among`` other than ``full``).
MAX_CANDIDATE_PAIRS = 1 << 25
#: Most (query tile, key-tile range) entries a Steps function is built from.
MAX_ENTRIES = 1 << 24
#: Most elements evaluated (tiles where a static part and the route are both partial) in this form.
MAX_ELEMENTS = 1 << 26


class GridGeometry:
    """How box groups and blocks meet the tiles of a grid (2-D, 3-D, ...) in identity order (row tiles).

    A *row* is a line of the grid along its last axis (``x``); every tile lies in one row. Groups and
    blocks are numbered row-major over boxes; a box's *outer* index numbers its position on the axes
    before the last one.

    Attributes:
        nqb, nkb: query and key tiles; ``n_q``, ``n_k``: groups and blocks.
        groups_per_tile: int64 ``[nqb]``: groups meeting each query tile.
        grid: True (the 1-D geometry has no such attribute).
    """

    grid = True

    def __init__(self, engine: eng.Engine, prim: ir.Prim, qbox: tuple[int, ...], kbox: tuple[int, ...]):
        shape = tuple(engine.env.layout.shape)
        self.shape, self.outer, self.w = shape, shape[:-1], shape[-1]
        self.nqb, self.nkb = engine.nqb, engine.nkb
        self.qbox, self.kbox = tuple(qbox), tuple(kbox)
        self.qx, self.rx = qbox[-1], kbox[-1]
        self.ng = tuple(-(-n // b) for n, b in zip(shape, qbox, strict=True))  # groups per axis
        self.nbk = tuple(-(-n // b) for n, b in zip(shape, kbox, strict=True))  # blocks per axis
        self.ngx, self.nbx = self.ng[-1], self.nbk[-1]
        self.n_q, self.n_k = math.prod(self.ng), math.prod(self.nbk)
        self.qblock, self.block = self.qx, self.rx  # along a row (routeruns' cells)
        bm, bn = engine.q.block, engine.k.block
        self.tq, self.tk = self.w // bm, self.w // bn  # tiles per row
        t = np.arange(self.tk, dtype=np.int64)
        # key tile t of a row: block columns [bx0, bx1)
        self.bx0, self.bx1 = t * bn // self.rx, ((t + 1) * bn - 1) // self.rx + 1
        self.nb = self.bx1 - self.bx0
        t = np.arange(self.tq, dtype=np.int64)
        gx0, gx1 = t * bm // self.qx, ((t + 1) * bm - 1) // self.qx + 1
        self.groups_per_tile = np.tile(gx1 - gx0, math.prod(self.outer)).astype(np.int64)
        # group column gx: its query tiles of a row [t0, t1)
        gx = np.arange(self.ngx, dtype=np.int64)
        self.gt0 = gx * self.qx // bm
        self.gt1 = (np.minimum((gx + 1) * self.qx, self.w) - 1) // bm + 1
        self.one_tile = bool((self.gt1 - self.gt0 == 1).all())

    def shared_rows(self, group: np.ndarray):
        """``(index, v)``: every *shared* query tile ``v`` of each ``group[index]``: one per outer group box and
        tile column, standing for the query tiles of every row of the box at that column (their groups are
        the same, so is every per-tile quantity of the candidates: built once, copied by :meth:`spread`)."""
        gx = group % self.ngx
        base = group // self.ngx * self.tq
        if self.one_tile:  # every group column inside one tile: one shared tile a group
            return np.arange(len(group), dtype=np.int64), base + self.gt0[gx]
        return eng.expand_runs(np.arange(len(group), dtype=np.int64), base + self.gt0[gx], base + self.gt1[gx])

    @property
    def n_shared(self) -> int:
        return self.n_q // self.ngx * self.tq

    def spread_all(self, steps: list[Steps]) -> tuple[Steps, list[np.ndarray]]:
        """Functions over the shared query tiles, overlaid there and copied to every query tile once:
        ``(index, values)``, Steps over every query tile of the index of its segment among the overlaid
        ones (the segments the functions copied one by one would overlay into), and each function's
        value on those (read at the index)."""
        key, values = merged(steps)
        key, index = self._spread(key, steps[0].width)
        return Steps(key, index, steps[0].width), values

    def spread(self, s: Steps) -> Steps:
        """Steps over the shared query tiles (:meth:`shared_rows`) as Steps over every query tile."""
        key, index = self._spread(s.key, s.width)
        return Steps(key, s.value[index], s.width)

    def _spread(self, key: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The segment starts ``key`` over the shared query tiles copied to every query tile, and the index
        of the start each copy comes from."""
        m = np.arange(self.nqb, dtype=np.int64)
        v = self._outer(m // self.tq, self.qbox, self.ng) * self.tq + m % self.tq
        start = np.searchsorted(key, np.arange(self.n_shared + 1, dtype=np.int64) * width)
        mm, index = eng.expand_runs(m, start[v], start[v + 1])
        return mm * width + (key % width)[index], index

    def _box_rows(self, outer: np.ndarray, box: tuple[int, ...], radix: tuple[int, ...], axes: int | None = None):
        """``(index, row)``: every row of the grid holding the outer box ``outer[index]`` (row-major over
        ``radix``), on the first ``axes`` outer axes (all by default; ``row`` then counts on those only)."""
        axes = len(self.outer) if axes is None else axes
        idx = np.arange(len(outer), dtype=np.int64)
        row = np.zeros(len(outer), np.int64)
        digits = np.unravel_index(outer, radix) if radix else ()
        for k in range(axes):
            lo = digits[k] * box[k]
            hi = np.minimum(lo + box[k], self.outer[k])
            at, c = eng.expand_runs(np.arange(len(idx), dtype=np.int64), lo[idx], hi[idx])
            idx, row = idx[at], row[at] * self.outer[k] + c
        return idx, row

    def _outer(self, row: np.ndarray, box: tuple[int, ...], radix: tuple[int, ...]) -> np.ndarray:
        """The outer index of the box (of extents ``box``, ``radix`` of them per axis) holding each row."""
        if len(self.outer) == 1:  # 2-D: the row is the outer coordinate
            return row // box[0]
        coords = np.unravel_index(row, self.outer)
        return np.ravel_multi_index(tuple(x // e for x, e in zip(coords, box, strict=False)), radix[:-1])

    def cell_groups(self, r: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Groups ``[g0, g1)`` of the cell rows ``r`` of ``qx * 2**j`` queries (inside one row: ``qx * 2**j``
        divides the tile, which divides the row; consecutive group columns of one outer box)."""
        p = r * (self.qx << j)
        g0 = self._outer(p // self.w, self.qbox, self.ng) * self.ngx + p % self.w // self.qx
        return g0, g0 + (1 << j)

    def cell_blocks(self, c: np.ndarray) -> np.ndarray:
        """The block of each cell column ``c`` of ``rx`` keys (a block's piece of one row)."""
        p = c * self.rx
        return self._outer(p // self.w, self.kbox, self.nbk) * self.nbx + p % self.w // self.rx

    def pieces(self, cand: routetiles.RunTable):
        """The key tiles of every run, box by box of its blocks: ``(whole, part)``.

        ``whole``: ``(run, first, last)``, key tiles ``[first, last)`` of whole rows (all covered).
        ``part``: ``(run, outer, u0, u1)``, block columns ``[u0, u1)`` of the blocks of outer index ``outer``.
        """
        run, level, prefix, u0, u1 = mixed_radix_boxes(cand.lo, cand.hi, self.nbk)
        last = len(self.shape) - 1
        part = level == last
        w_run, w_first, w_last = [], [], []
        for j in range(last):
            sel = np.flatnonzero(level == j)
            if not len(sel):
                continue
            # a prefix of blocks on the axes before j, blocks [u0, u1) on axis j, every block after it:
            # one range of rows per row of the prefix's boxes
            i, row = self._box_rows(prefix[sel], self.kbox[:j], self.nbk[:j], axes=j)
            s = sel[i]
            n_j, r_j = self.outer[j], self.kbox[j]
            after = math.prod(self.outer[j + 1 :])
            first = (row * n_j + u0[s] * r_j) * after
            end = (row * n_j + np.minimum(u1[s] * r_j, n_j)) * after
            w_run.append(run[s])
            w_first.append(first * self.tk)
            w_last.append(end * self.tk)
        whole = tuple(np.concatenate(a) if a else np.zeros(0, np.int64) for a in (w_run, w_first, w_last))
        return whole, (run[part], prefix[part], u0[part], u1[part])


def mixed_radix_boxes(lo: np.ndarray, hi: np.ndarray, radix: tuple[int, ...]):
    """Index ranges ``[lo, hi)`` (row-major over ``radix``) as boxes: ``(run, level, prefix, u0, u1)``.

    Box ``i`` of range ``run[i]`` holds the indices whose digits before axis ``level[i]`` spell ``prefix[i]``
    (row-major over those axes), whose digit on that axis is in ``[u0[i], u1[i])`` and whose later digits
    are anything: at most two boxes a range per axis (its head and tail at each level, finest first).
    """
    d = len(radix)
    suffix = [math.prod(radix[j + 1 :]) for j in range(d)]
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    idx = np.arange(len(lo), dtype=np.int64)
    out = []

    def emit(sel, a, b, j):
        a, b, chunk = a[sel], b[sel], suffix[j] * radix[j]
        u0 = a % chunk // suffix[j]
        out.append((idx[sel], np.full(len(a), j, np.int64), a // chunk, u0, u0 + (b - a) // suffix[j]))

    for j in range(d - 1, 0, -1):
        # lo and hi are multiples of suffix[j] here; peel what is not a multiple of the next coarser chunk
        chunk = suffix[j - 1]
        up = np.minimum(-(-lo // chunk) * chunk, hi)
        emit((lo % chunk != 0) & (lo < up), lo, up, j)
        lo = np.where(lo % chunk != 0, up, lo)
        down = np.maximum(hi // chunk * chunk, lo)
        emit((hi % chunk != 0) & (down < hi), down, hi, j)
        hi = np.where(hi % chunk != 0, down, hi)
    emit(lo < hi, lo, hi, 0)
    return tuple(np.concatenate(a) for a in zip(*out, strict=True))


def geometry(engine: eng.Engine, node: ir.Node):
    """The :class:`GridGeometry` when the module applies (see the module notes), on a grid whose rows do not
    hold whole tiles a :class:`routepieces.PieceGeometry`, else None."""
    from patterndsl import semantics

    layout = engine.env.layout
    pol = ir.polarities(node)
    if layout is None or len(layout.shape) < 2 or len(pol) != 1:
        return None
    ((prim, signs),) = pol.items()
    among = prim.arg("among")
    block, qblock = prim.arg("block"), prim.arg("qblock")
    qblock = block if qblock is None else qblock
    ctx = engine.ctx
    if (
        len(signs) != 1
        or ir.uses_head(among)
        or ir.is_dynamic(among)
        or not (isinstance(block, tuple) or isinstance(qblock, tuple))
        or not (engine.q.identity and engine.k.identity)
        or engine.q.order is not None
        or engine.k.order is not None
        or ctx.offset != 0
        or ctx.q_len != ctx.kv_len
    ):
        return None
    rank = len(layout.shape)
    qbox = tuple(semantics._per_axis(qblock, rank, "route qblock"))
    kbox = tuple(semantics._per_axis(block, rank, "route block"))
    if layout.shape[-1] % engine.q.block or layout.shape[-1] % engine.k.block:
        from patterndsl.analysis import routepieces

        geo = routepieces.PieceGeometry(engine, prim, qbox, kbox)  # tiles across rows
    else:
        geo = GridGeometry(engine, prim, qbox, kbox)
    # The candidates are listed anyway by every plan of this route (the pairs' one counts its entries from
    # them, routelimit.incidences; the engine keeps them): taken when there are few.
    many = eng.rewrite_for_plan(among) != ir.FULL and geo.n_q * geo.n_k > MAX_CANDIDATE_PAIRS
    if many and len(engine.route_candidates(prim)[0]) > MAX_CANDIDATE_PAIRS:
        return None
    return geo


def candidates(engine: eng.Engine, prim: ir.Prim, geo: GridGeometry) -> routetiles.RunTable:
    """The candidate blocks of every group as runs."""
    if eng.rewrite_for_plan(prim.arg("among")) == ir.FULL:
        group = np.arange(geo.n_q, dtype=np.int64)
        return routetiles.RunTable(group, np.zeros(geo.n_q, np.int64), np.full(geo.n_q, geo.n_k, np.int64), geo.n_k)
    keys = engine.route_candidates(prim)[0]
    a, b = keys // geo.n_k, keys % geo.n_k
    return routetiles._merged(a, b, b + 1, geo.n_k)


class GridSpans:
    """The candidate runs' key tiles (touched, covered, end counts) on the query tiles of their groups:
    the grid form of :class:`routeruns._Spans` (same :meth:`cover` and :meth:`over`).

    A run's blocks of one block row that are not whole grid rows (a *box*, :meth:`GridGeometry.pieces`)
    touch, cover and end in the same key tiles of every grid row the block row spans: those are found per
    box and laid out on the rows last (for the ranges of :meth:`cover`, once per set of boxes alike on a
    shared query tile; for :meth:`over`, only where the cap is passed)."""

    def __init__(self, geo: GridGeometry, cand: routetiles.RunTable, run_open: np.ndarray):
        self.geo, self.cand, self.run_open = geo, cand, run_open
        (self.w_run, self.w_first, self.w_last), part = geo.pieces(cand)
        self.b_run, self.b_outer, self.b_u0, self.b_u1 = part
        bx0, bx1 = geo.bx0, geo.bx1
        # per box, the key tiles of a grid row (0 to tk) it touches and covers whole
        self.b_t = (np.searchsorted(bx1, self.b_u0, "right"), np.searchsorted(bx0, self.b_u1, "left"))
        self.b_f = (np.searchsorted(bx0, self.b_u0, "left"), np.searchsorted(bx1, self.b_u1, "right"))
        digits = np.unravel_index(self.b_outer, geo.nbk[:-1]) if len(geo.outer) else ()
        self.b_rows = np.ones(len(self.b_outer), np.int64)  # grid rows of each box's block row
        for d, box, n in zip(digits, geo.kbox[:-1], geo.outer, strict=True):
            self.b_rows *= np.minimum(d * box + box, n) - d * box
        self.n_outer = math.prod(geo.nbk[:-1])
        self._covers = {}
        self._end_tiles = None
        self._checked = False

    def _rows(self, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(index, base)``: the first key tile of every grid row of the block rows ``outer[index]``."""
        geo = self.geo
        index, row = geo._box_rows(outer, geo.kbox[:-1], geo.nbk[:-1])
        return index, row * geo.tk

    def _on_tiles(self, which: bool | None, b_lo: np.ndarray, b_hi: np.ndarray) -> Steps:
        """Steps over the shared query tiles of the selected runs' groups counting the runs whose whole grid
        rows, or whose boxes' tiles ``[b_lo, b_hi)`` (per grid row), hold each tile."""
        geo, group = self.geo, self.cand.group
        per_group = geo.gt1 - geo.gt0  # shared query tiles of a group column
        if not self._checked:  # (range, shared tile) pairs the ranges stand for, as if listed row by row
            w_pairs = int(per_group[group[self.w_run] % geo.ngx].sum())
            _check(w_pairs + int((self.b_rows * per_group[group[self.b_run] % geo.ngx]).sum()))
            self._checked = True
        w = np.flatnonzero(self._selected(self.w_run, which))
        i, v = geo.shared_rows(group[self.w_run[w]])
        m, lo, hi, weight = [v], [self.w_first[w][i]], [self.w_last[w][i]], [np.ones(len(i), np.int64)]
        b = np.flatnonzero(self._selected(self.b_run, which) & (b_lo < b_hi))
        if not len(b):  # whole grid rows only (among = full)
            return ranges(m[0], lo[0], hi[0], 1, geo.n_shared, geo.nkb)
        j, v = geo.shared_rows(group[self.b_run[b]])
        b = b[j]
        # boxes alike (same shared tile, block row and tiles): one range a grid row, weighted by their number
        radix = geo.tk + 1
        if geo.n_shared * self.n_outer * radix * radix < 1 << 62:
            key, count = _summed(
                ((v * self.n_outer + self.b_outer[b]) * radix + b_lo[b]) * radix + b_hi[b], np.ones(len(b), np.int64)
            )
            key, bhi = np.divmod(key, radix)
            key, blo = np.divmod(key, radix)
            v, outer = np.divmod(key, self.n_outer)
        else:
            outer, blo, bhi, count = self.b_outer[b], b_lo[b], b_hi[b], np.ones(len(b), np.int64)
        k, base = self._rows(outer)
        m.append(v[k])
        lo.append(base + blo[k])
        hi.append(base + bhi[k])
        weight.append(count[k])
        m, lo, hi, weight = (np.concatenate(a) for a in (m, lo, hi, weight))
        return ranges(m, lo, hi, weight, geo.n_shared, geo.nkb)

    def _selected(self, run: np.ndarray, which: bool | None) -> np.ndarray:
        return np.ones(len(run), bool) if which is None else self.run_open[run] == which

    def cover(self, which: bool | None, covered: bool = True):
        """``(touched, covered)`` Steps over the shared query tiles (:meth:`GridGeometry.shared_rows`) of the
        groups' runs (all; open only: True; forced only: False); ``covered=False``: ``(touched, None)``.
        A selection of every run gives the Steps of all of them, the same object."""
        if which is not None and (self.run_open == which).all():
            which = None
        out = []
        for name, ends in (("touched", self.b_t), ("covered", self.b_f))[: 2 if covered else 1]:
            if (which, name) not in self._covers:
                self._covers[which, name] = self._on_tiles(which, *ends)
            out.append(self._covers[which, name])
        return out[0], out[1] if covered else None

    def _ends(self, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(key, blocks)``: the end tiles of the kept runs' boxes (touched, not covered: at most two a box)
        as distinct ``(group * n_outer + block row) * tk + tile of the grid row``, with the group's candidate
        blocks there (summed over its boxes of the block row; the same in every grid row of the block row
        and for every cap: found once for the runs ``keep``)."""
        if self._end_tiles is None or self._end_tiles[0] is not keep:
            geo = self.geo
            er, t = end_tiles(keep[self.b_run], *self.b_t, *self.b_f)
            overlap = np.minimum(self.b_u1[er], geo.bx1[t]) - np.maximum(self.b_u0[er], geo.bx0[t])
            key = (self.cand.group[self.b_run[er]] * self.n_outer + self.b_outer[er]) * geo.tk + t
            self._end_tiles = (keep, *_summed(key, overlap))
        return self._end_tiles[1:]

    def over(self, keep: np.ndarray, cap: np.ndarray) -> Steps:
        """Bool Steps over the shared query tiles: some group of the kept runs has more than ``cap[group]``
        candidate blocks in the tile."""
        geo, g = self.geo, self.cand.group
        nb = geo.nb
        c = cap[g]
        out_g, out_lo, out_hi = [], [], []
        # covered tiles hold nb[t] of the run's blocks: over everywhere (cap below every nb), nowhere
        # (cap at least every nb) or tile by tile; whole grid rows as ranges of tiles, boxes per grid row
        run, f0, f1 = self.w_run, self.w_first, self.w_last
        live = keep[run] & (c[run] < nb.max()) & (f0 < f1)
        whole = live & (c[run] < nb.min())
        out_g.append(g[run[whole]])
        out_lo.append(f0[whole])
        out_hi.append(f1[whole])
        mixed = np.flatnonzero(live & ~whole)
        listed = self._box_over(keep, c, nb, (out_g, out_lo, out_hi))
        _check(int((f1[mixed] - f0[mixed]).sum()) + listed)  # tiles tested one by one, as if listed per row
        if len(mixed):
            at, n = eng.expand_runs(mixed, f0[mixed], f1[mixed])
            hot = nb[n % geo.tk] > c[run[at]]
            out_g.append(g[run[at[hot]]])
            out_lo.append(n[hot])
            out_hi.append(n[hot] + 1)
        if len(self.b_run):  # end tiles of the boxes: touched, not covered
            key, total = self._ends(keep)
            hot = total > cap[key // (self.n_outer * geo.tk)]
            group, rest = np.divmod(key[hot], self.n_outer * geo.tk)
            outer, t = np.divmod(rest, geo.tk)
            k, base = self._rows(outer)
            out_g.append(group[k])
            out_lo.append(base + t[k])
            out_hi.append(base + t[k] + 1)
        group, lo, hi = (np.concatenate(a) for a in (out_g, out_lo, out_hi))
        idx, v = geo.shared_rows(group)
        _check(len(v))
        s = ranges(v, lo[idx], hi[idx], 1, geo.n_shared, geo.nkb)
        return _compact(s.key, (s.value > 0).astype(np.int64), s.width)

    def _box_over(self, keep: np.ndarray, c: np.ndarray, nb: np.ndarray, out) -> int:
        """:meth:`over` on the tiles the kept runs' boxes cover (``c``: each run's cap): the ranges over it
        appended to ``out``; returns the tiles listed one by one, counted per grid row (for the size check)."""
        if not len(self.b_run):
            return 0
        g = self.cand.group
        out_g, out_lo, out_hi = out
        b0, b1 = self.b_f
        b_live = keep[self.b_run] & (c[self.b_run] < nb.max()) & (b0 < b1)
        b_whole = np.flatnonzero(b_live & (c[self.b_run] < nb.min()))
        b_mixed = np.flatnonzero(b_live & (c[self.b_run] >= nb.min()))
        at, t = eng.expand_runs(b_mixed, b0[b_mixed], b1[b_mixed])
        hot = nb[t] > c[self.b_run[at]]
        box = np.concatenate([b_whole, at[hot]])
        lo_t = np.concatenate([b0[b_whole], t[hot]])
        hi_t = np.concatenate([b1[b_whole], t[hot] + 1])
        k, base = self._rows(self.b_outer[box])
        out_g.append(g[self.b_run[box[k]]])
        out_lo.append(base + lo_t[k])
        out_hi.append(base + hi_t[k])
        return int((self.b_rows[b_mixed] * (b1[b_mixed] - b0[b_mixed])).sum())


def read_at(values: list[np.ndarray], index: np.ndarray) -> list[np.ndarray]:
    """``[v[index] for v in values]``, an array given twice read once, a constant one a read-only broadcast
    (the route's counts on the shared segments, read on every segment: the forced ones are often none)."""
    found = {}
    for v in values:
        if id(v) not in found:
            found[id(v)] = np.broadcast_to(v[0], len(index)) if len(v) and v.min() == v.max() else v[index]
    return [found[id(v)] for v in values]


def classify(engine: eng.Engine, node: ir.Node):
    """:func:`routeruns.classify` with the grid geometry, or None when it does not apply (or its runs
    would need more than :data:`MAX_ENTRIES` entries)."""
    from patterndsl.analysis import routeruns

    geo = geometry(engine, node)
    if geo is None:
        return None
    # Tiles where a static part and the route are both partial are evaluated element by element;
    # past MAX_ELEMENTS the other plans take over (the pair-by-pair one is refused up front when
    # it cannot fit), rather than a plan that evaluates for minutes.
    tally = engine.tally
    before = dataclasses.replace(tally)
    tally.budget = MAX_ELEMENTS if before.budget is None else min(before.budget, MAX_ELEMENTS)
    try:
        out = routeruns.classify(engine, node, geo)
    except (TooMany, eng.OverBudget) as err:
        for field in dataclasses.fields(tally):
            setattr(tally, field.name, getattr(before, field.name))
        if isinstance(err, eng.OverBudget) and before.budget is not None and before.budget <= MAX_ELEMENTS:
            raise  # the caller's own budget ran out
        return None
    if before.budget is None:
        tally.budget = None
    else:
        tally.budget = before.budget - (min(before.budget, MAX_ELEMENTS) - tally.budget)
    return out


def _check(entries: int) -> None:
    if entries > MAX_ENTRIES:
        raise TooMany


class TooMany(Exception):
    """A grid route's runs would need more than :data:`MAX_ENTRIES` entries: planned the other way."""
