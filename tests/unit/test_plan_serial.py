"""The planner's torch operations run with one intra-op thread, and the caller's count comes back."""

import torch

import patterndsl as pd
from patterndsl import semantics


def test_plan_evaluates_serially_and_restores_threads(monkeypatch):
    seen = []
    evaluate = semantics.evaluate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(semantics, "evaluate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = pd.compile("pattern p { window(32, 32, dilation = 8) | global(4) }")
        plan = p.plan(2048, block=(64, 64))
        assert plan.stats.elements_evaluated > 0 and seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_sampled_order_is_skipped_only_when_it_loses(monkeypatch, planned_orders):
    from patterndsl.analysis import planner

    planned = planned_orders
    # residue classes mod 128 make the window scatter over every tile: sampled, never planned whole
    strided = pd.compile("pattern p { causal & (window(127) | strided(128)) }").plan(2048, block=(16, 16))
    assert strided.order == "identity" and planned == ["identity"]
    # classes mod 8 make the dilated window a band: planned whole, and chosen
    planned.clear()
    dilated = pd.compile("pattern p { window(32, 32, dilation = 8) }").plan(2048, block=(16, 16))
    assert dilated.order == "classes mod 8" and planned == ["identity", "classes mod 8"]
    # with many tiles every order is estimated first: the classes' sample beats the identity's, so
    # they are planned whole first and the identity (estimated at 8x the pairs) never is
    planned.clear()
    monkeypatch.setattr(planner, "ESTIMATE_FIRST_TILES", 0)
    again = pd.compile("pattern p { window(32, 32, dilation = 8) }").plan(2048, block=(16, 16))
    assert again.order == "classes mod 8" and planned == ["classes mod 8"]
    assert torch.equal(again.tiles(), dilated.tiles()) and again.stats.extra["orders_tried"] == 2
    planned.clear()
    strided = pd.compile("pattern p { causal & (window(127) | strided(128)) }").plan(2048, block=(16, 16))
    assert strided.order == "identity" and planned == ["identity"]
    assert dilated.stats.allowed_pairs == int(pd.compile("pattern p { window(32, 32, dilation = 8) }").mask(2048).sum())


def test_input_bounds_merged_on_runs_as_on_dense_maps():
    import numpy as np

    from patterndsl.analysis.inputplan import _agreed
    from patterndsl.analysis.plan import DYNAMIC, Runs, TileList

    rng = np.random.default_rng(7)
    nqb, nkb = 9, 13
    for _ in range(30):
        a = torch.from_numpy(rng.choice([0, 0, 1, 2, 3], size=(nqb, nkb)).astype(np.int8))
        other = torch.from_numpy(rng.integers(0, 4, (nqb, nkb)).astype(np.int8))
        b = torch.where(torch.from_numpy(rng.random((nqb, nkb)) < 0.7), a, other)
        want = torch.where((a == b) & (a != DYNAMIC), a, torch.full_like(a, DYNAMIC))
        want[(a == 0) & (b == 0)] = 0
        ra, rb = (Runs.from_tiles(TileList.from_dense(x), nqb) for x in (a, b))
        got = _agreed(ra, rb, nkb)
        dense = torch.zeros(nqb, nkb, dtype=torch.int8)
        for r, lo, hi, s in zip(got.row.tolist(), got.lo.tolist(), got.hi.tolist(), got.state.tolist(), strict=True):
            assert (dense[r, lo:hi] == 0).all()
            dense[r, lo:hi] = s
        assert torch.equal(dense, want)
    empty = Runs.from_tiles(TileList.from_dense(torch.zeros(nqb, nkb, dtype=torch.int8)), nqb)
    assert len(_agreed(empty, empty, nkb)) == 0


def test_distinct_rows_by_key_matches_the_lexicographic_sort():
    import numpy as np

    from patterndsl.primitives.common import distinct_rows

    def reference(rows):
        uniq, inv = np.unique(rows, axis=0, return_inverse=True)
        return uniq, inv.reshape(-1)

    rng = np.random.default_rng(3)
    cases = [
        rng.integers(0, 5, (400, 3)),  # a small key range: the table
        rng.integers(-(10**6), 10**6, (300, 2)),  # a wide range: one sorted key
        np.stack([rng.integers(0, 2, 50) * (1 << 61), rng.integers(0, 1 << 40, 50)], 1),  # beyond int64: lexsort
        np.zeros((0, 3), np.int64),
    ]
    for rows in cases:
        rows = rows.astype(np.int64)
        got, want = distinct_rows(rows), reference(rows)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_plan_pauses_the_cyclic_collector_and_restores_it(monkeypatch):
    import gc

    from patterndsl.analysis import tiles

    seen = []
    box_segments = tiles.box_segments

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return box_segments(*args, **kwargs)

    monkeypatch.setattr(tiles, "box_segments", spy)
    assert gc.isenabled()
    pd.compile("pattern p { layout grid(y = 32, x = 32)\n neighborhood(5) }").plan(1024, block=(16, 16))
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        pd.compile("pattern p { layout grid(y = 32, x = 32)\n neighborhood(3) }").plan(1024, block=(16, 16))
        assert not gc.isenabled()  # a caller's paused collector stays paused
    finally:
        gc.enable()
