"""Residue reasoning for periodic ``where`` predicates (``primitives/residues.py``): periods, histograms, exact plans.

Plans are compared with the tile reduction of the dense meaning and their allowed pairs with
the dense count, at lengths that are not multiples of the tile or of the periods, with
``Lq > Lk`` (negative query positions), negative divisors and negative operands.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import patterndsl as pd
from patterndsl import ir
from patterndsl.analysis.plan import tile_reduce
from patterndsl.primitives import residues


def _pred(src: str):
    return pd.compile(f"pattern t {{ where({src}) }}").ir.default.arg("pred")


@pytest.mark.parametrize(
    "src, want",
    [
        ("q % 7 == k % 5", (7, 5)),
        ("(q - k) % 4 == 0", (4, 4)),
        ("(q * k) % 3 == 0", (3, 3)),
        ("(q % 8) // 3 == k % 3", (8, 3)),
        ("(-q) % 6 == 1", (6, 1)),
        ("q % -4 == -1", (4, 1)),
        ("k % 4 == h", (1, 4)),
        ("abs(q % 5 - k % 3) <= 1 and (q + 2 * k) % 2 == 0", (10, 6)),
        ("(q % 4 + k) % 6 < 2", (4, 6)),
        ("q // 64 == k // 64", None),
        ("q % 7 < k", None),
        ("q % (k % 5 + 1) == 0", None),
        ("q % 2048 == 0", None),
    ],
)
def test_periods(src, want):
    assert residues.periods(_pred(src)) == want


def test_histogram_matches_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(-50, 50, 200)
    s = rng.integers(1, 13, 200)
    n = rng.integers(0, 40, 200)
    for period in (1, 4, 6, 7, 12):
        got = residues.histogram(a, s, n, period)
        for i in range(len(a)):
            pos = a[i] + s[i] * np.arange(n[i])
            assert (got[i] == np.bincount(pos % period, minlength=period)).all()


CASES = [
    ("where(q % 7 == k % 5)", 100, 100, (16, 16)),
    ("where(q % 7 == k % 5)", 90, 61, (8, 16)),  # Lq > Lk: negative query positions
    ("causal & where(q % 7 == k % 5)", 77, 77, (8, 8)),
    ("where((q - k) % 3 == 1) | window(5)", 83, 70, (16, 8)),
    ("where((q % 8) // 3 != k % 3)", 64, 70, (16, 16)),
    ("where((-q) % 6 == 1 or k % -4 == -1)", 59, 66, (8, 8)),
    ("window(9) & where((q * k + 1) % 5 > 2)", 70, 70, (16, 16)),
    ("~where(q % 4 == k % 6) & causal", 48, 48, (8, 8)),
]


@pytest.mark.parametrize("src, lq, lk, block", CASES)
def test_plans_match_the_dense_meaning(src, lq, lk, block):
    p = pd.compile(f"pattern t {{ {src} }}")
    plan = p.plan(lq, lk, 1, block=block, order="identity")
    dense = p.mask(lq, lk, 1)
    assert torch.equal(plan.tiles(), tile_reduce(dense, *block))
    assert plan.stats.allowed_pairs == int(dense.sum())


def test_periodic_predicate_is_not_evaluated():
    p = pd.compile("pattern t { where(q % 7 == k % 5) }")
    plan = p.plan(256, 256, 1, block=(32, 32), order="identity")
    dense = p.mask(256, 256, 1)
    assert torch.equal(plan.tiles(), tile_reduce(dense, 32, 32))
    assert plan.stats.allowed_pairs == int(dense.sum())
    assert plan.stats.tiles_evaluated == 0 and plan.stats.elements_evaluated == 0


def test_zero_divisor_on_residues_is_left_to_evaluation():
    # the divisor k % 3 is periodic but zero on a residue: no table, the error is reported as before
    p = pd.compile("pattern t { where(q % 4 == 0 or q % (k % 3) == 0) }")
    with pytest.raises(pd.PatternError, match="division by zero"):
        p.plan(32, 32, 1, block=(8, 8), order="identity")


def test_key_periodic_columns_become_runs(monkeypatch):
    # S2-attention's shards: below the window every tile holds the same columns (32 of them in a tile,
    # more than the column test splits a key tile into), found as partial runs by their periods
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import hierarchy
    from patterndsl.analysis.rewrite import simplify
    from patterndsl.sizes import Sizes
    from tests.unit.test_plan_property import check_plan

    monkeypatch.setattr(hierarchy, "FLAT_TILES", 0)
    monkeypatch.setattr(hierarchy, "TOP_TILES", 4)
    monkeypatch.setattr(hierarchy, "PAYS", 0)
    pir = pd.compile("pattern p { causal & (window(40) | where(k % 4 == 1)) }").ir
    layered = hierarchy.classify(eng.identity_engine(Sizes(1024, 1024, None, 1), 0, 32), simplify(pir.default))
    _row, lo, hi = layered.partial
    assert int((hi - lo).sum()) > 300 and layered.partial_allowed > 0
    plan = check_plan(pir, 1024, 1024, 1, (32, 32), "identity")
    assert plan.stats.elements_evaluated == 0
    check_plan(pir, 1000, 1030, 1, (32, 16), "identity")
    with monkeypatch.context() as m:
        m.setattr(hierarchy, "_repeats_by_tiles", lambda prim, engine: False)
        layered = hierarchy.classify(eng.identity_engine(Sizes(1024, 1024, None, 1), 0, 32), simplify(pir.default))
        assert int((layered.partial[2] - layered.partial[1]).sum()) < 100


def test_box_counts_match_histograms():
    # the closed form (steps 1 and 0 mod the period) and the histograms agree with brute force
    from patterndsl.analysis.tiles import Pieces

    rng = np.random.default_rng(1)
    tab = rng.integers(0, 2, (6, 4))

    class _Side:
        strides, extents = (1,), (1 << 40,)

    def pieces(a, s, n):
        side = _Side()
        side.a, side.s, side.n = a[:, None], s[:, None], n[:, None]
        return Pieces(side, np.arange(len(a)))

    size = 300
    qa, ka = rng.integers(-40, 40, size), rng.integers(-40, 40, size)
    qs, ks = rng.choice([1, 6, 7, 12, 5, 3], size), rng.choice([1, 4, 5, 8, 2, 3], size)
    qn, kn = rng.integers(0, 30, size), rng.integers(0, 30, size)
    got = residues.box_counts(tab, 6, 4, pieces(qa, qs, qn), pieces(ka, ks, kn))
    for i in range(size):
        q = (qa[i] + qs[i] * np.arange(qn[i])) % 6
        k = (ka[i] + ks[i] * np.arange(kn[i])) % 4
        assert got[i] == tab[q[:, None], k[None, :]].sum()


def _periodic_pred(rng):
    # Positions only under ``% c`` (unaligned moduli of either sign, ``//`` of a residue, products).
    def residue(side):
        x = ir.Arith("*", ir.Const(rng.choice([-3, -1, 1, 2])), ir.Var(side))
        if rng.random() < 0.5:
            x = ir.Arith(rng.choice("+-*"), x, ir.Var("k" if side == "q" else "q"))
        modulus = ir.Const(rng.choice([-6, -4, 2, 3, 5, 7]))
        e = ir.Arith("%", ir.Arith("+", x, ir.Const(rng.randint(-5, 5))), modulus)
        return ir.Arith("//", e, ir.Const(rng.choice([-2, 1, 2]))) if rng.random() < 0.3 else e

    right = ir.Arith("+", residue("k"), ir.Const(rng.randint(-2, 2)))
    return ir.Cmp(rng.choice(ir.Cmp.OPS), residue("q"), right)


def test_random_periodic_predicates_match_dense():
    from tests.unit.test_plan_property import check_plan

    rng = random.Random(5)
    for _ in range(12):
        where = ir.Prim("where", (("pred", _periodic_pred(rng)),))
        node = where if rng.random() < 0.5 else ir.inter(ir.CAUSAL, ir.union(where, ir.Prim("sink", (("n", 3),))))
        pir = ir.PatternIR("t", (), None, (), node)
        lq, lk = rng.randint(20, 70), rng.randint(20, 70)
        block = (rng.choice([4, 8, 16]), rng.choice([4, 7, 16]))
        plan = check_plan(pir, lq, lk, 1, block, rng.choice(["identity", "auto"]))
        if node is where:
            assert plan.stats.elements_evaluated == 0
