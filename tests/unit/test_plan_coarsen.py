"""Coarse levels in residue-class orders (analysis/coarsen.py + hierarchy): the same tiles as the dense mask."""

from __future__ import annotations

import random

import numpy as np
import pytest

import patterndsl
from patterndsl import analysis, ir
from patterndsl.analysis import coarsen, reorder, tiles
from patterndsl.analysis.plan import RunTiles
from tests.unit.test_plan_hierarchy import tiny_levels  # noqa: F401  (fixture)
from tests.unit.test_plan_property import P, check_plan, rand_node


def _positions(side: tiles.Side, t: int) -> list[int]:
    out = []
    for p in range(side.ptr[t], side.ptr[t + 1]):
        a, s, n = int(side.a[p, 0]), int(side.s[p, 0]), int(side.n[p, 0])
        out += [a + s * i for i in range(n)]
    return sorted(out)


def test_coarse_tiles_hold_their_fine_tiles_positions_in_few_pieces():
    rng = random.Random(7)
    for _ in range(40):
        length, offset, m = rng.randint(1, 300), rng.randint(0, 9), rng.randint(2, 9)
        block, factor = rng.randint(1, 16), rng.choice([2, 4, 8])
        segments = tiles.class_segments(length, offset, m)
        fine = tiles.build_side(segments, length, block, offset, (length + offset,), False)
        coarse = coarsen.coarse_side(fine, factor)
        assert coarse.n_tiles == -(-fine.n_tiles // factor) and coarse.order is fine.order
        assert np.array_equal(coarse.starts, np.minimum(np.arange(coarse.n_tiles + 1) * block * factor, length))
        for c in range(coarse.n_tiles):
            under = range(c * factor, min((c + 1) * factor, fine.n_tiles))
            assert _positions(coarse, c) == sorted(x for t in under for x in _positions(fine, t))
            assert coarse.ptr[c + 1] - coarse.ptr[c] <= m + 1  # one piece per class met, at most


@pytest.fixture
def classes_only(monkeypatch):
    """Plans in the residue-class orders alone (the identity is not offered)."""
    offered = reorder.candidates
    monkeypatch.setattr(reorder, "candidates", lambda *a: offered(*a)[1:] or offered(*a))


SOURCES = [
    ("causal & strided(8)", 200, 200, (4, 4)),
    ("causal & strided(6)", 150, 190, (4, 8)),
    ("causal & (window(7) | strided(8))", 190, 140, (8, 4)),
    ("causal & window(31, dilation = 4) | sink(3)", 180, 180, (4, 4)),
    ("strided(5) - window(10, 10) | global(2)", 170, 170, (5, 5)),
]


@pytest.mark.parametrize(("src", "lq", "lk", "block"), SOURCES)
def test_class_orders_through_levels_match_dense(src, lq, lk, block, tiny_levels, classes_only):  # noqa: F811
    pir = patterndsl.compile(f"pattern p {{ {src} }}").ir
    got = check_plan(pir, lq, lk, 2, block, "auto")
    assert got.order.startswith("classes") and all(isinstance(g.tiles, RunTiles) for g in got.groups)


def test_random_patterns_in_class_orders_through_levels_match_dense(tiny_levels, classes_only):  # noqa: F811
    rng = random.Random(1919)
    layered = 0
    for _ in range(12):
        node = ir.inter(rand_node(rng, None), ir.union(P("strided", stride=rng.randint(2, 6)), rand_node(rng, None)))
        lq = rng.randint(40, 120)
        lk = lq if rng.random() < 0.5 else rng.randint(40, 120)
        block = (rng.choice([2, 3, 4, 8]), rng.choice([2, 4, 5, 8]))
        got = check_plan(ir.PatternIR("t", (), None, (), node), lq, lk, rng.choice([1, 2]), block, "auto")
        layered += got.order.startswith("classes") and isinstance(got.groups[0].tiles, RunTiles)
    assert layered >= 6


def test_a_million_tokens_of_causal_strided_plan_in_class_runs():
    plan = patterndsl.compile("pattern p { causal & strided(64) }").plan(1 << 20, heads=1)
    assert plan.order == "classes mod 64" and isinstance(plan.groups[0].tiles, RunTiles)
    classes, per = 64, (1 << 20) // 64 // 128  # each class pair: a causal triangle of 128 x 128 tiles
    assert plan.stats.tiles_partial == classes * per
    assert plan.stats.tiles_full == classes * per * (per - 1) // 2
    assert plan.stats.allowed_pairs == classes * (1 << 14) * ((1 << 14) + 1) // 2


@pytest.mark.parametrize("src", ["causal & strided(8)", "causal & (blocks(8) | summary(8, 3))"])
def test_parts_count_the_tiles_under_runs(src, tiny_levels):  # noqa: F811
    # the split into parts prices an order by its tiles: those kept as runs count too
    from patterndsl.analysis import parts, planner
    from patterndsl.sizes import Sizes

    pir = patterndsl.compile(f"pattern p {{ {src} }}").ir
    for candidate in reorder.candidates([pir.default], None, 200, 200, (4, 4)):
        cand = planner.plan_order(candidate, [(pir.default, [0])], Sizes(200, 200, None, 1), 4, 4)
        assert any(g.layered is not None for g in cand.groups)
        tiles = analysis.plan(pir, 200, 200, 1, block=(4, 4), orders=[candidate]).tiles()[0]
        visited = tiles > 0
        want = (int(visited.sum()), (int(visited.any(1).sum()), int(visited.any(0).sum())))
        assert parts._visited(cand) == want
