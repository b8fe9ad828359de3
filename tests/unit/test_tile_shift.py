"""A grid route's tiles decided once per class of tiles equal up to a shift of the grid's outer axes
(analysis/tileshift.py, issue 19): the plan must be the pairs' plan and the one deciding every tile, on grids
where classes exist (borders of the neighborhoods and of the candidates in the interior's reach, dilation,
3-D, sizes not multiples of the boxes, ``qblock`` unlike ``block``, routes under a difference or a
complement, candidates that change away from the borders), and tiles must really be copied."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import patterndsl
from patterndsl import ir
from patterndsl.analysis import cellshift, routegrid, routeruns, routetiles, tileshift
from patterndsl.analysis import engine as eng
from patterndsl.sizes import Sizes
from tests.unit.test_route_grid_runs import equal_to_pairs

BENCH = "neighborhood(7) | route(topk = 4, block = (8, 8), among = neighborhood(17) - neighborhood(7))"
NB5 = "neighborhood(5) | route(topk = "
RING = "route(topk = 4, block = (8, 8), among = neighborhood(17) - neighborhood(7))"
CASES = [
    # (grid, body, tile): the benchmark's route and variants, tiles small enough for classes
    ("y = 64, x = 64", BENCH, (16, 16)),
    ("y = 96, x = 80", BENCH, (16, 16)),
    ("y = 70, x = 64", BENCH, (32, 16)),  # a box row cut by the border
    ("y = 64, x = 48", f"neighborhood(17) - {RING}", (16, 16)),  # the route at -1
    ("y = 72, x = 32", f"neighborhood(13) & ~{RING}", (16, 16)),
    (
        "y = 66, x = 32",
        "neighborhood((5, 3), dilation = (2, 1)) | route(topk = 2, block = (4, 4),"
        " among = neighborhood((9, 5), dilation = (2, 1)) - neighborhood((5, 3), dilation = (2, 1)))",
        (16, 16),
    ),
    (
        "y = 75, x = 48",
        "neighborhood(5) | route(topk = 3, block = (4, 8), qblock = (6, 4),"
        " among = neighborhood(13) - neighborhood(5))",
        (16, 16),
    ),
    (
        "y = 52, x = 32",
        "neighborhood((5, 3), causal = (true, false)) | route(topk = 6, block = (2, 4), qblock = (4, 4),"
        " among = neighborhood(11) - neighborhood((5, 3), causal = (true, false)))",
        (8, 16),
    ),
    (
        "t = 7, y = 26, x = 16",
        "neighborhood(3) | route(topk = 2, block = (2, 4, 4), among = neighborhood((3, 9, 9)) - neighborhood(3))",
        (8, 8),
    ),
    # groups forced near the borders only (fewer candidates than topk): tiles there full under the forced choice
    ("y = 48, x = 32", NB5 + "20, block = (4, 4), among = neighborhood(13) - neighborhood(5))", (8, 8)),
    # candidates that change at row 24, away from the borders: only the tables' check cuts the classes there
    ("y = 48, x = 32", NB5 + "20, block = (2, 4), among = neighborhood(13) & where(k.y >= 24))", (8, 16)),
    ("y = 48, x = 32", NB5 + "8, block = (4, 4), among = neighborhood(13) & where(k.y >= 24))", (8, 8)),
]


def _runs(source: str, tile):
    pir = patterndsl.compile(source).ir
    length = pir.layout.size
    engine = eng.identity_engine(Sizes(length, length, pir.layout), 0, tile)
    return routegrid.classify(engine, eng.rewrite_for_plan(pir.default))


@pytest.mark.parametrize("grid, body, tile", CASES)
def test_tiles_by_class_give_the_pairs_plan_and_the_tile_by_tile_one(grid, body, tile, monkeypatch):
    source = f"pattern p {{ layout grid({grid})\n {body} }}"
    length = patterndsl.compile(source).ir.layout.size
    calls = []
    bounds = routeruns._tile_bounds
    monkeypatch.setattr(routeruns, "_tile_bounds", lambda *a: calls.append(a) or bounds(*a))
    before = cellshift.TALLY.tiles
    equal_to_pairs(source, length, tile)
    assert cellshift.TALLY.tiles > before  # some tiles copied from their class
    got = _runs(source, tile)
    args = list(calls)
    by_class = [bounds(*a) for a in args]
    monkeypatch.setattr(tileshift, "tile_classes", lambda *a: None)
    want = _runs(source, tile)
    for name in ("row", "lo", "hi", "state", "open", "route_mask"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), name
    # the tiles' states under each choice, before the plan merges them
    for a, states in zip(args, by_class, strict=True):
        assert [s.tolist() for s in states] == [s.tolist() for s in bounds(*a)]


def test_rows_link_only_where_windows_and_candidates_repeat():
    """The benchmark's route on 64 rows: rows 8 apart (the boxes) link from box row 2 on (box row 1 has the
    whole ``neighborhood(7)`` windows, and its candidates shifted by a block row are box row 2's) up to the
    last box row, whose candidates the bottom border cuts."""
    source = f"pattern p {{ layout grid(y = 64, x = 64)\n {BENCH} }}"
    captured = []
    classes = tileshift.classes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tileshift, "classes", lambda *a: captured.append(classes(*a)) or captured[-1])
        _runs(source, (16, 16))
    ((rep,),) = captured
    assert rep.tolist() == [*range(16), *list(range(8, 16)) * 5, *range(56, 64)]


def test_tiles_whose_static_states_differ_are_not_one_class(monkeypatch):
    """The static bounds' states are part of a class: a tile given other ones leaves its class."""
    source = f"pattern p {{ layout grid(y = 64, x = 64)\n {BENCH} }}"
    calls = []
    bounds = routeruns._tile_bounds
    monkeypatch.setattr(routeruns, "_tile_bounds", lambda *a: calls.append(a) or bounds(*a))
    _runs(source, (16, 16))
    ((engine, node, geo, keys, tables, _sign, static, _cache),) = calls
    nodes = [eng.rewrite_for_plan(ir.route_bound(node, lower)) for lower in (True, False)]
    _, _, inverse = tileshift.tile_classes(engine, geo, nodes, keys, tables, static)
    i = int(np.flatnonzero(np.bincount(inverse)[inverse] > 1)[0])  # a tile sharing its class
    low = static[0].copy()
    low[i] = eng.EMPTY if low[i] != eng.EMPTY else eng.PARTIAL
    _, (rep_low, rep_up), moved = tileshift.tile_classes(engine, geo, nodes, keys, tables, (low, static[1]))
    assert rep_low[moved].tolist() == low.tolist() and rep_up[moved].tolist() == static[1].tolist()
    assert len(set(moved[inverse == inverse[i]].tolist())) == 2


