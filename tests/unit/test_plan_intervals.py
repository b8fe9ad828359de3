"""Tile-level interval reasoning of the plan: ``where`` predicates built from every operator of
the language, decided on tiles and boxes by bounds, and the work that leaves.

Random predicates (``+ - * // %``, ``abs``, ``min``, ``max``, comparisons, ``and``/``or``/``not``,
grid coordinates, ``h``, ``Lq``, ``Lk``) inside random patterns must plan to exactly the tile
reduction of the dense meaning; the element-wise work is bounded; the patterns that used to
be planned element by element (BigBird, block-quantised bands, unions of bands) are now
settled by bounds, asserted through the plan's counters (never wall time).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl import analysis, ir
from patterndsl.analysis.plan import tile_reduce
from patterndsl.errors import PatternError
from tests.unit.test_plan_property import C, V, check_plan, rand_node

BIGBIRD = (Path(__file__).resolve().parents[2] / "examples" / "bigbird.pdsl").read_text()


def _term(rng, axes):
    leaves = [V("q"), V("k"), V("q"), V("k"), C(rng.randint(-9, 9)), V("h"), V("Lq"), V("Lk")]
    leaves += [ir.Coord(side, ax) for ax in axes for side in "qk"]
    return rng.choice(leaves)


def rand_expr(rng, axes, depth=0):
    """A random integer expression using every arithmetic operator and function."""
    if depth > 2 or rng.random() < 0.3:
        return _term(rng, axes)
    r = rng.random()
    left = rand_expr(rng, axes, depth + 1)
    if r < 0.25:
        return ir.Arith(rng.choice("+-"), left, rand_expr(rng, axes, depth + 1))
    if r < 0.35:
        return ir.Arith("*", left, C(rng.randint(-3, 3)))
    if r < 0.55:
        # Divisors never zero: a non-zero constant, or a strictly positive expression.
        div = C(rng.choice([-7, -3, -2, 2, 3, 4, 5, 8, 16]))
        if rng.random() < 0.3:
            div = ir.Arith("+", ir.Arith("%", rand_expr(rng, axes, depth + 1), C(5)), C(1))
        return ir.Arith(rng.choice(["//", "%"]), left, div)
    if r < 0.65:
        return ir.Neg(left)
    if r < 0.8:
        return ir.Func("abs", (left,))
    return ir.Func(rng.choice(["min", "max"]), (left, rand_expr(rng, axes, depth + 1)))


def rand_where_pred(rng, axes, depth=0):
    r = rng.random()
    if depth > 1 or r < 0.6:
        return ir.Cmp(rng.choice(ir.Cmp.OPS), rand_expr(rng, axes), rand_expr(rng, axes))
    if r < 0.75:
        return ir.LNot(rand_where_pred(rng, axes, depth + 1))
    items = tuple(rand_where_pred(rng, axes, depth + 1) for _ in range(rng.randint(2, 3)))
    return ir.Logic(rng.choice(["and", "or"]), items)


def rand_where_case(rng):
    layout = None
    axes = ()
    if rng.random() < 0.3:
        shape = [rng.randint(2, 8) for _ in range(rng.randint(1, 2))]
        layout = ir.Layout(tuple((f"a{x}", n) for x, n in enumerate(shape)))
        axes = layout.names
        lq = lk = layout.size
    else:
        lq = rng.randint(1, 90)
        lk = lq if rng.random() < 0.5 else rng.randint(1, 90)
    where = ir.Prim("where", (("pred", rand_where_pred(rng, axes)),))
    r = rng.random()
    if r < 0.5:
        node = where
    elif r < 0.75:
        node = ir.inter(where, rand_node(rng, layout, depth=2))
    else:
        node = ir.union(where, rand_node(rng, layout, depth=2))
    heads = rng.choice([1, 2, 3])
    pir = ir.PatternIR("t", (), layout, (), node)
    block = (rng.choice([1, 2, 4, 5, 8, 16, 32]), rng.choice([1, 3, 4, 8, 16, 32]))
    return pir, lq, lk, heads, block


def _check_where_cases(seed: int, count: int):
    rng = random.Random(seed)
    for _ in range(count):
        pir, lq, lk, heads, block = rand_where_case(rng)
        for order in ("identity", "auto"):
            p = check_plan(pir, lq, lk, heads, block, order)
            if order == "identity":
                # Each tile of the chosen order is evaluated at most once for its state and
                # once for its count, per head group.
                assert p.stats.elements_evaluated <= 2 * p.stats.total_pairs


@pytest.mark.parametrize("seed", range(6))
def test_random_where_predicates_match_dense(seed):
    _check_where_cases(7000 + seed, 40)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(30))
def test_random_where_predicates_match_dense_large(seed):
    _check_where_cases(90_000 + seed, 60)


def test_zero_divisor_still_reported_by_the_plan():
    p = pd.compile("pattern t { where(q // (k - 5) >= 0) }")
    with pytest.raises(PatternError):
        p.mask(16)
    with pytest.raises(PatternError):
        p.plan(16, block=(4, 4))


def _partial_pairs(plan) -> int:
    return plan.stats.visited_pairs - plan.stats.tiles_full * plan.block_m * plan.block_n


def _bounded_work(plan, factor=12):
    tiles = plan.stats.tiles_full + plan.stats.tiles_partial
    # The rules touch each non-empty tile a few times and the search about log(nkb) boxes per
    # boundary: the work follows the non-empty tiles, never n_q_tiles x n_kv_tiles.
    work = plan.stats.extra["tiles_classified"] + plan.stats.extra["boxes_searched"]
    assert work <= factor * tiles + 64 * plan.heads * plan.n_q_tiles, (work, tiles)
    assert plan.stats.elements_evaluated <= 2 * _partial_pairs(plan)


SLOW_BEFORE = [
    # (source, length): planned element by element before tile-level interval reasoning.
    (BIGBIRD, 16384),
    ("pattern p { causal & where(q // 256 - k // 256 <= 2) }", 65536),
    ("pattern p { causal & (window(127) | strided(128)) }", 16384),
    ("pattern p { causal | where(q < 1000 and k < 1000) }", 16384),
    ("pattern p { causal & (window(1024) | sink(4)) }", 65536),
    ("pattern p { window(32, 32, dilation = 8) | global(4) }", 65536),
    ("pattern p { where(abs(q // 64 - k // 64) <= 1 or (q % 512 < 8 and k % 512 < 8)) }", 32768),
]


@pytest.mark.parametrize("src,length", SLOW_BEFORE)
def test_slow_cases_are_settled_by_bounds(src, length):
    plan = pd.compile(src).plan(length, heads=4, block=(128, 128), order="identity")
    _bounded_work(plan)


def test_bigbird_needs_no_element_evaluation():
    plan = pd.compile(BIGBIRD).plan(16384, heads=4, block=(128, 128))
    assert plan.stats.tiles_evaluated == 0
    assert plan.stats.elements_evaluated == 0
    assert plan.stats.extra["tiles_counted_by_evaluation"] == 0


def test_block_quantised_band_searches_only_its_band():
    # Neither operand alone is a band; together they are: the candidates follow the band.
    length = 1 << 18
    plan = pd.compile("pattern p { causal & where(q // 256 - k // 256 <= 2) }").plan(length, block=(128, 128))
    nqb = length // 128
    assert plan.stats.tiles_full + plan.stats.tiles_partial <= 8 * nqb
    assert plan.stats.extra["tiles_classified"] <= 4 * 8 * nqb


def test_plan_ir_where_interval_on_grid_with_heads():
    layout = ir.Layout((("y", 6), ("x", 7)))
    half = [ir.Arith("//", ir.Coord(side, "x"), C(2)) for side in "qk"]
    pred = ir.Cmp("<=", ir.Func("abs", (ir.Arith("-", *half),)), ir.Arith("+", V("h"), C(0)))
    pir = ir.PatternIR("g", (), layout, (), ir.Prim("where", (("pred", pred),)))
    for order in ("identity", "auto"):
        check_plan(pir, 42, 42, 3, (4, 8), order)
    assert analysis.plan(pir, 42, 42, 3, block=(4, 8), order="identity").stats.allowed_pairs > 0


def test_band_rectangle_count_closed_form():
    # the trapezoid closed form that counts a band's partial tiles, against brute force
    import numpy as np

    from patterndsl.analysis.bandcount import band_pairs

    class Rect:  # one contiguous range of positions
        def __init__(self, a, n):
            self.fa, self.fs, self.fn = np.array([a]), np.array([1]), np.array([n])
            self.isap = np.array([True])

    rng = np.random.default_rng(0)
    for _ in range(3000):
        q0, k0 = (int(x) for x in rng.integers(-20, 40, 2))
        nq, nk = (int(x) for x in rng.integers(0, 20, 2))
        lo = int(rng.integers(-30, 30))
        hi = lo + int(rng.integers(-3, 40))
        mod = int(rng.integers(1, 6))
        lo = -(1 << 60) if rng.random() < 0.1 else lo
        hi = (1 << 60) if rng.random() < 0.1 else hi
        q = np.arange(q0, q0 + nq)[:, None]
        k = np.arange(k0, k0 + nk)[None, :]
        ref = int(((q - k >= lo) & (q - k <= hi) & ((q - k) % mod == 0)).sum())
        got, ok = band_pairs(Rect(q0, nq), Rect(k0, nk), lo, hi, mod)
        assert ok[0] and int(got[0]) == ref


def test_residue_predicates_are_settled_on_residue_classes():
    # S2-attention's `where(k % 4 == 0)`: every key tile is partial; on residue classes of 4
    # (congruences through the interval rules) the tiles are decided without their elements.
    p = pd.compile("pattern s { causal & (window(128) | where(k % 4 == 0)) }")
    plan = p.plan(8192, heads=1, order="identity")
    assert plan.stats.tiles_evaluated == 0
    # the one-sided predicate is evaluated on key pieces (a few times each key), never on pairs;
    # the bands around the diagonal are counted in closed form
    assert plan.stats.extra["tiles_counted_by_evaluation"] == 0
    assert plan.stats.elements_evaluated <= 8 * 8192
    small, _, ref = _dense_reference(p, 300, (16, 8))
    assert torch.equal(small.tiles(), ref)


def _dense_reference(p, length, block):
    plan = p.plan(length, block=block, order="identity")
    dense = p.mask(length)
    return plan, dense, tile_reduce(dense, *block)
