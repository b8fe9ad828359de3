"""Grid routes planned as runs (analysis/routegrid.py) on 3-D grids and where a static part and the route
are both partial, against the pair-by-pair plan and the dense reference (issue 19).

``routegrid`` lays a grid route's candidates out as runs of blocks whose key tiles are ranges, box by box
of the block index space (:func:`routegrid.mixed_radix_boxes`), on grids of any rank. It must give
the tiles, states, route masks, open flags and forced choice of ``routeplan.classify_by_pairs`` (itself
checked against the brute-force oracle in test_plan_route.py), on small and odd sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import patterndsl
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routegrid, routeplan, routeruns
from patterndsl.sizes import Sizes

AMONG3 = [
    "full",
    "neighborhood(3)",
    "where(k.t <= q.t)",
    "neighborhood((3, 5, 5), dilation = (1, 2, 1)) - neighborhood(1)",
]
BODY3 = [
    "{r}",
    "neighborhood(3) | {r}",
    "where(k.t <= q.t) & {r}",
    "~{r}",
    "neighborhood((3, 5, 3), dilation = (1, 1, 2)) - {r}",
]


def _case3(seed: int):
    """A random 3-D route pattern with box groups and blocks, on a grid whose rows hold whole tiles."""
    gen = np.random.default_rng(seed)
    box = tuple(int(gen.integers(1, 4)) for _ in range(3))
    qbox = box if gen.random() < 0.5 else tuple(int(gen.integers(1, 4)) for _ in range(3))
    tile = (int(gen.choice([4, 8])), int(gen.choice([4, 8])))
    w = int(np.lcm(*tile)) * int(gen.integers(1, 3))
    w = w if w >= 8 else 2 * w
    t, h = int(gen.integers(3, 6)), int(gen.integers(10, 13))
    among = str(gen.choice(AMONG3))
    route = f"route(topk = {int(gen.integers(1, 5))}, block = {box}, qblock = {qbox}, among = {among})"
    body = str(gen.choice(BODY3)).format(r=route)
    return f"pattern p {{ layout grid(t = {t}, y = {h}, x = {w})\n {body} }}", t * h * w, tile


def equal_to_pairs(source: str, length: int, tile: tuple[int, int]):
    """Plan ``source`` by :func:`routegrid.classify` (which must take it) and compare with the pairs' plan."""
    pir = patterndsl.compile(source).ir
    node = eng.rewrite_for_plan(pir.default)
    sizes = Sizes(length, length, pir.layout)
    engine = eng.identity_engine(sizes, 0, tile)
    assert routegrid.geometry(engine, node) is not None, source
    runs = routegrid.classify(engine, node)
    assert runs is not None, source
    key = runs.row * (runs.nkb + 1) + runs.lo
    assert (np.diff(key) > 0).all() and (runs.lo < runs.hi).all() and (runs.state > 0).all()
    got = runs.expanded()
    want = routeplan.classify_by_pairs(eng.identity_engine(sizes, 0, tile), node)
    for name in ("keys", "state", "route_mask", "open"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), (name, source, tile)
    ((prim, fixed),) = want.forced.items()
    assert got.forced[prim][1].tolist() == fixed[1].tolist()
    assert got.forced[prim][2].tolist() == fixed[2].tolist()
    return engine


@pytest.mark.parametrize("seed", range(10))
def test_3d_grid_route_runs_expand_to_the_pair_by_pair_plan(seed):
    equal_to_pairs(*_case3(seed))


@pytest.mark.parametrize("radix", [(3,), (4, 5), (2, 3, 4), (3, 1, 5, 2)])
def test_mixed_radix_boxes_partition_every_range(radix):
    n = math.prod(radix)
    lo, hi = np.triu_indices(n + 1, 1)
    run, level, prefix, u0, u1 = routegrid.mixed_radix_boxes(lo, hi, radix)
    suffix = [math.prod(radix[j + 1 :]) for j in range(len(radix))]
    first = (prefix * np.take(radix, level) + u0) * np.take(suffix, level)
    last = (prefix * np.take(radix, level) + u1) * np.take(suffix, level)
    assert (u0 < u1).all() and (u1 <= np.take(radix, level)).all()
    assert np.bincount(run, minlength=len(lo)).max() <= 2 * len(radix) - 1
    for r in range(len(lo)):
        sel = np.flatnonzero(run == r)
        got = sorted(x for s in sel for x in range(first[s], last[s]))
        assert got == list(range(lo[r], hi[r]))


NESTED_BODY = [
    "neighborhood(3) | {r}",
    "neighborhood({n}, dilation = {d}) - {r}",
    "where(k.x <= q.x) & {r}",
    "neighborhood({n}, dilation = {d}) & ~{r}",
    "neighborhood(3) | ({r} & where(k.y >= q.y))",
]
NESTED_AMONG = ["full", "neighborhood(5) - neighborhood(1)", "where(k.x >= q.x)"]