@pytest.mark.parametrize("radix", [1, 3, 4])
@pytest.mark.parametrize("stride", [1, 2, 5])
def test_least_digit_of_an_index_range(radix, stride):
    n = radix * stride * 3
    lo, hi = np.triu_indices(n + 1, 1)
    got = tileshift._min_digit(lo, hi, stride, radix)
    want = [min(i // stride % radix for i in range(a, b)) for a, b in zip(lo, hi, strict=True)]
    assert got.tolist() == want


def _brute_links(pairs: set, ng, nbk, a: int, sq: int, sb: int) -> list[bool]:
    """Per group box row on axis ``a``: every outer box there holds its partner's ``sq`` rows lower, blocks
    ``sb`` block rows higher, pair for pair (the link :func:`tileshift._table_links` decides on runs)."""
    outer = ng[:-1]
    by_box: dict = {}
    for g, b in pairs:
        by_box.setdefault(g // ng[-1], set()).add((g, b))
    out = [True] * ng[a]
    for box in range(math.prod(outer)):
        d = np.unravel_index(box, outer)
        if d[a] < sq:
            out[d[a]] = False
            continue
        moved = set()
        for g, b in by_box.get(box, ()):
            gd, bd = list(np.unravel_index(g, ng)), list(np.unravel_index(b, nbk))
            if bd[a] < sb:
                out[d[a]] = False
            gd[a] -= sq
            bd[a] -= sb
            moved.add((int(np.ravel_multi_index(gd, ng)), int(np.ravel_multi_index(bd, nbk))) if bd[a] >= 0 else None)
        partner = int(np.ravel_multi_index(tuple(x - sq * (i == a) for i, x in enumerate(d)), outer))
        if moved != by_box.get(partner, set()):
            out[d[a]] = False
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "ng, nbk, sq, sb", [((8, 3), (8, 4), 1, 1), ((6, 2), (12, 3), 1, 2), ((3, 7, 2), (3, 7, 3), 1, 1)]
)
def test_table_links_are_the_pairs_shifted_box_for_box(seed, ng, nbk, sq, sb):
    """Tables repeating from box row to box row (blocks a fixed offset from their group's) but for one change
    (a block dropped; one added; on 3-D grids, a block on the first row of its axis whose index shifted lands
    on its partner's block of the previous frame; a block past every other, making one box's runs a prefix
    of its partner's; a block of a box's first group at its partner's second group): links exactly where the
    pairs repeat."""
    gen = np.random.default_rng(seed)
    offsets = {(int(dy), int(dx)) for dy, dx in gen.integers(-1, 2, (5, 2))}
    pairs = set()
    for g in range(math.prod(ng)):
        gd = np.unravel_index(g, ng)
        for dy, dx in offsets:
            bd = [*(x * sb // sq for x in gd[:-1]), gd[-1] + dx]
            bd[-2] += dy  # the offset on the last outer axis, the column on the last axis
            if all(0 <= x < n for x, n in zip(bd, nbk, strict=True)):
                pairs.add((g, int(np.ravel_multi_index(bd, nbk))))
    n_g, n_b = math.prod(ng), math.prod(nbk)
    g = int(gen.integers(n_g))
    gd = [int(x) for x in np.unravel_index(g, ng)]
    if seed == 0:
        pairs.discard(sorted(pairs)[int(gen.integers(len(pairs)))])
    elif seed == 1:
        pairs.add((g, int(gen.integers(n_b))))
    elif seed == 5:
        # a block of a box's first group at the partner box's second one: the same runs, other groups
        gd, bd = [0] * len(ng), [0] * len(ng)
        gd[-2], bd[-2] = 2, 2 * sb
        pairs = {(int(np.ravel_multi_index(gd, ng)), int(np.ravel_multi_index(bd, nbk)))}
        gd[-2], gd[-1], bd[-2] = 2 - sq, 1, sb
        pairs.add((int(np.ravel_multi_index(gd, ng)), int(np.ravel_multi_index(bd, nbk))))
    elif seed == 2 and len(ng) == 3:
        # axis 1: (t, 0, x) shifted by a block row is (t - 1, last, x) as an index
        gd[0], gd[1] = max(gd[0], 1), max(gd[1], 1)
        g = int(np.ravel_multi_index(gd, ng))
        pairs.add((g, int(np.ravel_multi_index((gd[0], 0, 0), nbk))))
        pairs.add((g - sq * ng[-1], int(np.ravel_multi_index((gd[0] - 1, nbk[1] - 1, 0), nbk))))
    else:
        gd[-1] = ng[-1] - 1  # the last group of its box
        pairs.add((int(np.ravel_multi_index(gd, ng)), n_b - 1))
    g, b = np.array(sorted(pairs)).T
    table = routetiles._merged(g, b, b + 1, n_b)
    geo = SimpleNamespace(ng=ng, nbk=nbk, ngx=ng[-1])
    for a in range(len(ng) - 1):
        got = tileshift._table_links(table, geo, a, sq, sb).tolist()
        want = _brute_links(pairs, ng, nbk, a, sq, sb)
        assert got == want, a
        assert any(want) and not all(want[sq:]), a  # links and a change
