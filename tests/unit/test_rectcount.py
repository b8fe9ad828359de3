"""Points counted in rectangles (primitives/rectcount.py), and ``random``'s tile rule built on it, vs brute force."""

from __future__ import annotations

import numpy as np
import pytest

import patterndsl
from patterndsl.primitives import rectcount
from patterndsl.primitives.rectcount import PointCounter
from tests.unit.test_plan_hierarchy import tiny_levels  # noqa: F401  (fixture)
from tests.unit.test_plan_property import check_plan


def _brute(table, r0, r1, c0, c1):
    rows = np.arange(len(table))[:, None]
    inside = (rows >= r0) & (rows <= r1) & (table >= c0) & (table <= c1)
    return int(inside.sum())


@pytest.mark.parametrize("few", [0, 8])
def test_counts_match_brute_force_short_and_tall_rectangles(few, monkeypatch):
    monkeypatch.setattr(rectcount, "_FEW", few)  # short rectangles by binary search, or by comparison
    rng = np.random.default_rng(19)
    for _ in range(60):
        rows, per = int(rng.integers(0, 30)), int(rng.integers(0, 5))
        n_cols = int(rng.integers(max(per, 1), 70))
        table = np.zeros((rows, per), np.int64)
        for a in range(rows):
            table[a] = np.sort(rng.choice(n_cols, per, replace=False))
        counter = PointCounter(table, n_cols)
        r0, r1 = rng.integers(-3, rows + 3, (2, 80))
        c0, c1 = rng.integers(-3, n_cols + 3, (2, 80))
        got = counter.count(r0, r1, c0, c1)
        want = [_brute(table, *x) for x in zip(r0, r1, c0, c1, strict=True)]
        assert got.tolist() == want


CASES = [
    ("where(abs(q // 4 - k // 4) <= 1) | global(4) | random(3, 4, 0)", 160, 160, (16, 16)),
    ("random(3, 4, 7)", 100, 150, (8, 16)),
    ("causal & random(2, 3, 5) | window(2)", 150, 90, (16, 8)),
    ("random(5, 2, 1) - window(6, 6)", 160, 160, (16, 16)),
]


@pytest.mark.parametrize(("src", "lq", "lk", "block"), CASES)
def test_random_plans_match_dense_through_levels_and_tall_boxes(src, lq, lk, block, tiny_levels, monkeypatch):  # noqa: F811
    # coarse tiles over blocks of 2..4 positions: boxes span many block rows (the matrix) and few (row by row)
    tall = []
    count = PointCounter._below
    monkeypatch.setattr(PointCounter, "_below", lambda self, lo, *a: tall.append(len(lo)) or count(self, lo, *a))
    pir = patterndsl.compile(f"pattern p {{ {src} }}").ir
    check_plan(pir, lq, lk, 1, block, "identity")
    assert sum(tall) > 0
