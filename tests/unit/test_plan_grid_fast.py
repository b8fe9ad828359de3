"""Grid plans at scale (issue 19): the binned key-tile candidates, per-axis counts and grid routes
against exact references at small sizes."""

from __future__ import annotations

import numpy as np
import pytest

from patterndsl.analysis.gridcands import Cells


def _brute(kalo, kahi, alo, ahi, rows, cols, nkb):
    meet = ((kahi[None] >= alo[:, None]) & (kalo[None] <= ahi[:, None])).all(2)
    i, t = np.nonzero(meet)
    return np.sort(rows[i] * nkb + cols[t])


@pytest.mark.parametrize("seed", range(6))
def test_cells_meeting_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    d = 1 + seed % 3
    n = int(rng.integers(1, 60))
    kalo = rng.integers(0, 40, (n, d))
    kahi = kalo + rng.integers(0, 9, (n, d))
    nq = int(rng.integers(1, 30))
    alo = rng.integers(-5, 45, (nq, d))
    ahi = alo + rng.integers(-2, 12, (nq, d))
    rows = np.sort(rng.choice(100, nq, replace=False)).astype(np.int64)
    cols = np.sort(rng.choice(200, n, replace=False)).astype(np.int64)
    cells = Cells(kalo, kahi)
    assert cells.usable
    got = cells.meeting(alo, ahi, rows, cols, 200)
    np.testing.assert_array_equal(got, _brute(kalo, kahi, alo, ahi, rows, cols, 200))


def _exact(source, length, heads=2, block=(16, 16), order="auto"):
    import torch

    import patterndsl as pd
    from patterndsl import semantics
    from patterndsl.analysis.plan import tile_reduce

    pattern = pd.compile(source)
    plan = pattern.plan(length, heads=heads, block=block, order=order)
    dense = semantics.mask(pattern.ir, length, length, heads)
    ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
    assert torch.equal(plan.tiles(), ref), source
    assert plan.stats.allowed_pairs == int(dense.sum())
    return plan


@pytest.mark.parametrize(
    "grid, body",
    [
        (
            (24, 20),
            "where(k.y >= q.y // 4 * 4 - 2 and k.y < q.y // 4 * 4 + 6"
            " and k.x >= q.x // 4 * 4 - 2 and k.x < q.x // 4 * 4 + 6)",
        ),
        ((16, 32), "where(k.y // 4 == q.y // 4 or k.x // 8 == q.x // 8)"),
        ((12, 10), "where(k.y >= q.y - 1 and k.y <= q.y + 2 and k.x // 3 == q.x // 3)"),
    ],
)
def test_per_axis_counts_match_the_dense_mask(grid, body):
    # HaloNet-like blocks with halos (tiles of several pieces when rows do not divide the tiles), and
    # a union: counted axis by axis from the sides' pieces, the classification's counts reused
    _exact(f"pattern p {{ layout grid(y = {grid[0]}, x = {grid[1]})\n {body} }}", grid[0] * grid[1])


@pytest.mark.parametrize("size, grid", [(5, (16, 32)), (3, (20, 12)), (7, (32, 16))])
def test_grid_neighborhood_orders_match_the_dense_mask(size, grid):
    source = f"pattern p {{ layout grid(y = {grid[0]}, x = {grid[1]})\n neighborhood({size}) }}"
    for order in ("identity", "auto"):
        _exact(source, grid[0] * grid[1], order=order)


GRID_AMONG = ["full", "neighborhood(3)", "where(k.y <= q.y)", "neighborhood(5) - neighborhood(1)"]
GRID_BODY = ["{r}", "neighborhood(3) | {r}", "where(k.x <= q.x) & {r}", "~{r}", "neighborhood(5) - {r}"]


def _grid_case(seed: int):
    """A random 2-D route pattern with box groups and blocks, on a grid whose rows hold whole tiles."""
    gen = np.random.default_rng(seed)
    box = (int(gen.integers(1, 5)), int(gen.integers(1, 6)))
    qbox = box if gen.random() < 0.6 else (int(gen.integers(1, 5)), int(gen.integers(1, 6)))
    tile = (int(gen.choice([4, 8, 16])), int(gen.choice([4, 8, 16])))
    w = int(np.lcm(*tile)) * int(gen.integers(1, 3))
    w = w if w >= 8 else 2 * w  # neighborhood(5) fits
    h = int(gen.integers(5, 13))
    among = str(gen.choice(GRID_AMONG))
    route = f"route(topk = {int(gen.integers(1, 5))}, block = {box}, qblock = {qbox}, among = {among})"
    body = str(gen.choice(GRID_BODY)).format(r=route)
    return f"pattern p {{ layout grid(y = {h}, x = {w})\n {body} }}", h * w, tile


@pytest.mark.parametrize("seed", range(12))
def test_grid_route_runs_expand_to_the_pair_by_pair_plan(seed):
    import patterndsl
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import routegrid, routeplan
    from patterndsl.sizes import Sizes

    source, length, tile = _grid_case(seed)
    pir = patterndsl.compile(source).ir
    node = eng.rewrite_for_plan(pir.default)
    sizes = Sizes(length, length, pir.layout)
    engine = eng.identity_engine(sizes, 0, tile)
    assert routegrid.geometry(engine, node) is not None, source
    runs = routegrid.classify(engine, node)
    key = runs.row * (runs.nkb + 1) + runs.lo
    assert (np.diff(key) > 0).all() and (runs.lo < runs.hi).all() and (runs.state > 0).all()
    got = runs.expanded()
    want = routeplan.classify_by_pairs(eng.identity_engine(sizes, 0, tile), node)
    for name in ("keys", "state", "route_mask", "open"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), (name, source, tile)
    ((prim, fixed),) = want.forced.items()
    assert got.forced[prim][1].tolist() == fixed[1].tolist()
    assert got.forced[prim][2].tolist() == fixed[2].tolist()
