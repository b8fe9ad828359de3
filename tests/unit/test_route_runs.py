"""Route patterns planned as runs (analysis/routeruns.py) equal their expanded, tile-by-tile form.

``routeruns.classify`` keeps a route pattern's tiles as runs of key tiles per query tile (state,
open and route-mask flags constant on a run). Listed tile by tile (``RoutedRuns.expanded``) they
must equal the pair-by-pair plan (``routeplan.classify_by_pairs``, itself checked against the
brute-force oracle in test_plan_route.py): keys, states, route masks, open flags and the forced
choice. A plan built from runs keeps them (no tile listed until an executor reads the lists), and
its ``route_mask`` (``TileFlags``) lists the same flags.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl.analysis import engine as eng
from patterndsl.analysis import routeplan, routeruns
from patterndsl.analysis.plan import TileFlags, TileList
from patterndsl.sizes import Sizes

AMONG = ["causal", "causal - window({w})", "causal - blocks({b})", "causal & ~(sink({s}) | window({w}))", "full"]
BODY = [
    "causal & (window({w}) | {r})",
    "causal & (blocks({b}) | {r})",
    "{r}",
    "causal - {r}",
    "sink({s}) | {r}",
    "causal & (where(q // {b} - k // {b} <= 1) | {r})",
]


def _case(seed: int, nested: bool = False):
    """A random 1-D route pattern (one route, one polarity), lengths and tiles that :mod:`routeruns` takes.

    ``nested``: tiles of whole groups and blocks (several groups a tile), so tiles the static bounds
    leave open are decided on cells of groups x one block (:func:`routeruns._tile_bounds`).
    """
    gen = np.random.default_rng(seed)
    block = int(gen.choice([4, 6, 8, 16]))
    qblock = int(gen.choice([1, 2, 4, block]))
    w, s = int(gen.integers(1, 20)), int(gen.integers(1, 9))
    among = str(gen.choice(AMONG)).format(w=w, b=block, s=s)
    route = f"route(topk = {int(gen.integers(1, 4))}, block = {block}, qblock = {qblock}, among = {among})"
    body = str(gen.choice(BODY)).format(w=w, b=block, s=s, r=route)
    lq = int(gen.integers(20, 160)) // qblock * qblock + qblock
    lk = lq + int(gen.choice([0, 0, qblock, 3 * qblock]))
    tile = (int(gen.choice([4, 8, 16, 12])), int(gen.choice([4, 8, 16, 24])))
    if nested:
        tile = (qblock * int(gen.choice([2, 4, 8])), block * int(gen.choice([1, 2])))
    return f"pattern p {{ {body} }}", lq, lk, tile


@pytest.mark.parametrize("seed,nested", [(s, False) for s in range(16)] + [(s, True) for s in range(100, 108)])
def test_runs_expand_to_the_pair_by_pair_plan(seed, nested):
    source, lq, lk, tile = _case(seed, nested)
    node = eng.rewrite_for_plan(patterndsl.compile(source).ir.default)
    sizes = Sizes(lq, lk)
    engine = eng.identity_engine(sizes, 0, tile)
    assert routeruns.usable(engine, node), source
    runs = routeruns.classify(engine, node)
    # runs are sorted, disjoint, non-empty, and never hold an empty tile
    key = runs.row * (runs.nkb + 1) + runs.lo
    assert (np.diff(key) > 0).all() and (runs.lo < runs.hi).all() and (runs.state > 0).all()
    assert (runs.hi[:-1] <= runs.lo[1:])[runs.row[:-1] == runs.row[1:]].all()
    got = runs.expanded()
    want = routeplan.classify_by_pairs(eng.identity_engine(sizes, 0, tile), node)
    for name in ("keys", "state", "route_mask", "open"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist(), (name, source, lq, lk, tile)
    ((prim, fixed),) = want.forced.items()
    assert got.forced[prim][1].tolist() == fixed[1].tolist()
    assert got.forced[prim][2].tolist() == fixed[2].tolist()


def test_tile_flags_read_like_the_bool_list():
    gen = np.random.default_rng(1)
    dense = torch.from_numpy(gen.integers(0, 3, size=(7, 9)).astype(np.int8))
    tl = TileList.from_dense(dense)
    flags = gen.random(tl.nnz) < 0.5
    tf = TileFlags.from_flags(flags, tl, 7, 9)
    assert tf.tolist() == flags.tolist() and len(tf) == tl.nnz
    assert tf.runs <= int(flags.sum())
    m, n = np.nonzero(dense.numpy())
    assert tf.at(m, n).tolist() == flags.tolist()
    assert not tf.at(np.array([0]), np.array([8])).any() or bool(dense[0, 8])
    empty = TileFlags.from_flags(np.zeros(tl.nnz, bool), tl, 7, 9)
    assert empty.runs == 0 and not empty.tensor().any()


def test_a_long_route_plan_stays_runs():
    # MoBA at 32K tokens in 128-token tiles: about 33 thousand tiles a head decided at run time,
    # held as a few runs per query tile, tile lists and route mask listed only when read
    route = "route(2, block = 512, qblock = 1, among = causal - blocks(512))"
    p = patterndsl.compile(f"pattern p {{ causal & (blocks(512) | {route}) }}")
    plan = p.plan(1 << 15, heads=2, block=(128, 128))
    g = plan.groups[0]
    assert "_listed" not in vars(g.tiles)
    nqb = plan.n_q_tiles
    assert len(g.runs) <= 3 * nqb and g.route_mask.runs <= 2 * nqb
    assert plan.stats.tiles_dynamic > 50 * len(g.runs)
    dense = plan.tiles()[0]
    assert int((dense > 0).sum()) == g.tiles.nnz == nqb * (nqb + 1) // 2
    # the flags list like the tiles: the route reads the tiles it decides, not the own block's
    assert g.route_mask.tensor().tolist() == (g.tiles.state == 3).tolist()


@pytest.mark.parametrize("seed", range(9))
def test_chosen_counts_by_binary_search_equal_the_listed_pairs(seed):
    # one run a group with non-decreasing starts and ends (searched), else listed: the same counts
    from patterndsl.analysis import routetiles

    gen = np.random.default_rng(seed)
    n_groups, n_blocks = int(gen.integers(1, 40)), int(gen.integers(1, 30))
    lo = np.sort(gen.integers(0, n_blocks, n_groups))
    hi = np.maximum(np.sort(gen.integers(0, n_blocks + 1, n_groups)), lo + (seed % 2 == 0))  # even: no empty group
    if seed % 3 == 2:
        gen.shuffle(hi)  # ends out of order: the listed path
        hi = np.maximum(hi, lo)
    if seed % 3 == 1:
        lo, hi = np.concatenate([lo, lo + n_blocks + 1]), np.concatenate([hi, hi + n_blocks + 1])  # two runs a group
        group = np.concatenate([np.arange(n_groups)] * 2)
    else:
        group = np.arange(n_groups)
    keep = lo < hi
    order = np.lexsort((lo[keep], group[keep]))
    table = routetiles.RunTable(group[keep][order], lo[keep][order], hi[keep][order], 2 * n_blocks + 2)
    g0 = gen.integers(0, n_groups + 3, 50)
    g1 = g0 + gen.integers(1, 9, 50)
    b = gen.integers(0, 2 * n_blocks + 2, 50)
    want = [
        sum(((table.group == a) & (table.lo <= bb) & (bb < table.hi)).any() for a in range(a0, a1))
        for a0, a1, bb in zip(g0, g1, b, strict=True)
    ]
    assert routeruns._chosen_count(table, g0, g1, b).tolist() == want
    lo_t, hi_t = (t.numpy() for t in table._table())
    assert routeruns._chosen_count_listed(lo_t, hi_t, g0, g1, b).tolist() == want
