"""Route plans too large for memory are refused up front (analysis/routelimit.py).

The pair-by-pair route plan lists one entry per (candidate pair, tile it meets); ``routelimit``
counts those entries from the groups' and blocks' tiles before anything is listed and raises a
PatternError at the route, naming the limit and the length that fits. BiFormer's routing on 4
video frames of 256 x 256 (4,096 regions of 8 x 8 a frame, too many for the tables of
``routetiles``) plans as runs (``routegrid``, grids of any rank whose rows hold whole tiles; on rows of
200 positions, which 128-token tiles do not divide, ``routepieces``); two such routes in one pattern go
pair by pair and would list 655 million entries each: refused, without allocating them, in a fraction
of a second.
"""

from __future__ import annotations

import re
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl import ir
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routegrid, routelimit, routetiles
from patterndsl.errors import PatternError
from patterndsl.sizes import Sizes

BIFORMER = (Path(__file__).resolve().parents[2] / "examples" / "biformer.pdsl").read_text()


#: BiFormer's routing on video frames: 3-D boxes, planned as runs (analysis/routegrid.py).
VIDEO = "pattern v {{ layout grid(t = 4, y = 256, x = {x})\n route(topk = 4, block = (1, 8, 8)) }}"
#: Two such routes on rows of 200 positions (one alone is planned as runs by routepieces).
TWO_ROUTES = (
    "pattern v { layout grid(t = 4, y = 256, x = 200)\n"
    " route(topk = 4, block = (1, 8, 8)) | route(topk = 2, block = (1, 8, 8)) }"
)


def test_a_route_beyond_the_limit_is_refused_at_the_route_before_allocating():
    # two routes: no run form, planned pair by pair
    pattern = patterndsl.compile(TWO_ROUTES)
    tracemalloc.start()
    start = time.process_time()
    try:
        with pytest.raises(PatternError) as info:
            pattern.plan(4 * 256 * 200, heads=4, block=(128, 128))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - start < 5.0
    assert peak < 256 << 20  # the 655 million entries (tens of GB) were never listed
    err = info.value
    assert err.span is not None and err.span.line == 2  # the route(...) line
    text = str(err)
    assert "655,360,000 (candidate pair, tile) entries" in text
    assert f"limit of {routelimit.MAX_INCIDENCES:,}" in text
    fits = int(re.search(r"about ([\d,]+) tokens fit", text).group(1).replace(",", ""))
    assert 0 < fits < 204800


def test_a_video_route_plans_as_runs_where_pairs_were_refused(monkeypatch):
    # the billion entries of 4 frames of 256 x 256: 3-D boxes laid out as runs, like BiFormer in 2-D
    from patterndsl.analysis import routegrid

    taken = []
    classify = routegrid.classify
    monkeypatch.setattr(routegrid, "classify", lambda e, n: taken.append(classify(e, n)) or taken[-1])
    pattern = patterndsl.compile(VIDEO.format(x=256))
    tracemalloc.start()
    start = time.process_time()
    try:
        plan = pattern.plan(4 * 256 * 256, heads=4, block=(128, 128))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - start < 5.0 and peak < 64 << 20
    assert len(taken) == 1 and taken[0] is not None  # the run form, not the pairs
    (group,) = plan.groups
    assert len(group.runs.row) == 2048  # one run a query tile: every tile may be chosen
    assert plan.stats.tiles_dynamic == 4 * 2048 * 2048 and plan.stats.tiles_full == 0


def test_biformer_on_a_grid_plans_as_runs_where_pairs_were_refused():
    # the same billion entries in 2-D: BiFormer's grid routes are runs (analysis/routegrid.py)
    pattern = patterndsl.compile(BIFORMER, "biformer", H=512, W=512)
    tracemalloc.start()
    start = time.process_time()
    try:
        plan = pattern.plan(512 * 512, heads=4, block=(128, 128))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.process_time() - start < 5.0 and peak < 64 << 20
    (group,) = plan.groups
    assert len(group.runs.row) == 2048  # one run a query tile: every tile may be chosen
    assert plan.stats.tiles_dynamic == 4 * 2048 * 2048 and plan.stats.tiles_full == 0


@pytest.mark.parametrize(
    "source",
    [
        "pattern p { layout grid(y = 16, x = 24)\n route(topk = 2, block = (4, 4)) }",
        "pattern p { layout grid(y = 16, x = 24)\n route(topk = 2, block = (4, 8), among = neighborhood(5)) }",
        "pattern p { causal & (window(5) | route(topk = 2, block = 8, qblock = 4, among = causal - window(5))) }",
    ],
)
def test_the_count_is_the_pair_by_pair_plans_entries(source, monkeypatch):
    pir = patterndsl.compile(source).ir
    node = eng.rewrite_for_plan(pir.default)
    length = 384
    engine = eng.identity_engine(Sizes(length, length, pir.layout), 0, (16, 24))
    ((prim, _),) = ir.polarities(node).items()
    keys = engine.route_candidates(prim)[0]
    listed = len(engine.route_incidence(prim, keys)[0])
    bound = routelimit.incidences(engine, prim)  # within the limit: every pair counted as a candidate
    assert bound >= listed and (bound == listed or prim.arg("among") != ir.Prim("full"))
    # with a limit below the count (and the bound), the candidates' count is the one compared
    monkeypatch.setattr(routelimit, "MAX_INCIDENCES", listed - 1)
    fresh = eng.identity_engine(Sizes(length, length, pir.layout), 0, (16, 24))
    assert routelimit.incidences(fresh, prim) == listed
    with pytest.raises(PatternError) as info:
        routelimit.check(fresh, node)
    assert info.value.span is not None and f"{listed:,} (candidate pair, tile) entries" in str(info.value)
    monkeypatch.setattr(routelimit, "MAX_INCIDENCES", listed)
    routelimit.check(fresh, node)


def test_a_refused_plan_is_refused_by_plan_and_a_small_one_still_plans(monkeypatch):
    tables = patterndsl.compile(BIFORMER, "biformer", H=32, W=32).plan(1024, heads=1, block=(64, 64))
    monkeypatch.setattr(routetiles._DenseGeometry, "MAX_ENTRIES", 1)  # force the pair-by-pair plan
    monkeypatch.setattr(routegrid, "geometry", lambda engine, node: None)  # (32-wide rows, 64-token tiles)
    pairs = patterndsl.compile(BIFORMER, "biformer", H=32, W=32).plan(1024, heads=1, block=(64, 64))
    assert pairs.groups[0].tiles.nnz == 16 * 16  # every tile may be chosen
    assert torch.equal(pairs.groups[0].tiles.to_dense(16, 16), tables.groups[0].tiles.to_dense(16, 16))
    monkeypatch.setattr(routelimit, "MAX_INCIDENCES", 10)
    with pytest.raises(PatternError, match="limit of 10"):
        patterndsl.compile(BIFORMER, "biformer", H=32, W=32).plan(1024, heads=1, block=(64, 64))
