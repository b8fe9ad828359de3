"""Cutting grid segments into tiles' pieces with array operations (analysis/tiles.py).

The oracle is the per-range recursion the cut replaced (a scalar generator over the axes), run range
by range: the vectorised cut must give the same pieces, in the same order, and cover every position
of every tile exactly once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from patterndsl.analysis import tiles


def _boxes(n, lo, hi):
    """The row-major offsets ``[lo, hi)`` of a box of shape ``n`` as sub-boxes (scalar oracle)."""
    if lo >= hi:
        return
    if len(n) == 1:
        yield (lo,), (hi - lo,)
        return
    inner = math.prod(n[1:])
    a, r1 = divmod(lo, inner)
    b, r2 = divmod(hi, inner)
    if a == b:
        for st, ct in _boxes(n[1:], r1, r2):
            yield (a, *st), (1, *ct)
        return
    if r1:
        for st, ct in _boxes(n[1:], r1, inner):
            yield (a, *st), (1, *ct)
        a += 1
    if b > a:
        yield (a,) + (0,) * (len(n) - 1), (b - a, *n[1:])
    if r2:
        for st, ct in _boxes(n[1:], 0, r2):
            yield (b, *st), (1, *ct)


def _reference_cut(segments, block):
    """Per segment, per tile, the oracle's boxes; then stably by tile (the layout before vectorising)."""
    rows, r0 = [], 0
    for a, s, n in segments:
        size = math.prod(n)
        for t in range(r0 // block, -(-(r0 + size) // block)):
            lo, hi = max(r0, t * block) - r0, min(r0 + size, (t + 1) * block) - r0
            for st, ct in _boxes(n, lo, hi):
                rows.append((t, [a[x] + s[x] * st[x] for x in range(len(n))], list(s), list(ct)))
        r0 += size
    rows.sort(key=lambda row: row[0])
    return [np.asarray([row[f] for row in rows], np.int64) for f in range(4)]


@pytest.mark.parametrize("seed", range(12))
def test_range_boxes_equal_the_recursion(seed):
    rng = np.random.default_rng(seed)
    d = 1 + seed % 4
    shapes = rng.integers(1, 7, (40, d))
    sizes = shapes.prod(1)
    lo = rng.integers(0, sizes + 1)
    hi = np.minimum(sizes, lo + rng.integers(0, sizes + 1))
    row, start, count = tiles.range_boxes(shapes, lo, hi)
    want = [(i, st, ct) for i in range(40) for st, ct in _boxes(tuple(shapes[i].tolist()), int(lo[i]), int(hi[i]))]
    assert row.tolist() == [w[0] for w in want]
    assert start.tolist() == [list(w[1]) for w in want]
    assert count.tolist() == [list(w[2]) for w in want]
    assert (np.bincount(row, weights=count.prod(1), minlength=40) == hi - lo).all()  # every offset once
    assert (np.bincount(row, minlength=40) <= 2 * d - 1).all()


@pytest.mark.parametrize(
    ("extents", "dilation", "box", "block"),
    [
        ((13, 11), (1, 1), (4, 4), 16),  # boxes cut at the grid's edges, tiles across boxes
        ((10, 9), (2, 1), (3, 4), 8),
        ((5, 6, 7), (1, 2, 1), (2, 2, 3), 16),
        ((12, 12), (1, 1), (12, 12), 32),  # the identity order in one segment, tiles across rows
        ((9, 125), (1, 1), (9, 125), 128),  # a row of 125 tokens, 128-token tiles
    ],
)
def test_build_side_equals_the_per_tile_cut(extents, dilation, box, block):
    segments = tiles.box_segments(extents, dilation, box)
    length = math.prod(extents)
    for listed in (segments, list(segments)):  # with and without the segments' arrays
        side = tiles.build_side(listed, length, block, 0, extents, identity=False)
        tile, a, s, n = _reference_cut(list(segments), block)
        assert side.tile.tolist() == tile.tolist()
        assert side.a.tolist() == a.tolist() and side.s.tolist() == s.tolist() and side.n.tolist() == n.tolist()
        strides = np.asarray(side.strides)
        one = [tiles._positions(*(np.asarray([seg[f]]) for f in range(3)), side.strides) for seg in segments]
        assert side.order.tolist() == np.concatenate(one).tolist()
        # the pieces of each tile are its positions in the order
        for t in range(side.n_tiles):
            got = []
            for p in range(side.ptr[t], side.ptr[t + 1]):
                axes = [side.a[p, x] + side.s[p, x] * np.arange(side.n[p, x]) for x in range(len(extents))]
                grids = np.meshgrid(*axes, indexing="ij")
                got.extend((np.stack([g.reshape(-1) for g in grids], 1) * strides).sum(1).tolist())
            assert got == side.order[side.starts[t] : side.starts[t + 1]].tolist()


def test_positions_row_major_per_segment():
    a, s, n = np.asarray([[1, 2], [0, 0]]), np.asarray([[2, 1], [1, 3]]), np.asarray([[2, 3], [1, 2]])
    # segment 0: rows 1, 3 by columns 2..4; segment 1: row 0, columns 0 and 3 (grid of width 10)
    assert tiles._positions(a, s, n, (10, 1)).tolist() == [12, 13, 14, 32, 33, 34, 0, 3]


def test_positions_by_shape_equal_the_general_layout(monkeypatch):
    segments = tiles.box_segments((23, 17, 9), (2, 1, 3), (3, 5, 2))  # edge boxes of several shapes
    arrays = segments.arrays
    strides = (17 * 9, 9, 1)
    by_shape = tiles._positions(*arrays, strides)
    monkeypatch.setattr(tiles, "_MAX_SHAPES", 0)
    general = tiles._positions(*arrays, strides)
    assert by_shape.tolist() == general.tolist()
    assert sorted(general.tolist()) == list(range(23 * 17 * 9))  # every position once


@pytest.mark.parametrize(
    ("extents", "dilation", "box"), [((23, 21), (1, 1), (4, 4)), ((25, 19, 7), (2, 1, 1), (2, 2, 4))]
)
def test_box_orders_keep_whole_boxes_one_tile_each(extents, dilation, box):
    # whole boxes first, the boxes cut at the grid's edges last: every whole box is one tile of one piece
    segments = tiles.box_segments(extents, dilation, box)
    block = math.prod(box)
    side = tiles.build_side(segments, math.prod(extents), block, 0, extents, identity=False)
    whole = int((segments.arrays[2] == np.asarray(box)).all(1).sum())
    assert 0 < whole < len(segments)
    pieces = np.diff(side.ptr)
    assert (pieces[:whole] == 1).all() and (side.n[:whole] == np.asarray(box)).all()
    assert sorted(side.order.tolist()) == list(range(math.prod(extents)))


@pytest.mark.parametrize("seed", range(6))
def test_positions_below_a_limit_per_piece(seed):
    # Side.below (sink and global counts on a grid) against the pieces' positions listed
    rng = np.random.default_rng(seed)
    for trial in range(40):
        d = 1 + trial % 3
        ext = tuple(int(v) for v in rng.integers(2, 9, d))
        strides = tuple(math.prod(ext[x + 1 :]) for x in range(d))
        dil = tuple(int(v) for v in rng.integers(1, 3, d))
        box = tuple(int(v) for v in rng.integers(1, 4, d))
        segments = tiles.box_segments(ext, dil, box)
        side = tiles.build_side(segments, math.prod(ext), int(rng.integers(1, 9)), 0, ext, False)
        limit = int(rng.integers(-2, math.prod(ext) + 3))
        got = side.below(limit)
        for p in range(len(side.a)):
            axes = [side.a[p, x] + side.s[p, x] * np.arange(side.n[p, x]) for x in range(d)]
            pos = sum(g * w for g, w in zip(np.meshgrid(*axes, indexing="ij"), strides, strict=True))
            assert got[p] == int((pos < limit).sum())


@pytest.mark.parametrize("runs", [0, 3, 64])
def test_positions_of_interleaved_shapes_equal_the_general_layout(runs, monkeypatch):
    # segments of a few shapes in any order: a few runs of consecutive segments of one shape are written
    # as slices, many scattered (runs 0: every shape scattered, 64: every one in slices); all equal the
    # general layout
    rng = np.random.default_rng(runs)
    shapes = np.asarray([[2, 3], [1, 5], [3, 1]])
    which = rng.integers(0, 3, 40)
    which[10:20] = 0  # one long run
    which[:2], which[30:] = 2, 2  # two runs only
    n = shapes[which]
    s = np.asarray([[1, 2], [2, 1], [1, 1]])[which]  # one step per shape: three shapes in all
    a = rng.integers(0, 5, (40, 2))
    strides = (50, 1)
    monkeypatch.setattr(tiles, "_MAX_SHAPES", 0)
    general = tiles._positions(a, s, n, strides)
    monkeypatch.setattr(tiles, "_MAX_SHAPES", 3)
    monkeypatch.setattr(tiles, "_MAX_RUNS", runs)
    assert tiles._positions(a, s, n, strides).tolist() == general.tolist()
    rows = [(i, y, x) for i in range(40) for y in range(n[i, 0]) for x in range(n[i, 1])]
    want = [50 * (a[i, 0] + s[i, 0] * y) + a[i, 1] + s[i, 1] * x for i, y, x in rows]
    assert general.tolist() == want


def test_largest_piece_of_every_tile():
    segments = tiles.box_segments((13, 11), (1, 1), (4, 4))
    side = tiles.build_side(segments, 143, 16, 0, (13, 11), identity=False)
    size = side.n.prod(1)
    assert (side.tile[side.largest] == np.arange(side.n_tiles)).all()
    for t in range(side.n_tiles):
        mine = size[side.ptr[t] : side.ptr[t + 1]]
        assert side.largest[t] == side.ptr[t] + int(np.argmax(mine))
