"""Shortcuts of a grid route's plan (issue 19: ``route:partial grid route`` at a million tokens) against the
general computations they replace, on small and odd grids.

Each shortcut must give exactly what the general code gives: the boxes of positions from a table of the
grid (``semantics._box_ids``) against their coordinates, a route's group / block side built box by box
(``engine._box_side``) against the one sorted from the group of every position.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng
from patterndsl.analysis import tiles

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