def _nested_case(seed: int, rank: int):
    """A grid route whose static part is partial, with boxes nesting in the tiles along a row (uneven extents
    on the other axes, dilated neighborhoods)."""
    gen = np.random.default_rng(1000 + seed)
    sizes = [4, 8, 16] if rank == 2 else [4, 8]
    tile = (int(gen.choice(sizes)), int(gen.choice(sizes)))
    qx, rx = int(gen.choice([1, 2, 4])), int(gen.choice([1, 2, 4]))
    outer = [int(gen.integers(1, 4)) for _ in range(rank - 1)]
    qbox, box = (*[int(gen.integers(1, 4)) for _ in outer], qx), (*outer, rx)
    w = max(int(np.lcm(*tile)) * int(gen.integers(1, 5 - rank)), 8)
    extents = [int(gen.integers(5, 7)) for _ in range(rank - 2)] + [int(gen.integers(7, 12)), w]
    names = "tyx"[3 - rank :]
    layout = ", ".join(f"{a} = {n}" for a, n in zip(names, extents, strict=True))
    d = "(" + ", ".join(["1"] * (rank - 1) + ["2"]) + ")"
    among = str(gen.choice(NESTED_AMONG))
    route = f"route(topk = {int(gen.integers(1, 4))}, block = {box}, qblock = {qbox}, among = {among})"
    body = str(gen.choice(NESTED_BODY)).format(r=route, n=3, d=d)
    return f"pattern p {{ layout grid({layout})\n {body} }}", math.prod(extents), tile


@pytest.mark.parametrize("seed,rank", [(s, 2) for s in range(8)] + [(s, 3) for s in range(8, 14)])
def test_partial_grid_routes_are_decided_on_cells(seed, rank, monkeypatch):
    """Tiles where the static part and the route are both partial: on cells, never element by element
    through a fixed choice (spied), and equal to the pairs' plan."""
    source, length, tile = _nested_case(seed, rank)
    cells, fixed = [], []
    bounds = routeruns._tile_bounds
    monkeypatch.setattr(routeruns, "_tile_bounds", lambda *a: cells.append(len(a[3])) or bounds(*a))
    fixing = eng.Engine.fixing
    classify = routegrid.classify

    def spied(engine, node):
        monkeypatch.setattr(eng.Engine, "fixing", lambda self, f: fixed.append(f) or fixing(self, f))
        try:
            return classify(engine, node)
        finally:
            monkeypatch.setattr(eng.Engine, "fixing", fixing)

    monkeypatch.setattr(routegrid, "classify", spied)
    equal_to_pairs(source, length, tile)
    assert cells and cells[0] > 0 and not fixed, (source, tile)


def test_the_benchmarks_partial_route_evaluates_no_element():
    """``neighborhood(7) | route(among = neighborhood(17) - neighborhood(7))`` at 16K tokens (the case of
    benchmarks/plan_scaling.py): every tile decided on cells or counts, none element by element."""
    source = (
        "pattern p { layout grid(y = 128, x = 128)\n"
        " neighborhood(7) | route(topk = 4, block = (8, 8), among = neighborhood(17) - neighborhood(7)) }"
    )
    plan = patterndsl.compile(source).plan(128 * 128, heads=4, block=(128, 128))
    assert plan.stats.elements_evaluated == 0
    assert plan.stats.tiles_partial == 4 * 896 and plan.stats.tiles_dynamic == 4 * 2176


@pytest.mark.parametrize(
    "layout, body",
    [
        (
            "t = 3, y = 4, x = 8",
            "neighborhood((3, 3, 3), causal = (true, false, false)) | route(topk = 2, block = (1, 2, 4))",
        ),
        (
            "y = 6, x = 16",
            "neighborhood(3) | route(topk = 2, block = (2, 4), among = neighborhood(5) - neighborhood(1))",
        ),
    ],
)
def test_grid_routes_planned_as_runs_run_on_the_cpu(layout, body, monkeypatch):
    """A 3-D route and a partial 2-D one, planned by routegrid (spied), attend as the dense reference says."""

    import patterndsl.runtime as rt
    from tests.reference import check_cpu_against_reference

    taken = []
    classify = routegrid.classify
    monkeypatch.setattr(routegrid, "classify", lambda e, n: taken.append(classify(e, n)) or taken[-1])
    monkeypatch.setattr(rt, "CPU_BLOCK", (8, 8))
    p = patterndsl.compile(f"pattern p {{ layout grid({layout})\n {body} }}")
    check_cpu_against_reference(p, 96, seed=2)
    assert taken and all(t is not None for t in taken)


@pytest.mark.parametrize("seed,rank", [(4, 2), (9, 3)])
def test_cells_laid_out_a_few_tiles_at_a_time_give_the_same_plan(seed, rank, monkeypatch):
    monkeypatch.setattr(routeruns, "CELL_CHUNK", 64)  # a few tiles a chunk
    equal_to_pairs(*_nested_case(seed, rank))
