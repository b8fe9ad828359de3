"""Shortcuts of a grid route's plan (issue 19: ``route:partial grid route`` at a million tokens) against the
general computations they replace, on small and odd grids.

Each shortcut must give exactly what the general code gives: the boxes of positions from a table of the
grid (``semantics._box_ids``) against their coordinates; a route's group / block side built box by box
(``engine._box_side``) against the one sorted from the group of every position; sums over ranges and
overlays of :class:`routeruns.Steps` (one packed sort, starts counted per function) against dense sums
and binary searches; single tiles' Steps built in order against their ranges; the end tiles of a grid
route's runs summed only where two runs of a group can share one (against the pair-by-pair plan).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routeruns, tiles
from tests.unit.test_route_grid_runs import equal_to_pairs

GRIDS = [
    ((16, 16), (4, 4)),
    ((13, 10), (4, 3)),
    ((3, 7, 9), (2, 2, 4)),
    ((4, 32, 16), (2, 8, 8)),
    ((5, 6), (1, 6)),
    ((7, 9), (8, 10)),
]


def _layout(shape) -> ir.Layout:
    return ir.Layout(tuple((f"a{i}", n) for i, n in enumerate(shape)))


def _boxes_from_coordinates(pos: torch.Tensor, layout: ir.Layout, box) -> torch.Tensor:
    ids = torch.zeros_like(pos)
    for coord, extent, side in zip(semantics.grid_coords(pos, layout), layout.shape, box, strict=True):
        ids = ids * -(-extent // side) + torch.div(coord, side, rounding_mode="floor")
    return ids


@pytest.mark.parametrize(("shape", "box"), GRIDS)
def test_box_ids_from_the_grid_table_are_those_of_the_coordinates(shape, box):
    layout, size = _layout(shape), math.prod(shape)
    for first, count in [(0, size), (3, size), (5, 2 * size + 3), (0, size // 2), (2, size - 2)]:
        ids, total = semantics._box_ids(first, count, layout, box)
        want = _boxes_from_coordinates(torch.arange(count, dtype=torch.int64) + first, layout, box)
        assert torch.equal(ids, want), (first, count)
        assert total == math.prod(-(-n // b) for n, b in zip(shape, box, strict=True))


@pytest.mark.parametrize(("shape", "box"), GRIDS)
def test_a_box_side_is_the_side_sorted_from_every_position(shape, box):
    layout, size = _layout(shape), math.prod(shape)
    ids, count = semantics._box_ids(0, size, layout, box)
    fine = tiles.build_side(tiles.identity_segments(size, 0, shape), size, shape[-1], 0, shape, True)
    general = eng._group_side(ids.numpy(), count, fine, 0, layout, True)
    boxed = eng._group_side(ids.numpy(), count, fine, 0, layout, True, box)
    for field in dataclasses.fields(general):
        want, got = getattr(general, field.name), getattr(boxed, field.name)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), field.name
        else:
            assert got == want, field.name


# --------------------------------------------------------------------------- Steps: sums and overlays


def _dense_sum(m, lo, hi, weight, nqb: int, nkb: int) -> np.ndarray:
    out = np.zeros((nqb, nkb), np.int64)
    for r, a, b, w in zip(m, lo, hi, np.broadcast_to(weight, m.shape), strict=True):
        out[r, a:b] += w
    return out


def _dense(steps: routeruns.Steps, nqb: int, nkb: int) -> np.ndarray:
    keys = (np.arange(nqb)[:, None] * (nkb + 1) + np.arange(nkb)[None, :]).reshape(-1)
    return steps.at(keys).reshape(nqb, nkb)


def _random_ranges(gen, nqb: int, nkb: int, count: int):
    m = gen.integers(0, nqb, count)
    lo = gen.integers(0, nkb + 1, count)
    hi = np.clip(lo + gen.integers(-1, 5, count), 0, nkb)
    return m, lo, hi


@pytest.mark.parametrize("seed", range(4))
def test_ranges_sum_the_weights_of_the_ranges_holding_each_tile(seed):
    gen = np.random.default_rng(seed)
    nqb, nkb = 7, 11
    m, lo, hi = _random_ranges(gen, nqb, nkb, 60)
    weight = gen.integers(-3, 4, len(m))
    steps = routeruns.ranges(m, lo, hi, weight, nqb, nkb)
    assert np.array_equal(_dense(steps, nqb, nkb), _dense_sum(m, lo, hi, weight, nqb, nkb))
    key = steps.key
    assert (np.diff(key) > 0).all() and set(range(0, nqb * (nkb + 1), nkb + 1)) <= set(key.tolist())
    same_row = key[1:] // (nkb + 1) == key[:-1] // (nkb + 1)
    assert (steps.value[1:][same_row] != steps.value[:-1][same_row]).all()  # compact: no segment repeats its left


def test_summed_keys_too_large_to_pack_are_sorted_by_an_argsort():
    keys = np.array([5, 1 << 61, 5, 3, 1 << 61], np.int64)
    got = routeruns._summed(keys, np.array([1, 2, 3, -4, 5], np.int64))
    assert got[0].tolist() == [3, 5, 1 << 61] and got[1].tolist() == [-4, 4, 7]
    got = routeruns._summed(keys[[0, 2, 3]], np.array([1, 3, -4], np.int64))
    assert got[0].tolist() == [3, 5] and got[1].tolist() == [-4, 4]


@pytest.mark.parametrize("seed", range(4))
def test_an_overlay_reads_every_function_on_the_union_of_their_segments(seed):
    gen = np.random.default_rng(seed)
    nqb, nkb = 5, 9
    steps = [routeruns.ranges(*_random_ranges(gen, nqb, nkb, 12), 1, nqb, nkb) for _ in range(4)]
    steps.append(steps[1])  # the same object twice
    rows = np.arange(nqb)
    steps.append(routeruns.ranges(rows, rows * 0, rows * 0 + nkb, 2, nqb, nkb))  # one value everywhere
    m, lo, hi, values = routeruns.overlay(steps, nkb)
    width = nkb + 1
    want = routeruns.sorted_unique(np.concatenate([s.key for s in steps]))
    assert np.array_equal(m * width + lo, want)
    assert (hi > lo).all() and (hi <= nkb).all()
    assert np.array_equal(hi[:-1], np.where(m[1:] == m[:-1], lo[1:], nkb)) and hi[-1] == nkb
    for s, v in zip(steps, values, strict=True):
        assert np.array_equal(v, s.at(want))


@pytest.mark.parametrize("seed", range(6))
def test_steps_of_single_tiles_in_order_are_those_of_their_ranges(seed):
    gen = np.random.default_rng(seed)
    nqb, nkb = 6, 8
    keys = np.flatnonzero(gen.random(nqb * nkb) < [0.1, 0.5, 0.9][seed % 3])
    value = gen.integers(0, 3, len(keys)).astype(np.int8)
    got = routeruns.tile_steps(keys, value, nqb, nkb)
    want = routeruns.ranges(keys // nkb, keys % nkb, keys % nkb + 1, value.astype(np.int64), nqb, nkb)
    assert np.array_equal(got.key, want.key) and np.array_equal(got.value, want.value)
    assert got.key.dtype == want.key.dtype and got.value.dtype == want.value.dtype
    empty = routeruns.tile_steps(keys[:0], value[:0], nqb, nkb)
    assert empty.key.tolist() == list(range(0, nqb * (nkb + 1), nkb + 1)) and not empty.value.any()
    shuffled = gen.permutation(len(keys))  # not in order: the ranges
    again = routeruns.tile_steps(keys[shuffled], value[shuffled], nqb, nkb)
    assert np.array_equal(again.key, want.key) and np.array_equal(again.value, want.value)


def test_two_runs_of_a_group_ending_in_one_tile_count_their_blocks_together():
    # a group's candidates on both sides of its own block (the window's hole), in one 32-key tile: two
    # runs of one block row whose ends share the tile, over the cap of 1 only together
    route = "route(topk = 1, block = (1, 4), qblock = (1, 1), among = neighborhood((1, 17)) - neighborhood((1, 9)))"
    equal_to_pairs(f"pattern p {{ layout grid(y = 6, x = 64)\n {route} }}", 6 * 64, (4, 32))


def test_tiles_a_box_covers_are_over_the_cap_where_they_hold_more_blocks_than_it():
    # blocks of 3 keys in tiles of 8: a covered tile holds 3 or 4 of a group's blocks, the cap (3) passed in
    # the tiles of 4 only
    route = "route(topk = 3, block = (1, 3), qblock = (1, 4), among = neighborhood((1, 31)))"
    equal_to_pairs(f"pattern p {{ layout grid(y = 4, x = 48)\n neighborhood(3) | {route} }}", 4 * 48, (4, 8))


def test_an_overlay_of_functions_of_one_value_each_has_the_rows_segments():
    nqb, nkb = 4, 6
    rows = np.arange(nqb)
    steps = [routeruns.ranges(rows, rows * 0, rows * 0 + nkb, w, nqb, nkb) for w in (0, 3)]
    m, lo, hi, values = routeruns.overlay(steps, nkb)
    assert m.tolist() == rows.tolist() and not lo.any() and (hi == nkb).all()
    assert [v.tolist() for v in values] == [[0] * nqb, [3] * nqb]
