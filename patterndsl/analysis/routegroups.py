"""Stage 4 (block plan), route choices over segments of query groups: O(segments), not O(groups).

Comes in: the candidate runs of a 1-D route as :func:`patterndsl.analysis.routeruns.candidates`
finds them, level by level: rows of ``2**j`` consecutive query groups sharing runs of key blocks.
Goes out: :class:`GroupRuns`, the same choice as a per-group
:class:`~patterndsl.analysis.routetiles.RunTable` would hold it, kept per *segment* of consecutive
groups that have the same runs and meet the same query tiles.

At ``qblock = 1`` and a million tokens there are a million groups, but ``among`` planned coarse to
fine gives their candidates as a few thousand rows of groups (``causal - window(63)``: a new run
every 64 queries). The segments are the common refinement of those rows and of the query tiles'
group boundaries, so every per-group quantity of :mod:`~patterndsl.analysis.routeruns` (candidates
and picks per group, whether it is forced, the query tiles it meets) is constant on a segment, and
the per-tile counts weigh each segment by its number of groups.
"""

from __future__ import annotations

import numpy as np
import torch

from patterndsl.analysis import engine as eng
from patterndsl.analysis import routetiles

#: Most (cell, segment) pairs :meth:`GroupRuns.chosen_count` lists at once.
CHUNK_PAIRS = 1 << 20


class GroupRuns:
    """A route's fixed choice as runs of blocks per segment of groups, indexable like the bool
    ``[n_groups, n_blocks]`` table.

    Attributes:
        bounds: int64 ``[segments + 1]``, increasing from 0 to the number of groups: segment ``s``
            is the groups ``bounds[s] <= a < bounds[s + 1]``.
        group, lo, hi: int64 runs, sorted by ``(group, lo)``, disjoint and not touching: every group
            of segment ``group[r]`` has blocks ``lo[r] <= b < hi[r]`` (named as in ``RunTable``:
            the segment plays the group's part in the per-run arithmetic).
        n_blocks: key blocks of the route.
    """

    def __init__(self, bounds: np.ndarray, group: np.ndarray, lo: np.ndarray, hi: np.ndarray, n_blocks: int):
        self.bounds, self.group, self.lo, self.hi, self.n_blocks = bounds, group, lo, hi, n_blocks
        self.source = None
        self._lookup = None

    @property
    def segments(self) -> int:
        return len(self.bounds) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Groups per segment."""
        return np.diff(self.bounds)

    def take(self, keep: np.ndarray) -> GroupRuns:
        """The runs where ``keep`` is True (whole segments: ``source`` names the table they came from)."""
        out = GroupRuns(self.bounds, self.group[keep], self.lo[keep], self.hi[keep], self.n_blocks)
        out.source = self
        return out

    def to(self, device) -> GroupRuns:
        return self

    def per_group(self, values: np.ndarray) -> np.ndarray:
        """A per-segment array repeated for each group of its segment."""
        return np.repeat(values, self.sizes)

    def runs(self) -> routetiles.RunTable:
        """The same choice as a per-group :class:`~patterndsl.analysis.routetiles.RunTable`."""
        r, a = eng.expand_runs(
            np.arange(len(self.group), dtype=np.int64), self.bounds[self.group], self.bounds[self.group + 1]
        )
        order = np.lexsort((self.lo[r], a))
        return routetiles.RunTable(a[order], self.lo[r][order], self.hi[r][order], self.n_blocks)

    def _table(self):
        # [segments + 1, most runs of a segment] bounds (the last row empty, for groups past the end)
        if self._lookup is None:
            per = np.bincount(self.group, minlength=self.segments)
            width = int(per.max()) if len(per) else 0
            lo = np.zeros((self.segments + 1, width), np.int64)
            hi = np.zeros((self.segments + 1, width), np.int64)
            rank = np.arange(len(self.group)) - np.repeat(np.cumsum(per) - per, per)
            lo[self.group, rank] = self.lo
            hi[self.group, rank] = self.hi
            self._lookup = lo, hi
        return self._lookup

    def segment_of(self, groups: np.ndarray) -> np.ndarray:
        """The segment of each group (``segments`` for groups past the last one: no blocks)."""
        return np.searchsorted(self.bounds, groups, "right") - 1

    def __getitem__(self, index) -> torch.Tensor:
        a, b = index
        lo, hi = (torch.from_numpy(t) for t in self._table())
        s = torch.searchsorted(torch.from_numpy(self.bounds), a.contiguous(), right=True) - 1
        s = s.clamp(0, self.segments)
        out = torch.zeros(torch.broadcast_tensors(a, b)[0].shape, dtype=torch.bool)
        for r in range(lo.shape[1]):
            out |= (b >= lo[s, r]) & (b < hi[s, r])
        return out

    def chosen_count(self, g0: np.ndarray, g1: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per cell, how many of the groups ``g0 <= a < g1`` have block ``b``."""
        return count_listed(*self._table(), self.bounds, g0, g1, b)


