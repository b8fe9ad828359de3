"""Coarse-to-fine planning (analysis/hierarchy.py): the same plan as classifying every fine tile, in runs."""

from __future__ import annotations

import random
import time
import tracemalloc

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl import analysis
from patterndsl.analysis import hierarchy
from patterndsl.analysis.plan import Runs, RunTiles
from tests.unit.test_plan_property import check_plan, rand_case

LISTS = ("row_ptr", "cols", "state", "col_ptr", "rows", "state_t")


@pytest.fixture
def tiny_levels(monkeypatch):
    """Every plan goes through the coarse levels, from a first level of at most 4 tiles."""
    monkeypatch.setattr(hierarchy, "FLAT_TILES", 0)
    monkeypatch.setattr(hierarchy, "TOP_TILES", 4)
    monkeypatch.setattr(hierarchy, "PAYS", 0)


def _flat(monkeypatch, pir, lq, lk, heads, block):
    with monkeypatch.context() as m:
        m.setattr(hierarchy, "FLAT_TILES", 1 << 60)
        return analysis.plan(pir, lq, lk, heads, block=block, order="identity")


def _same(a, b):
    for ga, gb in zip(a.groups, b.groups, strict=True):
        for f in LISTS:
            assert torch.equal(getattr(ga.tiles, f), getattr(gb.tiles, f)), f
        for f in ("row", "lo", "hi", "state"):
            assert torch.equal(getattr(ga.runs, f), getattr(gb.runs, f)), f
        assert ga.tiles.nnz == gb.tiles.nnz
        assert (ga.forms is None) == (gb.forms is None)
    for f in ("allowed_pairs", "visited_pairs", "tiles_full", "tiles_partial", "tiles_empty", "elements_evaluated"):
        assert getattr(a.stats, f) == getattr(b.stats, f), f


SOURCES = [
    "causal",
    "causal | where(q < 30 and k < 30)",
    "causal & (blocks(8) | summary(8, 3))",
    "causal & window(20) | sink(4)",
    "window(10, dilation = 3) | global(4)",
    "where(abs(q // 8 - k // 8) <= 1) | global(8) | random(3, 8, 0)",
    "causal & ~window(15)",
    "where(q % 7 == k % 5)",
    "full",
    "empty",
]


@pytest.mark.parametrize("src", SOURCES)
def test_levels_give_the_flat_plan(src, tiny_levels, monkeypatch):
    pir = patterndsl.compile(f"pattern p {{ {src} }}").ir
    for lq, lk, block in ((120, 120, (4, 4)), (100, 130, (4, 8)), (133, 80, (8, 2))):
        got = check_plan(pir, lq, lk, 2, block, "identity")
        assert all(isinstance(g.tiles, RunTiles) for g in got.groups)
        _same(got, _flat(monkeypatch, pir, lq, lk, 2, block))


def test_random_patterns_through_levels_match_dense(tiny_levels):
    rng = random.Random(19)
    for _ in range(20):
        pir, lq, lk, heads, block = rand_case(rng)
        check_plan(pir, lq, lk, heads, block, "identity")


def test_runs_merged_sorts_and_joins_touching_runs():
    row, lo, hi = np.array([1, 0, 0, 0]), np.array([3, 5, 0, 2]), np.array([6, 6, 2, 5])
    runs = Runs.merged(row, lo, hi, np.array([2, 1, 2, 2], np.int8))
    assert runs.row.tolist() == [0, 0, 1] and runs.lo.tolist() == [0, 5, 3] and runs.hi.tolist() == [5, 6, 6]
    assert runs.state.tolist() == [2, 1, 2] and runs.tiles == 9
    empty = Runs.merged(*(np.zeros(0, np.int64),) * 3, np.zeros(0, np.int8))
    assert len(empty) == 0 and empty.tiles == 0


