"""Grid routes on grids whose rows do not hold whole tiles, planned as runs (analysis/routepieces.py),
against the pair-by-pair plan (issue 19).

A tile of 16 tokens on a 21-wide grid is pieces of two or three rows, meeting boxes of both (the same
ones when the rows share a box row). The plan must be ``routeplan.classify_by_pairs``'s (checked against
the brute-force oracle in test_plan_route.py): tiles, states, route masks, open flags, forced choice.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import patterndsl
from patterndsl.analysis import cellshift, routegrid, routepieces, routeplan
from patterndsl.analysis import engine as eng
from patterndsl.sizes import Sizes
from tests.unit.test_route_grid_runs import equal_to_pairs

BODY = [
    "{r}",
    "~{r}",
    "neighborhood(3) | {r}",
    "neighborhood(5, dilation = {d}) - {r}",
    "neighborhood(5) & {r}",
    "where(k.x <= q.x) & {r}",
    "neighborhood(3) | ({r} & where(k.y >= q.y))",
]
AMONG = [
    "full",
    "neighborhood(5)",
    "neighborhood(5) - neighborhood(1)",
    "where(k.x >= q.x)",
    "neighborhood(5, dilation = {d}) | where(k.y <= q.y - 4)",
]


def _case(seed: int, rank: int, among: str = "full"):
    """A random grid route on a grid whose last axis is no multiple of the tiles (``among`` None: random)."""
    gen = np.random.default_rng(seed)
    tile = (int(gen.choice([8, 16, 32])), int(gen.choice([8, 16, 32])))
    extents = [int(gen.integers(5, 7)) for _ in range(rank - 2)] + [int(gen.integers(5, 13 if rank == 2 else 9))]
    w = int(gen.integers(10, 28))
    while w % tile[0] == 0 and w % tile[1] == 0:
        w += 1
    extents.append(w)
    box = tuple(int(gen.integers(1, 6)) for _ in range(rank))
    qbox = box if gen.random() < 0.5 else tuple(int(gen.integers(1, 6)) for _ in range(rank))
    names = "tyx"[3 - rank :]
    layout = ", ".join(f"{a} = {n}" for a, n in zip(names, extents, strict=True))
    d = "(" + ", ".join(["1"] * (rank - 1) + ["2"]) + ")"
    among = str(gen.choice(AMONG)).format(d=d) if among is None else among
    route = f"route(topk = {int(gen.integers(1, 9))}, block = {box}, qblock = {qbox}, among = {among})"
    body = str(gen.choice(BODY)).format(r=route, d=d)
    return f"pattern p {{ layout grid({layout})\n {body} }}", math.prod(extents), tile


def _seeds(fast: int, total: int):
    """``range(total)``, the seeds from ``fast`` on marked slow."""
    return [seed if seed < fast else pytest.param(seed, marks=pytest.mark.slow) for seed in range(total)]


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("seed", _seeds(6, 40))
def test_full_routes_on_odd_grids_equal_the_pair_by_pair_plan(seed, rank):
    source, length, tile = _case(seed, rank)
    engine = equal_to_pairs(source, length, tile)
    node = eng.rewrite_for_plan(patterndsl.compile(source).ir.default)
    assert routegrid.geometry(engine, node).full


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("seed", _seeds(10, 60))
def test_routes_on_odd_grids_equal_the_pair_by_pair_plan(seed, rank):
    source, length, tile = _case(100 + seed, rank, among=None)
    equal_to_pairs(source, length, tile)


@pytest.mark.parametrize(
    ("source", "length", "tile"),
    [
        ("pattern p { layout grid(y = 23, x = 21)\n route(topk = 4, block = (4, 4)) }", 23 * 21, (16, 16)),
        ("pattern p { layout grid(y = 20, x = 27)\n route(topk = 5, block = (8, 8), qblock = (4, 8)) }", 540, (32, 16)),
        ("pattern p { layout grid(t = 5, y = 9, x = 13)\n route(topk = 3, block = (2, 3, 4)) }", 585, (16, 32)),
        # every group forced: the route is its candidates
        (
            "pattern p { layout grid(y = 23, x = 21)\n neighborhood(3) | route(topk = 99, block = (4, 4)) }",
            483,
            (16, 16),
        ),
    ],
)
def test_biformer_like_routes_on_odd_grids(source, length, tile):
    equal_to_pairs(source, length, tile)


@pytest.mark.parametrize(
    ("shape", "box", "tile"), [((23, 21), (4, 4), 16), ((5, 9, 13), (2, 3, 4), 32), ((7, 5), (3, 2), 8)]
)
def test_tile_boxes_lists_distinct_boxes(shape, box, tile):
    length = math.prod(shape)
    pos = np.arange(length)
    coords = np.unravel_index(pos, shape)
    radix = tuple(-(-n // b) for n, b in zip(shape, box, strict=True))
    boxes = np.ravel_multi_index(tuple(c // b for c, b in zip(coords, box, strict=True)), radix)
    want = [(t // tile, b) for t in range(0, length, tile) for b in sorted(set(boxes[t : t + tile].tolist()))]
    got = routepieces.tile_boxes(shape, box, tile, length)
    assert list(zip(*(a.tolist() for a in got), strict=True)) == want


def test_biformer_on_a_999_grid_is_planned_as_runs():
    """Refused before (more (candidate pair, tile) entries than the limit): every tile decided at run time."""
    pir = patterndsl.compile("pattern p { layout grid(y = 999, x = 999)\n route(topk = 4, block = (8, 8)) }").ir
    n = 999 * 999
    engine = eng.identity_engine(Sizes(n, n, pir.layout), 0, (128, 128))
    runs = routeplan.classify(engine, eng.rewrite_for_plan(pir.default))
    nqb = -(-n // 128)
    assert runs.row.tolist() == list(range(nqb))
    assert (runs.lo == 0).all() and (runs.hi == nqb).all() and (runs.state == eng.DYNAMIC).all()
    assert runs.open.all() and runs.route_mask.all()


@pytest.mark.parametrize(
    ("source", "length", "tile"),
    [
        # the benchmark's route (neighborhood(7) | route(among = neighborhood(17) - neighborhood(7))), scaled down
        (
            "pattern p { layout grid(y = 31, x = 29)\n"
            " neighborhood(2) | route(topk = 3, block = (4, 4), among = neighborhood(5) - neighborhood(2)) }",
            31 * 29,
            (16, 16),
        ),
        # boxes dividing neither axis, other tile sizes on each side
        (
            "pattern p { layout grid(y = 26, x = 23)\n"
            " neighborhood(3) | route(topk = 2, block = (7, 5), among = neighborhood(6) - neighborhood(3)) }",
            26 * 23,
            (16, 32),
        ),
        (
            "pattern p { layout grid(y = 19, x = 27)\n"
            " neighborhood(2) | route(topk = 4, block = (3, 4), qblock = (5, 2), among = neighborhood((4, 7))) }",
            19 * 27,
            (32, 8),
        ),
        # among a union reaching past the windows, the static part an intersection
        (
            "pattern p { layout grid(y = 22, x = 19)\n"
            " (neighborhood(4) & ~neighborhood(1)) | route(topk = 3, block = (4, 3),"
            " among = neighborhood(3) | where(k.y <= q.y - 6)) }",
            22 * 19,
            (16, 16),
        ),
        # dilation, the route subtracted
        (
            "pattern p { layout grid(y = 21, x = 22)\n"
            " neighborhood(5, dilation = (1, 2)) - route(topk = 2, block = (3, 3), among = neighborhood(4)) }",
            21 * 22,
            (16, 16),
        ),
        # 3-D video: tiles across rows of frames, boxes across frames
        (
            "pattern p { layout grid(t = 5, y = 7, x = 11)\n"
            " neighborhood((1, 2, 2)) | route(topk = 3, block = (2, 3, 4), among = neighborhood((2, 3, 5))) }",
            5 * 7 * 11,
            (16, 16),
        ),
        # cells moved along the rows (the windows' relative columns repeating): not across the border columns
        (
            "pattern p { layout grid(y = 13, x = 21)\n neighborhood((3, 9)) | route(topk = 2, block = (2, 3),"
            " among = neighborhood((5, 13)) - neighborhood((3, 9))) }",
            13 * 21,
            (16, 8),
        ),
        (
            "pattern p { layout grid(y = 13, x = 23)\n neighborhood((3, 9)) | route(topk = 2, block = (2, 5),"
            " among = neighborhood((5, 13)) - neighborhood((3, 9))) }",
            13 * 23,
            (16, 16),
        ),
        # the static part no neighborhood: no translation classes, still cells
        (
            "pattern p { layout grid(y = 17, x = 21)\n"
            " where(k.x <= q.x) & (neighborhood(3) | route(topk = 2, block = (4, 4), among = neighborhood(6))) }",
            17 * 21,
            (16, 16),
        ),
    ],
)
def test_tiles_where_a_static_part_and_the_route_are_both_partial_are_decided_on_cells(
    source, length, tile, monkeypatch
):
    """Such tiles (a neighborhood's band) are decided from cells of row pieces by one block, as the
    pair-by-pair plan decides them; with neighborhood bounds no element is evaluated there."""
    seen = []
    decide = routepieces.tile_bounds

    def counted(engine, *args):
        before = engine.tally.elements
        out = decide(engine, *args)
        seen.append((len(args[2]), engine.tally.elements - before))
        return out

    monkeypatch.setattr(routepieces, "tile_bounds", counted)
    equal_to_pairs(source, length, tile)
    assert seen and seen[0][0] > 0, source  # some tiles were decided on cells
    if "where" not in source:
        assert seen[0][1] == 0, source


@pytest.mark.parametrize(
    ("source", "length", "tile"),
    [
        # 4 rows of 20 are 5 tiles of 16: tiles 4 rows apart are alike away from the borders
        (
            "pattern p { layout grid(y = 40, x = 20)\n"
            " neighborhood(2) | route(topk = 3, block = (4, 4), among = neighborhood(5) - neighborhood(2)) }",
            800,
            (16, 16),
        ),
        (
            "pattern p { layout grid(y = 44, x = 10)\n"
            " neighborhood(3) | route(topk = 2, block = (2, 3), qblock = (4, 2), among = neighborhood(4)) }",
            440,
            (16, 8),
        ),
        # frames of 60 positions: 4 frames are 15 tiles of 16
        (
            "pattern p { layout grid(t = 10, y = 5, x = 12)\n"
            " neighborhood((1, 2, 2)) | route(topk = 3, block = (2, 2, 3), among = neighborhood((2, 3, 5))) }",
            600,
            (16, 16),
        ),
        # the last tile cut short (820 = 51 x 16 + 4): no shifted copy of a whole one, whatever the links
        (
            "pattern p { layout grid(y = 41, x = 20)\n neighborhood(5, causal = true) | route(topk = 2, block = (1, 4),"
            " among = where(k.y <= q.y - 1) & where(k.y >= q.y - 2)) }",
            820,
            (16, 16),
        ),
        (
            "pattern p { layout grid(y = 43, x = 12)\n neighborhood(3, causal = true) | route(topk = 2, block = (2, 4),"
            " among = neighborhood(5, causal = true) - neighborhood(3, causal = true)) }",
            43 * 12,
            (16, 8),
        ),
    ],
)
def test_tiles_across_rows_alike_up_to_a_shift_of_whole_tiles_are_decided_once(source, length, tile):
    before = cellshift.TALLY.tiles
    equal_to_pairs(source, length, tile)
    assert cellshift.TALLY.tiles > before, source