def count_listed(lo, hi, bounds, g0: np.ndarray, g1: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per cell, how many of the groups ``g0 <= a < g1`` have block ``b``, from ``[segments + 1, runs]``
    bounds per segment (``bounds``: each segment's first group, then the end): each segment the cell
    meets counts its groups inside the cell when it holds the block (pairs listed in chunks)."""
    g1 = np.minimum(g1, bounds[-1])
    out = np.zeros(len(b), np.int64)
    live = np.flatnonzero(g0 < g1)
    if not len(live):
        return out
    s0 = np.searchsorted(bounds, g0[live], "right") - 1
    s1 = np.searchsorted(bounds, g1[live] - 1, "right")
    ends = np.cumsum(s1 - s0)
    start = 0
    while start < len(live):
        # cells [start, stop) list at most CHUNK_PAIRS pairs (at least one cell)
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + CHUNK_PAIRS, "right")), start + 1)
        cell, s = eng.expand_runs(np.arange(start, stop, dtype=np.int64), s0[start:stop], s1[start:stop])
        c = live[cell]
        bb = b[c]
        hit = np.zeros(len(s), bool)
        for r in range(lo.shape[1]):
            hit |= (bb >= lo[s, r]) & (bb < hi[s, r])
        inside = np.minimum(g1[c], bounds[s + 1]) - np.maximum(g0[c], bounds[s])
        out[live[start:stop]] = np.bincount(cell - start, weights=inside * hit, minlength=stop - start)
        start = stop
    return out


def segmented(rows: list, geo) -> GroupRuns:
    """The candidates of every group as :class:`GroupRuns`, from rows of groups with their runs.

    Args:
        rows: ``(g0, g1, lo, hi)`` int64 arrays: groups ``g0[i] <= a < g1[i]`` have blocks
            ``lo[i] <= b < hi[i]`` (the rows of one level are disjoint in groups; a group's runs
            from all rows are disjoint).
        geo: the route's :class:`~patterndsl.analysis.routetiles._Geometry`.
    """
    g0, g1, lo, hi = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in zip(*rows, strict=True))
    bounds = np.unique(np.concatenate([[0, geo.n_q], g0, g1, tile_bounds(geo)]))
    bounds = bounds[(bounds >= 0) & (bounds <= geo.n_q)]
    run, seg = eng.expand_runs(
        np.arange(len(g0), dtype=np.int64), np.searchsorted(bounds, g0), np.searchsorted(bounds, g1)
    )
    merged = routetiles._merged(seg, lo[run], hi[run], geo.n_k)
    return GroupRuns(bounds, merged.group, merged.lo, merged.hi, geo.n_k)


def tile_bounds(geo) -> np.ndarray:
    """Groups where the query tiles a group meets change: every query tile's first query's group, and
    the group after it (a group across a tile's start meets two tiles: a segment of its own)."""
    qs = geo.q_starts[:-1]
    return np.concatenate([qs // geo.qblock, -(-qs // geo.qblock)])


class SegmentGeometry:
    """:class:`~patterndsl.analysis.routetiles._Geometry` seen by segments of groups: what
    :class:`~patterndsl.analysis.routeruns._Spans` reads, with a segment in a group's place."""

    def __init__(self, geo, table: GroupRuns):
        self.geo = geo
        self.nqb, self.nkb, self.bt0, self.bt1 = geo.nqb, geo.nkb, geo.bt0, geo.bt1
        self.groups_per_tile = geo.groups_per_tile
        first = table.bounds[:-1]
        self.qt0, self.qt1 = geo.group_tiles(first)  # every group of a segment meets the same query tiles

    def spans(self, runs):
        return self.geo.spans(runs)

    def rows(self, seg: np.ndarray):
        """``(run, m)``: every query tile ``m`` of each run's segment."""
        return eng.expand_runs(np.arange(len(seg), dtype=np.int64), self.qt0[seg], self.qt1[seg])
