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
from patterndsl.analysis import routegrid, routeplan
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
