"""Cells of a grid route's static bounds decided once per class of cells equal up to a shift of the grid's
outer axes (analysis/cellshift.py, issue 19): the states must be the engine's on every cell, where the
borders reach the interior too (small grids, large, dilated, strided and causal neighborhoods, uneven
extents, 3-D grids), and the shortcut must be taken where rows repeat; likewise a static node's tiles
planned on one query row per class (``cellshift.static_tiles``) and a route's candidates on one group box."""

from __future__ import annotations

import numpy as np
import pytest

import patterndsl
from patterndsl import ir
from patterndsl.analysis import cellshift, routegrid, routetiles
from patterndsl.analysis import engine as eng
from patterndsl.sizes import Sizes
from tests.unit.test_route_grid_runs import equal_to_pairs

CASES = [
    # (grid, node, tile, whether rows repeat): every cell of the tiles checked
    ("y = 24, x = 16", "neighborhood(3) | neighborhood(7) - neighborhood(3)", (4, 8), True),
    ("y = 9, x = 16", "neighborhood(9)", (8, 4), False),  # a window as tall as the grid: borders everywhere
    ("y = 23, x = 8", "neighborhood((5, 3), dilation = (3, 1))", (4, 4), True),  # uneven dilation groups
    ("y = 21, x = 8", "neighborhood((5, 3), stride = (2, 1)) | ~neighborhood(3, dilation = 2)", (2, 4), True),
    ("y = 19, x = 8", "neighborhood((4, 3), causal = (true, false)) & ~neighborhood(1)", (8, 2), True),
    ("t = 5, y = 11, x = 8", "neighborhood((3, 5, 3), dilation = (1, 2, 1)) - neighborhood(1)", (4, 8), True),
    ("t = 6, y = 11, x = 4", "neighborhood(3) | neighborhood((1, 5, 1), dilation = (1, 2, 1))", (2, 2), True),
]


def _engine(grid: str, node: str, tile):
    pir = patterndsl.compile(f"pattern p {{ layout grid({grid})\n {node} }}").ir
    length = pir.layout.size
    return eng.identity_engine(Sizes(length, length, pir.layout), 0, tile), eng.rewrite_for_plan(pir.default)


@pytest.mark.parametrize("grid, node, tile, repeat", CASES)
def test_cell_states_by_class_equal_the_engines_on_every_cell(grid, node, tile, repeat):
    engine, node = _engine(grid, node, tile)
    assert cellshift.outer_classes(node, engine.env.layout) is not None
    r, col = (a.reshape(-1) for a in np.meshgrid(np.arange(engine.nqb), np.arange(engine.nkb), indexing="ij"))
    want = routetiles.routeplan_states(engine, node, r * engine.nkb + col)
    before = cellshift.TALLY.shifted
    (got,) = cellshift.cell_states(engine, (node,), r, col, routetiles.routeplan_states)
    assert got.tolist() == want.tolist()
    assert (cellshift.TALLY.shifted > before) == repeat  # some cells copied from their class


def test_rows_repeat_only_away_from_the_borders():
    pir = patterndsl.compile("pattern p { layout grid(y = 20, x = 8)\n neighborhood(5) }").ir
    (rep,) = cellshift.outer_classes(eng.rewrite_for_plan(pir.default), pir.layout)
    # windows [y - 2, y + 2] from row 2 to row 17; the rows before and after are shifted by the borders
    assert rep.tolist() == [0, 1, *[2] * 16, 18, 19]


def test_nodes_reading_anything_but_neighborhoods_get_no_classes():
    pir = patterndsl.compile("pattern p { layout grid(y = 20, x = 8)\n neighborhood(5) | where(k.y <= q.y) }").ir
    assert cellshift.outer_classes(eng.rewrite_for_plan(pir.default), pir.layout) is None


def test_partial_grid_route_with_repeating_rows_equals_the_pairs_plan():
    """The benchmark's kind of route on a grid tall enough for rows to repeat: cells copied from their class,
    plan equal to the pair-by-pair one."""
    source = (
        "pattern p { layout grid(y = 40, x = 16)\n"
        " neighborhood(3) | route(topk = 2, block = (2, 2), among = neighborhood(9) - neighborhood(3)) }"
    )
    before = cellshift.TALLY.shifted
    equal_to_pairs(source, 40 * 16, (8, 8))
    assert cellshift.TALLY.shifted > before


def test_dilated_partial_grid_route_with_uneven_rows_equals_the_pairs_plan():
    source = (
        "pattern p { layout grid(y = 29, x = 8)\n"
        " neighborhood((5, 3), dilation = (2, 1)) | route(topk = 1, block = (1, 4), qblock = (3, 2),"
        " among = neighborhood(7, dilation = (2, 1)))"
        " }"
    )
    pir = patterndsl.compile(source).ir
    engine = eng.identity_engine(Sizes(29 * 8, 29 * 8, pir.layout), 0, (4, 4))
    assert routegrid.geometry(engine, eng.rewrite_for_plan(pir.default)) is not None
    before = cellshift.TALLY.shifted
    equal_to_pairs(source, 29 * 8, (4, 4))
    assert cellshift.TALLY.shifted > before


