"""Candidates of bands in residue-class orders (analysis/classbands.py): the bands mapped through the order."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl import ir, semantics
from patterndsl.analysis import classbands, reorder, tiles
from patterndsl.analysis import engine as eng
from patterndsl.analysis.classify import Env
from patterndsl.analysis.plan import tile_reduce
from patterndsl.sizes import Sizes
from tests.unit.test_plan_property import P, check_plan


def _band(rng) -> ir.Node:
    kind = rng.random()
    if kind < 0.3:
        return P("window", before=rng.randint(0, 12), after=rng.randint(0, 6), dilation=rng.choice([1, 1, 2, 3, 4]))
    if kind < 0.55:
        return P("strided", stride=rng.randint(2, 9))
    if kind < 0.8:
        return P("causal")
    # a half-plane of q - k: a band too (``where``'s band rule)
    c = rng.randint(-9, 9)
    return patterndsl.compile(f"pattern p {{ where(q - k {'>=' if rng.random() < 0.5 else '<='} {c}) }}").ir.default


def _band_node(rng, depth=0) -> ir.Node:
    if depth >= 2 or rng.random() < 0.3:
        return _band(rng)
    items = [_band_node(rng, depth + 1) for _ in range(rng.randint(2, 3))]
    return ir.inter(*items) if rng.random() < 0.5 else ir.union(*items)


def _side(length, offset, m, block, extent):
    return tiles.build_side(tiles.class_segments(length, offset, m), length, block, offset, (extent,), False)


def _dense_tiles(mask: torch.Tensor, qside, kside) -> np.ndarray:
    ordered = mask[torch.from_numpy(qside.order)][:, torch.from_numpy(kside.order)]
    got = tile_reduce(ordered[None], qside.block, kside.block)[0]
    return torch.nonzero(got.reshape(-1) > 0).reshape(-1).numpy()


def test_candidates_hold_every_tile_of_the_node_and_are_exact_for_bands_the_order_resolves(monkeypatch):
    # brute force over small random class orders: candidates are a superset of the node's non-empty
    # tiles, and equal to the tiles where a pair satisfies a band of the region when every band's
    # modulus divides the order's period (the remaining residue condition is checked per tile after)
    monkeypatch.setattr(classbands, "_SHARE", 0)
    rng = random.Random(1919)
    exact = 0
    for _ in range(60):
        lq = rng.randint(1, 90)
        lk = lq if rng.random() < 0.5 else rng.randint(lq, 110)
        m, bm, bn = rng.randint(2, 8), rng.randint(1, 9), rng.randint(1, 9)
        node = _band_node(rng)
        qside, kside = _side(lq, lk - lq, m, bm, lk), _side(lk, 0, m, bn, lk)
        engine = eng.Engine(qside, kside, Env(Sizes(lq, lk, None, 1), 0))
        got = classbands.candidates(engine, node)
        assert got is not None
        assert np.all(np.diff(got) > 0)
        pir = ir.PatternIR("t", (), None, (), node)
        mask = semantics.mask(pir, lq, lk, 1)[0]
        assert np.isin(_dense_tiles(mask, qside, kside), got).all(), (node, lq, lk, m, bm, bn)
        bands = classbands.region(node, engine.env)
        d = (torch.arange(lq) + lk - lq)[:, None] - torch.arange(lk)[None, :]
        inside = torch.zeros(lq, lk, dtype=torch.bool)
        for lo, hi, mod in bands:
            inside |= (d >= lo) & (d <= hi) & (d % mod == 0)
        if all(m % mod == 0 for _, _, mod in bands):
            exact += 1
            assert np.array_equal(_dense_tiles(inside, qside, kside), got), (node, lq, lk, m, bm, bn)
    assert exact >= 20


def test_region_is_none_with_a_primitive_that_is_not_a_band():
    env = Env(Sizes(64, 64, None, 1), 0)
    assert classbands.region(ir.inter(P("causal"), P("blocks", size=8)), env) is None
    assert classbands.region(ir.complement(P("causal")), env) is None
    assert classbands.region(ir.EMPTY, env) == []
    got = classbands.region(ir.inter(P("causal"), ir.union(P("window", before=7), P("strided", stride=8))), env)
    assert sorted(got) == [(0, 7, 1), (0, 1 << 50, 8)]


@pytest.fixture
def classes_only(monkeypatch):
    """Plans in the residue-class orders alone (the identity is not offered)."""
    offered = reorder.candidates
    monkeypatch.setattr(reorder, "candidates", lambda *a: offered(*a)[1:] or offered(*a))


def test_plans_of_bands_in_class_orders_match_dense(classes_only, monkeypatch):
    used = []
    found = classbands.candidates

    def spy(engine, node):
        out = found(engine, node)
        used.append(out is not None)
        return out

    monkeypatch.setattr(classbands, "candidates", spy)
    rng = random.Random(19)
    for _ in range(10):
        node = ir.inter(_band_node(rng), ir.union(P("strided", stride=rng.randint(2, 6)), _band_node(rng)))
        lq = rng.randint(60, 160)
        lk = lq if rng.random() < 0.5 else rng.randint(lq, 180)
        block = (rng.choice([2, 3, 4]), rng.choice([2, 4, 5]))
        check_plan(ir.PatternIR("t", (), None, (), node), lq, lk, rng.choice([1, 2]), block, "auto")
    assert sum(used) >= 10


def test_sparse_transformer_strided_classifies_few_tiles_in_its_class_order():
    # 16 tokens a class-pair tile row: the plan keeps ~1.5 tiles per class pair and query tile; the
    # candidates follow them (before: causal's half of all tiles was classified, three times)
    src = "pattern p { causal & (window(16) | strided(16)) }"
    plan = patterndsl.compile(src).plan(4096, heads=1, block=(16, 16))
    assert plan.order == "classes mod 16"
    kept = plan.stats.tiles_full + plan.stats.tiles_partial
    assert plan.stats.extra["tiles_classified"] < kept // 4


def test_key_sides_whose_pieces_are_hulls_give_no_runs():
    # route's key blocks as a side: one hull piece per block; blocks of residues are not runs of keys
    from patterndsl.analysis.engine import _group_side

    fine = tiles.build_side(tiles.identity_segments(60, 0, (60,)), 60, 4, 0, (60,), True)
    runs = _group_side(np.arange(60) // 5, 12, fine, 0, None, False)
    assert classbands.key_runs(runs, 1) is not None
    hulls = _group_side(np.arange(60) % 3, 3, fine, 0, None, False)
    assert classbands.key_runs(hulls, 1) is None
    qside = _side(60, 0, 3, 4, 60)
    engine = eng.Engine(qside, hulls, Env(Sizes(60, 60, None, 1), 0))
    assert classbands.candidates(engine, P("causal")) is None
