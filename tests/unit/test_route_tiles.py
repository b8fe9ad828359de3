"""Route patterns planned from the tile level (analysis/routetiles.py) agree with the pair-by-pair plan.

``routeplan.classify_by_pairs`` enumerates every candidate (query group, key block) pair and
every tile it meets; ``routetiles.classify`` works on runs of candidate blocks and per-tile
counts. Both must give the same tiles, states, route masks and open flags (the pair-by-pair
plan is itself checked against the brute-force oracle in test_plan_route.py, and so is the
tile-level one, which ``Pattern.plan`` now takes for these patterns).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routeplan, routetiles
from patterndsl.sizes import Sizes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

SOURCES = [
    "pattern p { causal & (window(20) | route(topk = 2, block = 24, qblock = 1, among = causal - window(20))) }",
    "pattern p { causal & (window(20) | route(topk = 3, block = 40, qblock = 8, among = causal)) }",
    "pattern p { causal - route(topk = 2, block = 32, qblock = 16, among = causal) }",
    "pattern p { causal & ~route(topk = 1, block = 96, qblock = 4) }",
    "pattern p { causal & (blocks(100) | route(topk = 1, block = 100, qblock = 1, among = causal - blocks(100))) }",
    "pattern p { sink(5) | route(topk = 4, block = 7, qblock = 2, among = causal & ~window(9)) }",
    # no candidates at all
    "pattern p { causal | route(topk = 1, block = 64, among = where(k > 1000)) }",
]


def _both(p, lq, lk, block):
    node = eng.rewrite_for_plan(p.ir.default)
    sizes = Sizes(lq, lk, p.ir.layout)
    engine = eng.identity_engine(sizes, 0, block)
    assert routetiles.usable(engine, node)
    tiles = routetiles.classify(engine, node)
    pairs = routeplan.classify_by_pairs(eng.identity_engine(sizes, 0, block), node)
    for name in ("keys", "state", "route_mask", "open"):
        assert np.asarray(getattr(tiles, name)).tolist() == np.asarray(getattr(pairs, name)).tolist(), name
    assert tiles.unproven == pairs.unproven == 0


SHAPES = [(300, 300, (64, 32)), (200, 456, (16, 48)), (136, 200, (32, 24))]


@pytest.mark.parametrize("index", range(len(SOURCES)))
def test_tile_level_plan_equals_pair_by_pair(index):
    # each pattern on one shape (rotating: square and offset lengths, tiles wider or narrower than blocks)
    lq, lk, block = SHAPES[index % len(SHAPES)]
    _both(patterndsl.compile(SOURCES[index]), lq, lk, block)


@pytest.mark.parametrize(("file", "name"), [("landmark", "landmark"), ("nsa", "nsa_select"), ("moba", "moba")])
def test_examples_equal_pair_by_pair(file, name):
    p = patterndsl.compile((EXAMPLES / f"{file}.pdsl").read_text(), name, block=16)
    _both(p, 256, 256, (24, 40))


def test_several_routes_mixed_polarity_and_head_reading_candidates_take_the_pair_path():
    def usable(source, lq=64, lk=64):
        node = eng.rewrite_for_plan(patterndsl.compile(source).ir.default)
        return routetiles.usable(eng.identity_engine(Sizes(lq, lk), 0, (16, 16)), node)

    assert usable("pattern p { route(topk = 2, block = 8) }")
    assert not usable("pattern p { route(topk = 2, block = 8) | route(topk = 1, block = 4) }")
    mixed = "pattern p { (route(topk = 2, block = 8) & window(9)) | (sink(3) - route(topk = 2, block = 8)) }"
    assert not usable(mixed)
    assert not usable("pattern p { route(topk = 2, block = 8, among = where(h == 0)) }")
    # groups not aligned to the first query, and grids: the dense geometry
    assert isinstance(_geometry("pattern p { route(topk = 2, block = 8, qblock = 6) }", 40), routetiles._Geometry)
    assert isinstance(_geometry("pattern p { route(topk = 2, block = 8, qblock = 6) }", 42), routetiles._DenseGeometry)
    grid = "pattern p { layout grid(y = 8, x = 8)\n route(topk = 2, block = (4, 4)) }"
    assert isinstance(_geometry(grid, 64), routetiles._DenseGeometry)


def _geometry(source, lq, lk=64):
    p = patterndsl.compile(source)
    node = eng.rewrite_for_plan(p.ir.default)
    return routetiles._geometry(eng.identity_engine(Sizes(lq, lk, p.ir.layout), 0, (16, 16)), node)


#: (source, lq, lk, tiles): grids and unaligned groups (dense geometry), then groups and blocks
#: nesting in the tiles (tiles where a static part and the route are both partial are decided
#: from the static bounds on their (group x block) cells)
GEOMETRY_CASES = [
    (
        "pattern p { causal & (window(5) | route(topk = 2, block = 8, qblock = 6, among = causal)) }",
        42,
        64,
        (16, 8),
    ),
    (
        "pattern p { layout grid(y = 8, x = 8)\n causal & route(topk = 2, block = (4, 4), among = causal) }",
        64,
        64,
        (16, 8),
    ),
    (
        "pattern p { layout grid(y = 6, x = 8)\n ~route(topk = 1, block = (2, 4), qblock = (3, 4)) }",
        48,
        48,
        (8, 16),
    ),
    (
        "pattern p { layout grid(y = 6, x = 6)\n window(3) | route(topk = 1, block = (2, 3), among = causal) }",
        36,
        36,
        (6, 12),
    ),
    (
        "pattern p { causal & (where(q // 8 - k // 8 <= 1) | route(2, block = 8, qblock = 1, among = causal)) }",
        96,
        96,
        (16, 16),
    ),
    (
        "pattern p { causal - (window(5) & route(topk = 1, block = 12, qblock = 4, among = causal)) }",
        72,
        96,
        (8, 24),
    ),
    (
        "pattern p { (sink(4) | window(6)) & route(topk = 3, block = 6, qblock = 2, among = causal - window(6)) }",
        60,
        60,
        (12, 12),
    ),
]


@pytest.mark.parametrize(("source", "lq", "lk", "block"), GEOMETRY_CASES)
def test_geometries_equal_pair_by_pair(source, lq, lk, block):
    p = patterndsl.compile(source)
    node = eng.rewrite_for_plan(p.ir.default)
    engine = eng.identity_engine(Sizes(lq, lk, p.ir.layout), 0, block)
    geo = routetiles._geometry(engine, node)
    if p.ir.layout is not None or lq == 42:
        assert isinstance(geo, routetiles._DenseGeometry)
    else:
        assert routetiles._cells(engine, geo, np.arange(3, dtype=np.int64)) is not None
    _both(p, lq, lk, block)


def test_run_table_reads_like_the_bool_table():
    gen = np.random.default_rng(0)
    n_groups, n_blocks = 9, 13
    dense = gen.random((n_groups, n_blocks)) < 0.5
    dense[4] = False  # a group without runs
    rows, cols = np.nonzero(dense)
    table = routetiles._merged(rows, cols, cols + 1, n_blocks)
    a = torch.arange(n_groups)[:, None, None]
    b = torch.arange(n_blocks)[None, None, :]
    got = table[a, b]
    assert got.shape == (n_groups, 1, n_blocks)
    assert torch.equal(got[:, 0], torch.from_numpy(dense))
    # groups beyond the last one holding a run have none
    assert not table[torch.tensor([n_groups + 5]), torch.tensor([0])].any()


@pytest.mark.parametrize(
    ("src", "length", "bm", "bn"),
    [
        # the route alone on a grid, tiles cutting regions (the pair path's per-tile counts)
        ("pattern p { layout grid(y = 6, x = 8)\n ~route(topk = 1, block = (2, 4), qblock = (3, 4)) }", 48, 8, 16),
        (
            "pattern p { layout grid(y = 6, x = 6)\n"
            " route(topk = 2, block = (3, 2), qblock = (1, 6), among = causal) }",
            36,
            12,
            6,
        ),
        ("pattern p { layout grid(y = 6, x = 6)\n route(topk = 1, block = (2, 3), among = causal) }", 36, 6, 12),
    ],
)
def test_route_alone_on_grids_matches_the_oracle(src, length, bm, bn):
    from tests.unit.test_plan_route import _check_plan

    _check_plan(src, length, length, bm, bn)
