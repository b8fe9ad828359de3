"""Tiles along diagonals (analysis/diagonal.py): one full-size tile per diagonal stands for the others.

Every check compares the plan with the dense meaning (``check_plan``), with the grouping forced on
small plans (``MIN_TILES = 0``) and the coarse levels on, at lengths that are not multiples of the
tile (edge tiles are classified on their own) and with ``Lq != Lk``.
"""

from __future__ import annotations

import random

import pytest

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