ROUTES = [
    # (grid, among, block, qblock, whether group boxes repeat)
    ("y = 40, x = 40", "neighborhood(9) - neighborhood(3)", (4, 4), None, True),
    ("y = 37, x = 30", "neighborhood(7)", (3, 2), (2, 3), True),  # boxes cut by the borders, unlike extents
    ("y = 12, x = 12", "neighborhood(11)", (2, 2), None, False),  # windows as wide as the grid
    ("y = 41, x = 24", "neighborhood((5, 3), dilation = (3, 1)) | neighborhood(3, stride = 2)", (2, 4), (4, 2), True),
    ("y = 33, x = 16", "neighborhood((4, 3), causal = (true, false)) & ~neighborhood(1)", (4, 4), None, True),
    ("t = 9, y = 10, x = 12", "neighborhood((3, 5, 3), dilation = (1, 2, 1)) - neighborhood(1)", (1, 2, 3), None, True),
    ("y = 40, x = 40", "~neighborhood(3)", (4, 4), None, False),  # pairs outside every window: no shortcut
    ("y = 40, x = 40", "neighborhood(5) | where(k.y <= q.y)", (4, 4), None, False),
]


def _candidates(grid, among, block, qblock):
    qb = "" if qblock is None else f", qblock = {qblock}"
    source = f"pattern p {{ layout grid({grid})\n route(topk = 2, block = {block}{qb}, among = {among}) }}"
    pir = patterndsl.compile(source).ir
    length = pir.layout.size
    engine = eng.identity_engine(Sizes(length, length, pir.layout), 0, (4, 4))
    (prim,) = ir.polarities(eng.rewrite_for_plan(pir.default))
    return engine.route_candidates(prim)[0]


@pytest.mark.parametrize("grid, among, block, qblock, repeat", ROUTES)
def test_route_candidates_by_class_equal_the_engines(grid, among, block, qblock, repeat, monkeypatch):
    before = cellshift.TALLY.copied
    got = _candidates(grid, among, block, qblock)
    assert (cellshift.TALLY.copied > before) == repeat
    monkeypatch.setattr(cellshift, "route_box_candidates", lambda *a: None)
    want = _candidates(grid, among, block, qblock)
    assert len(want) and got.tolist() == want.tolist()


STATIC = [
    # (grid, static node, tile): the query rows repeat, the tiles of one row per class planned
    ("y = 40, x = 48", "neighborhood(7)", (16, 16)),
    ("y = 37, x = 48", "neighborhood(5)", (24, 24)),  # rows not a multiple of anything
    ("y = 64, x = 64", "neighborhood(7, dilation = 2)", (64, 64)),
    ("t = 4, y = 32, x = 128", "neighborhood((3, 7, 7))", (128, 64)),
    ("y = 40, x = 40", "neighborhood(9) - neighborhood(3)", (8, 8)),
    ("y = 33, x = 16", "neighborhood((4, 3), causal = (true, false)) & ~neighborhood(1)", (4, 8)),
]


@pytest.mark.parametrize("grid, node, tile", STATIC)
def test_static_tiles_by_row_class_equal_the_engines(grid, node, tile):
    pir = patterndsl.compile(f"pattern p {{ layout grid({grid})\n {node} }}").ir
    length = pir.layout.size
    rewritten = eng.rewrite_for_plan(pir.default)
    before = cellshift.TALLY.static
    got = cellshift.static_tiles(eng.identity_engine(Sizes(length, length, pir.layout), 0, tile), rewritten)
    assert got is not None and cellshift.TALLY.static > before
    keys, state = eng.identity_engine(Sizes(length, length, pir.layout), 0, tile).run(rewritten)
    assert got[0].tolist() == keys.tolist() and got[1].tolist() == state.tolist() and got[1].dtype == state.dtype


def test_static_tiles_need_rows_that_repeat_and_windows():
    for grid, node, tile in [
        ("y = 12, x = 12", "neighborhood(11)", (4, 4)),  # windows as wide as the grid: no row repeats
        ("y = 40, x = 40", "~neighborhood(3)", (8, 8)),  # pairs outside every window
        ("y = 40, x = 40", "neighborhood(5) | where(k.y <= q.y)", (8, 8)),
        ("y = 40, x = 36", "neighborhood(5)", (8, 8)),  # a row of 36 keys holds no whole tile of 8
    ]:
        pir = patterndsl.compile(f"pattern p {{ layout grid({grid})\n {node} }}").ir
        engine = eng.identity_engine(Sizes(pir.layout.size, pir.layout.size, pir.layout), 0, tile)
        assert cellshift.static_tiles(engine, eng.rewrite_for_plan(pir.default)) is None, (grid, node)
