"""Stage 4 (block plan), grid candidates: the key tiles whose per-axis bounds meet per-axis ranges.

Comes in: every key tile's per-axis bounds ``[kalo, kahi]`` (a box in grid coordinates) and, per
query tile, the per-axis range of keys it may reach (a neighborhood's window, HaloNet's block
with its halo). Goes out: the sorted keys ``m * n_key_tiles + n`` of the pairs whose boxes meet.

The key tiles are binned into cells of the largest tile extent on each axis, so a tile starting
in cell ``c`` ends in cell ``c`` or ``c + 1``: the tiles meeting a range start in the product of
the range's cells (one more before it on each axis), and with the tiles sorted by cell (row-major,
last axis fastest) the tiles of a run of cells on the last axis are one contiguous slice. The
work follows the tiles tested, a small multiple of the tiles found (identity order or boxes of
a neighborhood order), never the query tiles times every key tile of a band of rows.
"""

from __future__ import annotations

import math

import numpy as np

#: (query, key) pairs tested at a time: bounds the temporaries (a few int64 arrays per pair).
_CHUNK = 1 << 20
#: More cells than this many times the key tiles (sparse, unevenly sized tiles): not binned.
_MAX_CELLS_PER_TILE = 8
#: Cells are as long as this quantile of the tiles' extents on each axis, when that is at most half their
#: longest extent there; the longer tiles are binned apart in cells of their own.
_WIDE_QUANTILE = 95


class Cells:
    """Key tiles binned by the cell of their first position on each axis.

    Args:
        kalo, kahi: int64 ``[N, D]`` per-axis bounds of the key tiles (inclusive).
    """

    def __init__(self, kalo: np.ndarray, kahi: np.ndarray, split: bool = True):
        self.kalo, self.kahi = kalo, kahi
        # (tiles binned in short cells, the long ones): each a Cells and the indices of its tiles
        self.parts: list[tuple[Cells, np.ndarray]] | None = self._split(kalo, kahi) if split else None
        if self.parts is not None:
            self.usable = True
            return
        d = kalo.shape[1]
        if len(kalo):
            self.size = np.maximum((kahi - kalo).max(0) + 1, 1)
            self.base = kalo.min(0)
            cell = (kalo - self.base) // self.size
            self.count = cell.max(0) + 1
        else:
            self.size = self.count = np.ones(d, np.int64)
            self.base = np.zeros(d, np.int64)
            cell = np.zeros((0, d), np.int64)
        self.n_cells = math.prod(int(c) for c in self.count)
        self.usable = self.n_cells <= _MAX_CELLS_PER_TILE * max(len(kalo), 1) + 4096
        if not self.usable:
            return
        self.stride = np.ones(d, np.int64)
        for x in range(d - 2, -1, -1):
            self.stride[x] = self.stride[x + 1] * self.count[x + 1]
        linear = cell @ self.stride
        self.order = np.argsort(linear, kind="stable")
        self.ptr = np.zeros(self.n_cells + 1, np.int64)
        np.cumsum(np.bincount(linear, minlength=self.n_cells), out=self.ptr[1:])

    @staticmethod
    def _split(kalo: np.ndarray, kahi: np.ndarray) -> list[tuple[Cells, np.ndarray]] | None:
        # The tiles within the quantile's extents on every axis, and the others; None when no axis's
        # quantile is at most half the longest extent, or when either part could not be binned.
        if len(kalo) < 2:
            return None
        extent = kahi - kalo + 1
        size = np.percentile(extent, _WIDE_QUANTILE, axis=0, method="higher").astype(np.int64)
        if not (2 * size <= extent.max(0)).any():
            return None
        short = (extent <= size).all(1)
        if short.all() or not short.any():
            return None
        # the short tiles in cells of the quantile's size; the long ones split again by their own extents
        parts = []
        for sel, again in ((np.flatnonzero(short), False), (np.flatnonzero(~short), True)):
            cells = Cells(kalo[sel], kahi[sel], split=again)
            if not cells.usable:
                return None
            parts.append((cells, sel))
        return parts

    def _cell_ranges(self, alo: np.ndarray, ahi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Per query and axis, the cells a meeting tile may start in: one cell before the range's
        # first (a tile is at most one cell long), clipped to the grid of cells; empty when none.
        c0 = np.maximum((alo - self.base) // self.size - 1, 0)
        c1 = np.minimum((ahi - self.base) // self.size, self.count - 1)
        return c0, c1

    def meeting(self, alo: np.ndarray, ahi: np.ndarray, rows: np.ndarray, cols: np.ndarray, nkb: int) -> np.ndarray:
        """Sorted keys ``rows[i] * nkb + cols[t]`` of the key tiles ``t`` meeting ``[alo[i], ahi[i]]`` on every axis."""
        if not len(alo) or not len(self.kalo):
            return np.zeros(0, np.int64)
        if self.parts is not None:
            # no tile is in both parts: no key is found twice
            keys = np.concatenate([cells.meeting(alo, ahi, rows, cols[sel], nkb) for cells, sel in self.parts])
            return np.sort(keys)
        c0, c1 = self._cell_ranges(alo, ahi)
        span = np.maximum(c1 - c0 + 1, 0)
        d = alo.shape[1]
        # runs of cells: one per query and combination of cells on the axes but the last
        outer = span[:, :-1].prod(1) if d > 1 else np.ones(len(alo), np.int64)
        q = np.repeat(np.arange(len(alo), dtype=np.int64), outer)
        local = np.arange(len(q), dtype=np.int64) - np.repeat(np.cumsum(outer) - outer, outer)
        first = np.zeros(len(q), np.int64)
        for x in range(d - 2, -1, -1):
            sx = span[q, x]
            first += (c0[q, x] + local % np.maximum(sx, 1)) * self.stride[x]
            local //= np.maximum(sx, 1)
        first += c0[q, d - 1]
        inner = span[q, d - 1]
        first = np.where(inner > 0, first, 0)
        last = first + inner
        lo, hi = self.ptr[first], self.ptr[last]
        tested = np.cumsum(hi - lo)
        klo_t, khi_t = np.ascontiguousarray(self.kalo.T), np.ascontiguousarray(self.kahi.T)
        alo_t, ahi_t = np.ascontiguousarray(alo.T), np.ascontiguousarray(ahi.T)
        found, r0 = [], 0
        while r0 < len(q):
            before = int(tested[r0 - 1]) if r0 else 0
            r1 = max(r0 + 1, int(np.searchsorted(tested, before + _CHUNK, "right")))
            run = slice(r0, r1)
            counts = hi[run] - lo[run]
            total = int(counts.sum())
            i = np.repeat(q[run], counts)
            pos = np.repeat(lo[run] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            t = self.order[pos + np.arange(total, dtype=np.int64)]
            keep = np.ones(total, bool)
            for x in range(d):
                # one axis's bounds as contiguous rows, gathered by ``take`` (a column of a 2-D array
                # gathered by index arrays was most of the candidates' time at a million tokens)
                keep &= (khi_t[x].take(t) >= alo_t[x].take(i)) & (klo_t[x].take(t) <= ahi_t[x].take(i))
            found.append(rows[i[keep]] * nkb + cols[t[keep]])
            r0 = r1
        keys = np.concatenate(found) if found else np.zeros(0, np.int64)
        if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
            keys = np.sort(keys)
        return keys
