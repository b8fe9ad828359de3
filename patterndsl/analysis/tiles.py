"""Stage 4 (block plan), token layout: which positions each tile holds, as small products of progressions.

Comes in: a token order described as segments (each a product of per-axis
arithmetic progressions over grid coordinates, or over 1-D positions when the
pattern has no layout), the tile size and the end-alignment offset. Goes out:
a :class:`Side` per side (queries or keys): the permutation (new position ->
original index) and, for every tile, its *pieces* — the tile's positions as a
union of a few per-axis products of progressions. The classifiers in
:mod:`patterndsl.analysis.classify` reason on these pieces instead of on
positions, which is what keeps planning free of any L x L (or even L-sized
per-pair) work.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from patterndsl.primitives.common import distinct_rows

#: A segment is ``(a, s, n)``: per-axis tuples; its positions are the row-major product
#: over axes of ``a[x] + s[x] * t`` for ``0 <= t < n[x]``.
Segment = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


#: A tile whose bounding box holds more than this many times its positions is searched piece by piece
#: (:meth:`Side.boxes`).
LOOSE = 2


@dataclass
class Side:
    """The tiles of one side (queries or keys) in a chosen token order.

    Attributes:
        length: number of tokens on this side.
        block: tile size along this side.
        offset: position of index 0 (``Lk - Lq`` for queries, 0 for keys).
        extents: grid extents (one entry, a large bound, for 1-D positions).
        strides: row-major strides of the axes (``(1,)`` for 1-D).
        order: int64 ``[length]`` new position -> original index; None for the identity order,
            which is never materialised (a plan's memory follows its tiles, not ``L``).
        ptr: int64 ``[n_tiles + 1]``: tile ``t`` owns pieces ``ptr[t]:ptr[t+1]``.
        tile: int64 ``[P]`` tile of each piece.
        a, s, n: int64 ``[P, D]`` per-axis progressions of each piece.
        identity: True when the order is the identity (tiles are plain index ranges).
        starts: int64 ``[n_tiles + 1]``: tile ``t`` holds ``order[starts[t]:starts[t+1]]``.
    """

    length: int
    block: int
    offset: int
    extents: tuple[int, ...]
    strides: tuple[int, ...]
    order: np.ndarray | None
    ptr: np.ndarray
    tile: np.ndarray
    a: np.ndarray
    s: np.ndarray
    n: np.ndarray
    identity: bool
    starts: np.ndarray

    @property
    def n_tiles(self) -> int:
        return len(self.starts) - 1

    def tile_indices(self, tiles: np.ndarray) -> np.ndarray:
        """Original indices of ``tiles`` as a padded int64 ``[T, width]`` matrix (-1 = padding)."""
        lo, hi = self.starts[tiles], self.starts[tiles + 1]
        width = int((hi - lo).max()) if len(tiles) else 0
        idx = lo[:, None] + np.arange(width, dtype=np.int64)[None, :]
        valid = idx < hi[:, None]
        if self.order is None:
            return np.where(valid, idx, -1)
        return np.where(valid, self.order[np.minimum(idx, max(len(self.order) - 1, 0))], -1)

    def take(self, rows: np.ndarray) -> Side:
        """The tiles ``rows`` (sorted) alone, as a side of their own (not an identity order: its indices are listed).

        For estimates on a sample of tiles (the planner's sampled candidate orders): every tile
        keeps its pieces and its token indices.
        """
        count = np.diff(self.ptr)[rows]
        pieces = np.repeat(self.ptr[rows] - np.concatenate([[0], np.cumsum(count)[:-1]]), count)
        pieces = pieces + np.arange(int(count.sum()), dtype=np.int64)
        sizes = np.diff(self.starts)[rows]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        idx = self.tile_indices(rows)
        order = idx[idx >= 0]
        ptr = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        tile = np.repeat(np.arange(len(rows), dtype=np.int64), count)
        return Side(
            int(starts[-1]), self.block, self.offset, self.extents, self.strides, order, ptr, tile,
            self.a[pieces], self.s[pieces], self.n[pieces], False, starts,
        )  # fmt: skip

    @functools.cached_property
    def largest(self) -> np.ndarray:
        """Per tile, the index of its piece holding the most positions (the first such)."""
        size = self.n.prod(1)
        if self.single_piece:
            return np.arange(self.n_tiles, dtype=np.int64)
        # every tile holds a piece: the first piece of each tile whose size is its tile's largest
        top = np.maximum.reduceat(size, self.ptr[:-1])
        at = np.where(size == top[self.tile], np.arange(len(size), dtype=np.int64), len(size))
        return np.minimum.reduceat(at, self.ptr[:-1])

    @property
    def single_piece(self) -> bool:
        return len(self.tile) == self.n_tiles

    def piece_view(self, idx: np.ndarray) -> Pieces:
        """Attributes of pieces ``idx`` (an int array), for the classifiers."""
        return Pieces(self, idx)

    def below(self, limit: int) -> np.ndarray:
        """Per piece, how many of its positions are below ``limit`` (flattened row-major positions).

        A piece's positions increase with its index vector in lexicographic order (a piece lies in the
        grid: an axis's step exceeds the span of the axes after it), so along each axis at most one
        index holds positions on both sides of the limit: the indices before it count whole, and the
        count goes on inside that one (``sink``, ``global`` on a grid: first rows whole, one row in part).
        """
        w = np.asarray(self.strides, np.int64)
        step = np.where(self.n > 1, self.s, 1) * w  # [P, D] (one index: any step, never 0)
        span = np.zeros_like(step)  # positions an index of axis x spans through the later axes
        for x in range(step.shape[1] - 2, -1, -1):
            span[:, x] = span[:, x + 1] + step[:, x + 1] * np.maximum(self.n[:, x + 1] - 1, 0)
        inner = np.ones_like(step)
        for x in range(step.shape[1] - 2, -1, -1):
            inner[:, x] = inner[:, x + 1] * self.n[:, x + 1]
        rest = limit - (self.a * w).sum(1)  # the limit relative to the piece's first position
        out = np.zeros(len(self.a), np.int64)
        live = rest > 0
        for x in range(step.shape[1]):
            st = step[:, x]
            # indices whose positions all lie below: t * step + span < rest
            whole = np.clip(-np.floor_divide(-(rest - span[:, x]), st), 0, self.n[:, x])
            out += np.where(live, whole * inner[:, x], 0)
            # the next index, when it starts below the limit, holds some
            part = live & (whole < self.n[:, x]) & (whole * st < rest)
            rest = np.where(part, rest - whole * st, 0)
            live = part
        return out

    def piece_bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per piece: min and max flattened position, and per-axis min/max coordinates ``[P, D]``
        (the tile of piece ``p`` is ``tile[p]``). A tile of several pieces (a tile across grid rows
        or boxes) is their union, often far smaller than the box bounding them all."""
        w = np.asarray(self.strides, dtype=np.int64)
        last = self.a + self.s * (self.n - 1)
        return (self.a * w).sum(1), (last * w).sum(1), self.a, last

    def boxes(self, group: np.ndarray | None = None):
        """The tiles as boxes for candidate searches: a tile whose bounding box holds at most
        :data:`LOOSE` times its positions is that box, any other tile its pieces' boxes.

        ``group``: one number per piece (a dilation group); a tile whose pieces differ in it is cut
        into its pieces too. Returns ``(tile, lo, hi, alo, ahi, group)`` per box (flattened and per-axis
        bounds; ``group`` None when not given) and whether some tile is cut (its boxes may find the
        same key tile twice).
        """
        tlo, thi, talo, tahi = self.tile_bounds()
        plo, phi, palo, pahi = self.piece_bounds()
        if self.single_piece:
            return (self.tile, plo, phi, palo, pahi, group), False
        loose = (tahi - talo + 1).prod(1) > LOOSE * np.diff(self.starts)
        if group is not None:
            gmin = np.minimum.reduceat(group, self.ptr[:-1]) if len(group) else group
            gmax = np.maximum.reduceat(group, self.ptr[:-1]) if len(group) else group
            loose |= gmin != gmax
        whole = np.flatnonzero(~loose)
        cut = np.flatnonzero(loose[self.tile])
        out = (
            np.concatenate([whole, self.tile[cut]]),
            np.concatenate([tlo[whole], plo[cut]]),
            np.concatenate([thi[whole], phi[cut]]),
            np.concatenate([talo[whole], palo[cut]]),
            np.concatenate([tahi[whole], pahi[cut]]),
            None if group is None else np.concatenate([group[self.ptr[whole]], group[cut]]),
        )
        return out, bool(loose.any())

    def tile_bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per tile: min and max flattened position, and per-axis min/max coordinates ``[T, D]``.

        Computed once per side (read, never written): a planner's candidate order is sampled and
        then planned on the same sides, each by an engine of its own.
        """
        return self._tile_bounds

    @functools.cached_property
    def _tile_bounds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        w = np.asarray(self.strides, dtype=np.int64)
        last = self.a + self.s * (self.n - 1)
        fmin = (self.a * w).sum(1)
        fmax = (last * w).sum(1)
        nt = self.n_tiles
        if self.single_piece:
            return fmin, fmax, self.a, last
        lo = np.full(nt, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(nt, np.iinfo(np.int64).min, dtype=np.int64)
        np.minimum.at(lo, self.tile, fmin)
        np.maximum.at(hi, self.tile, fmax)
        d = self.a.shape[1]
        alo = np.full((nt, d), np.iinfo(np.int64).max, dtype=np.int64)
        ahi = np.full((nt, d), np.iinfo(np.int64).min, dtype=np.int64)
        np.minimum.at(alo, self.tile, self.a)
        np.maximum.at(ahi, self.tile, last)
        return lo, hi, alo, ahi


class Pieces:
    """Vectorised attributes of a selection of pieces of one side.

    The flattened-progression view (``fa``, ``fs``, ``fn``, ``isap``) of grid pieces is built
    on first use: most rules read only the per-axis ends.
    """

    def __init__(self, side: Side, idx: np.ndarray):
        w, ext = np.asarray(side.strides, dtype=np.int64), np.asarray(side.extents, dtype=np.int64)
        # rows gathered by ``take`` (indexing a 2-D array by an index array was 6x slower at a million pieces)
        self._set(side.a.take(idx, 0), side.s.take(idx, 0), side.n.take(idx, 0), w, ext)

    def _set(self, a, s, n, w, ext) -> None:
        self.a, self.s, self.n = a, s, n
        self._w, self._ext = w, ext
        if self.a.shape[1] == 1:
            # 1-D positions: every piece is a progression already.
            self.fmin = self.fa = self.a[:, 0]
            self.fmax = self.last[:, 0]
            self.isap = np.ones(len(self.a), dtype=bool)
            self.fs, self.fn = self.s[:, 0], self.n[:, 0]

    @classmethod
    def of(cls, a: np.ndarray, s: np.ndarray, n: np.ndarray, side) -> Pieces:
        """The pieces ``a + s * t`` (``t < n``, ``[B, D]`` each, read, never written) of ``side``'s layout."""
        out = object.__new__(cls)
        w, ext = np.asarray(side.strides, dtype=np.int64), np.asarray(side.extents, dtype=np.int64)
        out._set(a, s, n, w, ext)
        return out

    def take(self, sel: np.ndarray) -> Pieces:
        """The pieces at positions ``sel`` of this selection."""
        out = object.__new__(Pieces)
        out._set(self.a[sel], self.s[sel], self.n[sel], self._w, self._ext)
        return out

    @functools.cached_property
    def last(self) -> np.ndarray:
        """Per-axis last coordinates (built on first use: the neighborhood rule reads the ends its own way)."""
        return self.a + self.s * (self.n - 1)

    @functools.cached_property
    def fmin(self) -> np.ndarray:
        return (self.a * self._w).sum(1)

    @functools.cached_property
    def fmax(self) -> np.ndarray:
        return (self.last * self._w).sum(1)

    @functools.cached_property
    def fa(self) -> np.ndarray:
        return self.fmin

    @functools.cached_property
    def _flat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The flattened positions form a progression (fa + fs * t, t < fn) when at most one
        # axis varies, or when the axes after the first varying one are complete and it has
        # step 1 (then the positions are one contiguous range).
        varying = self.n > 1
        count = varying.sum(1)
        first = np.where(count > 0, np.argmax(varying, axis=1), 0)
        complete = (self.a == 0) & (self.s == 1) & (self.n == self._ext)
        after = np.arange(self.a.shape[1])[None, :] > first[:, None]
        tail_ok = np.where(after, complete, True).all(1)
        rows = np.arange(len(first))
        step_first = self.s[rows, first]
        contiguous = tail_ok & (step_first == 1)
        single = count <= 1
        fs = np.where(single & (count == 1), step_first * self._w[first], 1)
        fn = np.where(single, self.n[rows, first], self.fmax - self.fmin + 1)
        return (count <= 1) | contiguous, fs, fn

    @functools.cached_property
    def isap(self) -> np.ndarray:
        return self._flat[0]

    @functools.cached_property
    def fs(self) -> np.ndarray:
        return self._flat[1]

    @functools.cached_property
    def fn(self) -> np.ndarray:
        return self._flat[2]


def _cut_1d(segments: list[Segment], block: int, offset: int, identity: bool):
    """Pieces of 1-axis segments laid end to end, cut at tile boundaries (all segments at once).

    Returns ``(tile, a, s, n, order, covered)``: the pieces in segment order, the new position
    -> original index map (None for the identity) and the positions covered.
    """
    a0, s0, n0 = (np.asarray([seg[f][0] for seg in segments], np.int64) for f in range(3))
    live = n0 > 0
    a0, s0, n0 = a0[live], s0[live], n0[live]
    r0 = np.cumsum(n0) - n0
    t0, t1 = r0 // block, (r0 + n0 - 1) // block
    seg = np.repeat(np.arange(len(n0)), t1 - t0 + 1)
    tile = (
        t0[seg] + np.arange(len(seg), dtype=np.int64) - np.repeat(np.cumsum(t1 - t0 + 1) - (t1 - t0 + 1), t1 - t0 + 1)
    )
    lo = np.maximum(r0[seg], tile * block) - r0[seg]
    hi = np.minimum(r0[seg] + n0[seg], (tile + 1) * block) - r0[seg]
    order = None
    if not identity:
        local = np.arange(int(n0.sum()), dtype=np.int64) - np.repeat(r0, n0)
        order = np.repeat(a0, n0) + np.repeat(s0, n0) * local - offset
    pieces = ((a0[seg] + s0[seg] * lo)[:, None], s0[seg][:, None], (hi - lo)[:, None])
    return tile, *pieces, order, int(n0.sum())


def range_boxes(shape: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Split the row-major offsets ``[lo[i], hi[i])`` of boxes of shape ``shape[i]`` into sub-boxes, all at once.

    Args:
        shape: int64 ``[R, D]``, each range's box shape (or ``[1, D]``, one shape for all).
        lo, hi: int64 ``[R]``, the ranges' first and past-the-end offsets (an empty range gives no box).

    Returns:
        ``(row, start, count)``: per sub-box its range, and its per-axis start and extent (``[B, D]``),
        sorted by range then by first offset. A range gives at most ``2 * D - 1`` sub-boxes: the
        end of its first row at every level, one box of whole rows, the start of its last row at
        every level (the decomposition a recursion over the axes gives, level by level here).
    """
    shape = np.asarray(shape, np.int64)
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    r, d = len(lo), shape.shape[1]
    if len(shape) != r:
        shape = np.broadcast_to(shape, (r, d))
    # inner[:, x]: offsets per step of axis x (the product of the later extents)
    inner = np.ones((r, d), np.int64)
    for x in range(d - 2, -1, -1):
        inner[:, x] = inner[:, x + 1] * shape[:, x + 1]
    out_row, out_start, out_count = [], [], []

    def emit(rows, prefix, x, first, extent):
        start = prefix.copy()
        start[:, x] = first
        count = np.ones((len(rows), d), np.int64)
        count[:, x] = extent
        count[:, x + 1 :] = shape[rows, x + 1 :]
        out_row.append(rows)
        out_start.append(start)
        out_count.append(count)

    live = lo < hi
    rows, a_lo, a_hi = np.flatnonzero(live), lo[live], hi[live]
    prefix = np.zeros((len(rows), d), np.int64)
    for x in range(d):
        if x == d - 1:
            emit(rows, prefix, x, a_lo, a_hi - a_lo)
            break
        a, r1 = np.divmod(a_lo, inner[rows, x])
        b, r2 = np.divmod(a_hi, inner[rows, x])
        same = a == b
        head = ~same & (r1 > 0)
        mid_first = a + head
        mid = ~same & (b > mid_first)
        tail = ~same & (r2 > 0)
        emit(rows[mid], prefix[mid], x, mid_first[mid], (b - mid_first)[mid])
        # the next level: a range inside one row (same), the end of the first row (head), the start of the last (tail)
        nxt = [(same, a, r1, r2), (head, a, r1, inner[rows, x]), (tail, b, 0 * r2, r2)]
        rows_n, prefix_n, lo_n, hi_n = [], [], [], []
        for sel, at, l_, h_ in nxt:
            p = prefix[sel]
            p[:, x] = at[sel]
            rows_n.append(rows[sel])
            prefix_n.append(p)
            lo_n.append(l_[sel])
            hi_n.append(h_[sel])
        rows, prefix, a_lo, a_hi = (np.concatenate(v) for v in (rows_n, prefix_n, lo_n, hi_n))
    row = np.concatenate(out_row)
    start = np.concatenate(out_start).reshape(-1, d)
    count = np.concatenate(out_count).reshape(-1, d)
    first = (start * inner[row]).sum(1)
    order = np.lexsort((first, row))
    return row[order], start[order], count[order]


def _cut_segments(a: np.ndarray, s: np.ndarray, n: np.ndarray, block: int):
    """Pieces of grid segments (``[K, D]`` each) laid end to end, cut at tile boundaries (all at once).

    Returns ``(tile, a, s, n)``: every tile's pieces, sorted by tile, then segment, then position in it.
    """
    size = n.prod(1)
    live = np.flatnonzero(size > 0)
    a, s, n, size = a[live], s[live], n[live], size[live]
    r0 = np.cumsum(size) - size
    t0, t1 = r0 // block, (r0 + size - 1) // block
    cnt = t1 - t0 + 1
    seg = np.repeat(np.arange(len(size), dtype=np.int64), cnt)
    tile = t0[seg] + np.arange(len(seg), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    lo = np.maximum(r0[seg], tile * block) - r0[seg]
    hi = np.minimum(r0[seg] + size[seg], (tile + 1) * block) - r0[seg]
    # sorted by (segment, tile), then offset: by tile too, the segments lying end to end
    row, start, count = range_boxes(n[seg], lo, hi)
    owner = seg[row]
    return tile[row], a[owner] + s[owner] * start, s[owner], count


#: Most distinct segment shapes :func:`_positions` lays out one shape at a time.
_MAX_SHAPES = 64
#: Most runs of consecutive segments of one shape :func:`_positions` writes as slices (more are scattered).
_MAX_RUNS = 4


def _positions(a: np.ndarray, s: np.ndarray, n: np.ndarray, strides: tuple[int, ...]) -> np.ndarray:
    """Flattened positions of grid segments (``[K, D]`` each), each in row-major order, end to end."""
    size = n.prod(1)
    total = int(size.sum())
    first = np.cumsum(size) - size
    w = np.asarray(strides, np.int64)
    shapes, which = distinct_rows(np.concatenate([n, s], 1))
    d = n.shape[1]
    pos = np.empty(total, np.int64)
    if len(shapes) <= _MAX_SHAPES:
        # segments of one shape and step: one start each plus the same offsets, built axis by axis
        # (an outer sum, not per-position coordinates: a box order of 4 boxes took 70 ms at a million)
        for x, shape in enumerate(shapes):
            rows = np.flatnonzero(which == x)
            ext = tuple(int(e) for e in shape[:d])
            count = math.prod(ext)
            if not count:
                continue
            inner = np.zeros(1, np.int64)
            for axis in range(d):
                step = np.arange(ext[axis], dtype=np.int64) * int(shape[d + axis] * w[axis])
                inner = (inner[:, None] + step[None, :]).reshape(-1)
            start = (a[rows] * w).sum(1)
            # a few runs of consecutive segments lie end to end: written as slices, not scattered (many
            # short runs, the boxes cut at the edges, are scattered at once: a loop over them cost more)
            cut = np.flatnonzero(np.diff(rows) != 1) + 1
            if len(cut) >= _MAX_RUNS:
                at = first[rows][:, None] + np.arange(count, dtype=np.int64)[None, :]
                pos[at] = start[:, None] + inner[None, :]
                continue
            for lo, hi in zip([0, *cut.tolist()], [*cut.tolist(), len(rows)], strict=True):
                f0 = int(first[rows[lo]])
                block = pos[f0 : f0 + (hi - lo) * count].reshape(hi - lo, count)
                np.add(start[lo:hi, None], inner[None, :], out=block)
        return pos
    seg = np.repeat(np.arange(len(size), dtype=np.int64), size)
    local = np.arange(total, dtype=np.int64) - np.repeat(first, size)
    pos[:] = 0
    for x in range(d - 1, -1, -1):
        ext = n[seg, x]
        pos += (a[seg, x] + s[seg, x] * (local % ext)) * w[x]
        local //= ext
    return pos


def build_side(
    segments: list[Segment],
    length: int,
    block: int,
    offset: int,
    extents: tuple[int, ...],
    identity: bool,
) -> Side:
    """Lay out one side: the permutation and every tile's pieces.

    Args:
        segments: the token order, a list of product segments covering every position once.
        length: tokens on this side.
        block: tile size.
        offset: position of index 0.
        extents: grid extents (``(offset + length,)`` for 1-D).
        identity: whether the segments spell the identity order.

    Returns:
        A :class:`Side`.
    """
    d = len(extents)
    strides = tuple(int(np.prod(extents[x + 1 :])) for x in range(d))
    arrays = getattr(segments, "arrays", None)
    if d > 1 and arrays is not None and len(segments) and (arrays[2].prod(1) == block).all():
        return _one_tile_per_segment(arrays, length, block, offset, extents, strides, identity)
    if d > 1 and segments and all(math.prod(seg[2]) == block for seg in segments):
        arrays = tuple(np.asarray([seg[f] for seg in segments], np.int64) for f in range(3))
        return _one_tile_per_segment(arrays, length, block, offset, extents, strides, identity)
    if d == 1:
        tile, a, s, n, order, r0 = _cut_1d(segments, block, offset, identity)
    else:
        if arrays is None:
            arrays = tuple(np.asarray([seg[f] for seg in segments], np.int64).reshape(-1, d) for f in range(3))
        tile, a, s, n = _cut_segments(*arrays, block)
        r0 = int(arrays[2].prod(1).sum())
        order = None if identity else _positions(*arrays, strides) - offset
    if r0 != length:
        raise AssertionError(f"segments cover {r0} positions, expected {length}")
    # 1-D pieces are produced tile by tile within a segment; sort so a tile's pieces are adjacent.
    if d == 1 and len(segments) > 1:
        srt = np.argsort(tile, kind="stable")
        tile, a, s, n = tile[srt], a[srt], s[srt], n[srt]
    nt = -(-length // block)
    ptr = np.zeros(nt + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(tile, minlength=nt))
    starts = np.minimum(np.arange(nt + 1, dtype=np.int64) * block, length)
    return Side(length, block, offset, extents, strides, order, ptr, tile, a, s, n, identity, starts)


def _one_tile_per_segment(arrays, length, block, offset, extents, strides, identity) -> Side:
    # Grid boxes of one tile each (the box orders of neighborhoods): every segment is one tile's
    # one piece, laid out with array operations instead of a loop over segments.
    a, s, n = arrays
    nt = len(a)
    if nt * block != length:
        raise AssertionError(f"segments cover {nt * block} positions, expected {length}")
    order = None
    if not identity:
        order = np.empty((nt, block), np.int64)
        w = np.asarray(strides, np.int64)
        # segments of one shape and step at a time: their positions are one start each plus the
        # same offsets (a [tiles, block] sum, no per-axis temporaries)
        d = n.shape[1]
        shapes, which = distinct_rows(np.concatenate([n, s], 1))
        for x, shape in enumerate(shapes):
            rows = np.flatnonzero(which == x)
            coords = np.stack(np.unravel_index(np.arange(block), tuple(int(e) for e in shape[:d])), 1)
            inner = (shape[d:] * coords * w).sum(1)
            order[rows] = (a[rows] * w).sum(1)[:, None] + (inner - offset)[None, :]
        order = order.reshape(-1)
    tile = np.arange(nt, dtype=np.int64)
    starts = np.arange(nt + 1, dtype=np.int64) * block
    return Side(
        length,
        block,
        offset,
        extents,
        strides,
        order,
        np.arange(nt + 1, dtype=np.int64),
        tile,
        a,
        s,
        n,
        identity,
        starts,
    )


def identity_segments(length: int, offset: int, extents: tuple[int, ...]) -> list[Segment]:
    """The identity order: one segment (the whole grid, or the position range in 1-D)."""
    if len(extents) == 1:
        return [((offset,), (1,), (length,))]
    return [((0,) * len(extents), (1,) * len(extents), tuple(extents))]


def class_segments(length: int, offset: int, modulus: int) -> list[Segment]:
    """1-D order grouping positions by ``position % modulus`` (then by position)."""
    out = []
    for c in range(modulus):
        first = offset + ((c - offset) % modulus)
        end = offset + length
        count = max(0, -(-(end - first) // modulus))
        out.append(((first,), (modulus,), (count,)))
    return out


class SegmentList(list):
    """Segments (a list of :data:`Segment`) that also hold them as int64 ``[count, D]`` arrays
    ``arrays = (a, s, n)``: :func:`build_side` reads those instead of converting the tuples back."""

    arrays: tuple[np.ndarray, np.ndarray, np.ndarray]


def box_segments(extents: tuple[int, ...], dilation: tuple[int, ...], box: tuple[int, ...]) -> list[Segment]:
    """Grid order: per dilation group (residues per axis), the group's sub-grid cut into boxes.

    Args:
        extents: grid extents.
        dilation: per-axis dilation (1 = no grouping on that axis).
        box: per-axis box size in group coordinates.

    Returns:
        Segments, one per (group, box): first every whole box (groups row-major, boxes row-major inside
        a group), then the boxes cut short at the grid's edges, in the same order. Whole boxes of one
        tile each then stay one tile each on a grid whose extents the boxes do not divide (edge boxes
        in between shifted every later tile off its box: two or three pieces a tile, on 999 x 999
        five times the plan time).
    """
    out = SegmentList()
    d = len(extents)
    groups = np.stack(np.meshgrid(*[np.arange(x) for x in dilation], indexing="ij"), -1).reshape(-1, d)
    starts, sizes = [], []
    for g in groups.tolist():
        m = [-(-(extents[x] - g[x]) // dilation[x]) for x in range(d)]
        counts = [-(-m[x] // box[x]) for x in range(d)]
        # every box of the group at once: row-major box indices, per axis start and count
        idx = np.stack(np.unravel_index(np.arange(int(np.prod(counts))), counts), 1) * np.asarray(box)
        a = np.asarray(g) + np.asarray(dilation) * idx
        n = np.minimum(np.asarray(box), np.asarray(m) - idx)
        step = tuple(dilation)
        out += [(tuple(sa), step, tuple(sn)) for sa, sn in zip(a.tolist(), n.tolist(), strict=True)]
        starts.append(a.astype(np.int64))
        sizes.append(n.astype(np.int64))
    a = np.concatenate(starts) if starts else np.zeros((0, d), np.int64)
    n = np.concatenate(sizes) if sizes else np.zeros((0, d), np.int64)
    edge = (n != np.asarray(box, np.int64)).any(1)
    if edge.any():
        first = np.concatenate([np.flatnonzero(~edge), np.flatnonzero(edge)])
        a, n = a[first], n[first]
        listed = SegmentList(out[i] for i in first.tolist())
        out = listed
    out.arrays = (a, np.broadcast_to(np.asarray(dilation, np.int64), a.shape).copy(), n)
    return out
