"""Tiles along diagonals (analysis/diagonal.py): one full-size tile per diagonal stands for the others.

Every check compares the plan with the dense meaning (``check_plan``), with the grouping forced on
small plans (``MIN_TILES = 0``) and the coarse levels on, at lengths that are not multiples of the
tile (edge tiles are classified on their own) and with ``Lq != Lk``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import patterndsl
from patterndsl.analysis import diagonal, hierarchy
from patterndsl.analysis import engine as eng
from patterndsl.analysis.rewrite import simplify
from patterndsl.sizes import Sizes
from tests.unit.test_plan_property import check_plan

TERMS = [
    "causal",
    "window(9)",
    "window(5, 3)",
    "window(40, dilation = 4)",
    "window(17, 6, dilation = 3)",
    "strided(6)",
    "where(k % 4 == 1)",
    "where((q - k) % 8 < 3)",
    "where(q % 8 == k % 4)",
    "where(q - k >= 11)",
]


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(diagonal, "MIN_TILES", 0)
    monkeypatch.setattr(hierarchy, "FLAT_TILES", 0)
    monkeypatch.setattr(hierarchy, "TOP_TILES", 4)
    monkeypatch.setattr(hierarchy, "PAYS", 0)


def _random_source(rng: random.Random) -> str:
    a, b, c = rng.sample(TERMS, 3)
    return rng.choice([f"{a} & ({b} | {c})", f"({a} | {b}) & ~{c}", f"{a} | {b} & {c}", f"{a} & {b}"])


@pytest.mark.parametrize("levels", [True, False])
def test_random_band_and_periodic_patterns_match_dense(levels, monkeypatch):
    # through the coarse levels (domains grouped by diagonal) and flat (laid out from the diagonals)
    monkeypatch.setattr(diagonal, "MIN_TILES", 0)
    if levels:
        monkeypatch.setattr(hierarchy, "FLAT_TILES", 0)
        monkeypatch.setattr(hierarchy, "TOP_TILES", 4)
        monkeypatch.setattr(hierarchy, "PAYS", 0)
    rng = random.Random(7 if levels else 11)
    for _ in range(10):
        pir = patterndsl.compile(f"pattern p {{ {_random_source(rng)} }}").ir
        lq = rng.randint(40, 130)
        lk = lq if rng.random() < 0.5 else rng.randint(40, 130)
        # "auto" plans in residue-class orders too, where a class of translates is a diagonal inside a
        # pair of classes
        check_plan(pir, lq, lk, 1, (8, 8), rng.choice(["identity", "auto"]))


def test_invariance_needs_square_tiles_and_dividing_periods():
    pir = patterndsl.compile("pattern p { causal & (window(9) | where(k % 4 == 1)) }").ir
    node = simplify(pir.default)
    assert diagonal.invariant(eng.identity_engine(Sizes(64, 64, None, 1), 0, 8), node)
    assert not diagonal.invariant(eng.identity_engine(Sizes(64, 64, None, 1), 0, (8, 4)), node)
    assert not diagonal.invariant(eng.identity_engine(Sizes(64, 64, None, 1), 0, 6), node)  # 4 does not divide 6
    sink = simplify(patterndsl.compile("pattern p { causal & (window(9) | sink(4)) }").ir.default)
    assert not diagonal.invariant(eng.identity_engine(Sizes(64, 64, None, 1), 0, 8), sink)


def test_one_tile_per_diagonal_is_classified(forced, monkeypatch):
    pir = patterndsl.compile("pattern p { causal & (window(20) | window(64, dilation = 8)) }").ir
    grouped = check_plan(pir, 1024, 1024, 1, (8, 8), "identity").stats.extra["tiles_classified"]
    monkeypatch.setattr(diagonal, "MIN_TILES", 1 << 60)
    each = check_plan(pir, 1024, 1024, 1, (8, 8), "identity").stats.extra["tiles_classified"]
    assert 3 * grouped < each


def test_flat_plans_classify_one_tile_per_diagonal(monkeypatch):
    # one tile per diagonal (and the edge row and column) is classified: the work follows the sides,
    # not the tiles below the diagonal
    monkeypatch.setattr(diagonal, "MIN_TILES", 0)
    pir = patterndsl.compile("pattern p { causal & (window(20) | where(k % 4 == 1)) }").ir
    grouped = check_plan(pir, 203, 203, 1, (8, 8), "identity").stats.extra["tiles_classified"]
    monkeypatch.setattr(diagonal, "MIN_TILES", 1 << 60)
    each = check_plan(pir, 203, 203, 1, (8, 8), "identity").stats.extra["tiles_classified"]
    assert 5 * grouped < each


def _tile_masks(engine, node, keys):
    # every tile's element mask (padding cleared), [T, BM, BN]
    from patterndsl import semantics

    out = []
    for _, i, j, valid in engine.chunks(keys):
        out.append(semantics.evaluate(node, i, j, engine.env.head, engine.ctx) & valid)
    return torch.cat(out)


@pytest.mark.parametrize(
    ("source", "lq", "lk"),
    [
        ("causal & (window(9) | where(k % 4 == 1))", 256, 256),  # S2-attention's shards
        ("causal & (window(9) | where(k % 4 == 1))", 203, 230),  # edge tiles, Lq != Lk
        ("window(14, 14) | where(k % 4 == 1)", 128, 128),  # one past a tile's reach: the window cut
        ("window(12, 3) & ~window(2) | where((q - k) % 8 < 3)", 200, 200),
        ("causal & (window(20) | window(40, dilation = 3))", 160, 180),  # a modulus not dividing the tile
        ("causal & (window(20) | window(40, dilation = 4))", 160, 160),
    ],
)
def test_classes_by_bands_hold_one_mask(source, lq, lk, monkeypatch):
    # tiles of one class (every band decided alike, or one diagonal cutting a band) hold one mask
    node = simplify(patterndsl.compile(f"pattern p {{ {source} }}").ir.default)
    engine = eng.identity_engine(Sizes(lq, lk, None, 1), 0, 8)
    keys = engine.all_keys()
    assert diagonal.invariant(engine, node)
    reps, inverse = diagonal._by_bands(engine, node, keys)
    masks = _tile_masks(engine, node, keys)
    assert torch.equal(masks, masks[np.searchsorted(keys, reps)][inverse])
    assert np.array_equal(reps, np.sort(reps)) and len(reps) < len(keys) // 4
    counts = masks.flatten(1).sum(1).numpy()
    partial = np.flatnonzero((counts > 0) & (counts < masks[0].numel()))
    monkeypatch.setattr(diagonal, "MIN_TILES", 0)
    grouped = diagonal.count(engine, node, keys[partial])
    assert grouped is not None and np.array_equal(grouped, counts[partial])


def test_bands_decided_alike_share_a_class():
    # below the window every tile of S2-attention's shard holds the same mask: few classes, not one per diagonal
    node = simplify(patterndsl.compile("pattern p { causal & (window(9) | where(k % 4 == 1)) }").ir.default)
    engine = eng.identity_engine(Sizes(512, 512, None, 1), 0, 8)
    reps, _ = diagonal._by_bands(engine, node, engine.all_keys())
    # above causal, on it, the diagonal below (window cut), the one after it (window inside)... below
    assert len(reps) <= 5


def test_many_bands_group_by_diagonal(monkeypatch):
    # beyond MAX_BANDS the classes are the diagonals' (the duplicate-row search), still exact
    rings = " | ".join(f"(window({3 * i + 2}) & ~window({3 * i}))" for i in range(1, 10))
    node = simplify(patterndsl.compile(f"pattern p {{ causal & ({rings} | where(k % 4 == 1)) }}").ir.default)
    engine = eng.identity_engine(Sizes(203, 203, None, 1), 0, 8)
    assert len(diagonal._bands(engine, node)) > diagonal._MAX_BANDS
    keys = engine.all_keys()
    counts = _tile_masks(engine, node, keys).flatten(1).sum(1).numpy()
    partial = np.flatnonzero((counts > 0) & (counts < 64))
    monkeypatch.setattr(diagonal, "MIN_TILES", 0)
    monkeypatch.setattr(diagonal, "_by_bands", None)  # not reached
    grouped = diagonal.count(engine, node, keys[partial])
    assert grouped is not None and np.array_equal(grouped, counts[partial])