def test_levels_are_left_when_the_first_finds_few_full_tiles(monkeypatch):
    monkeypatch.setattr(hierarchy, "FLAT_TILES", 0)
    monkeypatch.setattr(hierarchy, "TOP_TILES", 4)
    window = analysis.plan(patterndsl.compile("pattern p { window(3) }").ir, 200, block=(8, 8))
    assert not isinstance(window.groups[0].tiles, RunTiles)
    causal = analysis.plan(patterndsl.compile("pattern p { causal }").ir, 200, block=(8, 8))
    assert isinstance(causal.groups[0].tiles, RunTiles)


def test_a_million_causal_tokens_plan_in_runs_without_listing_tiles():
    # 8,192 x 8,192 tiles, 33.6 million of them visited: the plan holds runs, not lists.
    p = patterndsl.compile("pattern p { causal | where(q < 1000 and k < 1000) }")
    length = 1 << 20
    tracemalloc.start()
    start = time.process_time()
    plan = p.plan(length, heads=4)
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    n = length // 128
    assert plan.stats.tiles_full + plan.stats.tiles_partial == 4 * (n * (n + 1) // 2 + 28)
    assert plan.stats.allowed_pairs == 4 * (length * (length + 1) // 2 + 1000 * 999 // 2)
    assert plan.groups[0].tiles.nnz == n * (n + 1) // 2 + 28
    assert peak < 64 << 20, peak
    assert seconds < 3.0, seconds
    assert "_listed" not in vars(plan.groups[0].tiles)


def test_consumers_read_a_plan_kept_in_runs(tiny_levels):
    # The CPU executor, the describe text and the closed forms of kernels read the runs or the lists.
    from patterndsl.analysis import describe
    from patterndsl.runtime import cpu
    from tests.reference import reference_attention

    p = patterndsl.compile("pattern p { causal | where(q < 20 and k < 20) }")
    plan = analysis.plan(p.ir, 100, 100, 2, block=(16, 16))
    assert isinstance(plan.groups[0].tiles, RunTiles)
    assert analysis.plan(patterndsl.compile("pattern c { causal }").ir, 100, block=(16, 16)).groups[0].forms is not None
    assert "tiles: " in describe(plan)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out, lse = cpu.forward(q, k, v, plan, 0.5)
    ref_out, ref_lse = reference_attention(q, k, v, p.mask(100, 100, 2)[None], 0.5)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


def test_key_columns_below_the_diagonal_are_partial_runs(tiny_levels):
    # Sparse Transformer "fixed": every tile below the diagonal is partial (two summary keys in each);
    # the column test proves whole coarse regions partial and counts their pairs without listing tiles.
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis.rewrite import simplify
    from patterndsl.sizes import Sizes

    pir = patterndsl.compile("pattern p { causal & (blocks(8) | summary(8, 2)) }").ir
    engine = eng.identity_engine(Sizes(256, 256, None, 1), 0, 8)
    layered = hierarchy.classify(engine, simplify(pir.default))
    _row, lo, hi = layered.partial
    assert int((hi - lo).sum()) > 200 and layered.partial_allowed > 0
    plan = check_plan(pir, 256, 256, 1, (8, 8), "identity")
    assert plan.stats.elements_evaluated == 0
    assert check_plan(pir, 250, 261, 1, (8, 8), "identity").stats.tiles_partial > 0


@pytest.mark.parametrize("src", ["causal & (window(15) | strided(16))", "causal & (window(7) | strided(8))"])
def test_periodic_regions_below_the_band_are_partial_runs(src, tiny_levels):
    # Sparse Transformer "strided": below the window every tile holds the same wrapped diagonal.
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis.rewrite import simplify
    from patterndsl.sizes import Sizes

    pir = patterndsl.compile(f"pattern p {{ {src} }}").ir
    layered = hierarchy.classify(eng.identity_engine(Sizes(512, 512, None, 1), 0, 16), simplify(pir.default))
    _row, lo, hi = layered.partial
    assert int((hi - lo).sum()) > 100 and layered.partial_allowed > 0
    check_plan(pir, 512, 512, 1, (16, 16), "identity")
    check_plan(pir, 500, 520, 1, (16, 8), "identity")
