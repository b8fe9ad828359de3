"""Closed-form pair counts of bands and of combinations of bands on boxes, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patterndsl as pd
from patterndsl import ir
from patterndsl.analysis import bandcount
from patterndsl.analysis.plan import tile_reduce


class _Side:
    """Boxes of one side as flattened progressions ``fa + fs * t``, ``t < fn`` (1-D)."""

    def __init__(self, a, s, n):
        self.fa, self.fs, self.fn = (np.asarray(x, np.int64) for x in (a, s, n))
        self.isap = np.ones(len(self.fa), bool)
        self.n = self.fn[:, None]

    def positions(self, i):
        return self.fa[i] + self.fs[i] * np.arange(self.fn[i])


def _boxes(rng, count):
    qa, ka, qn, kn, qs, ks = [], [], [], [], [], []
    for _ in range(count):
        step = int(rng.choice([1, 1, 2, 3, 8]))
        qa.append(int(rng.integers(-40, 60)))
        ka.append(int(rng.integers(-40, 60)))
        qn.append(int(rng.integers(0, 25)))
        kn.append(int(rng.integers(0, 25)))
        # a single position takes any step on its side
        qs.append(step if qn[-1] != 1 else int(rng.integers(1, 9)))
        ks.append(step if kn[-1] != 1 else int(rng.integers(1, 9)))
    return _Side(qa, qs, qn), _Side(ka, ks, kn)


def _band(rng):
    lo = int(rng.integers(-40, 40))
    hi = lo + int(rng.integers(-3, 50))
    if rng.random() < 0.15:
        lo = -(1 << 50)
    if rng.random() < 0.15:
        hi = 1 << 62 if rng.random() < 0.5 else 1 << 50
    return lo, hi, int(rng.choice([1, 1, 2, 3, 4, 6, 8, 128]))


def _in_band(d, band):
    lo, hi, mod = band
    return (d >= lo) & (d <= hi) & (d % mod == 0)


def test_band_pairs_match_brute_force():
    rng = np.random.default_rng(7)
    qp, kp = _boxes(rng, 600)
    for _ in range(6):
        band = _band(rng)
        got, ok = bandcount.band_pairs(qp, kp, *band)
        assert ok.all()
        for i in range(len(qp.fa)):
            d = qp.positions(i)[:, None] - kp.positions(i)[None, :]
            assert int(got[i]) == int(_in_band(d, band).sum()), (i, band)


def test_band_pairs_refuse_mixed_steps():
    qp, kp = _Side([0], [2], [5]), _Side([0], [3], [5])
    _, ok = bandcount.band_pairs(qp, kp, 0, 9, 1)
    assert not ok[0]


@pytest.mark.parametrize("seed", range(4))
def test_combinations_of_bands_match_brute_force(seed):
    # a random boolean combination of up to four bands and one key-set primitive (decided per box)
    rng = np.random.default_rng(seed)
    bands = [_band(rng) for _ in range(int(rng.integers(1, 5)))]
    prims = [ir.Prim("window", (("before", 10_000 + i), ("after", 0), ("dilation", 1))) for i in range(len(bands))]
    other = ir.Prim("sink", (("count", 3),))
    band_of = dict(zip(prims, bands, strict=True))
    leaves = [*prims, other]
    node = leaves[0]
    for leaf in leaves[1:]:
        item = ir.complement(leaf) if rng.random() < 0.3 else leaf
        node = ir.union(node, item) if rng.random() < 0.5 else ir.inter(node, item)
    combo = bandcount.Combination(node, band_of.get)
    assert combo.usable
    qp, kp = _boxes(rng, 300)
    other_state = rng.choice(np.array([0, 1, 2], np.int8), len(qp.fa))
    states = {p: np.ones(len(qp.fa), np.int8) for p in prims} | {other: other_state}
    got, exact = combo.count(qp, kp, states)
    assert (exact == (other_state != 1)).all()
    for i in np.flatnonzero(exact):
        d = qp.positions(i)[:, None] - kp.positions(i)[None, :]
        value = {p: _in_band(d, b) for p, b in band_of.items()} | {other: np.full(d.shape, other_state[i] == 2)}
        assert int(got[i]) == int(np.broadcast_to(bandcount._truth(node, value), d.shape).sum())


@pytest.mark.parametrize(
    "source",
    [
        "causal & (window(127) | strided(128))",
        "causal & (window(13) | strided(9)) & ~window(3, dilation = 2)",
        "window(32, 32, dilation = 8) | global(4)",
        "causal & (window(50) | sink(4))",
        "(window(20, 7, dilation = 3) | strided(11)) - window(5, 5)",
    ],
)
@pytest.mark.parametrize(
    "sizes", [(300, 300), *(pytest.param(s, marks=pytest.mark.slow) for s in [(157, 421), (421, 157)])]
)
def test_plans_of_band_combinations_match_the_dense_mask(source, sizes):
    q_len, kv_len = sizes
    p = pd.compile(f"pattern p {{ {source} }}")
    for block in ((16, 16), (32, 8), (7, 13)):
        plan = p.plan(q_len, kv_len, heads=1, block=block, order="identity")
        dense = p.mask(q_len, kv_len, heads=1)
        assert torch.equal(plan.tiles(), tile_reduce(dense, *block))
        assert plan.stats.allowed_pairs == int(dense.sum())
        # bands and columns only: no element is evaluated for states or counts
        assert plan.stats.elements_evaluated == 0


@pytest.mark.parametrize(
    "source",
    [
        "causal & (window(13) | where(k % 4 == 1))",
        "where(k % 3 == 0 or k < 5) & window(20, 20)",
        "where(q % 5 != 2) | strided(7)",
        "causal & where((k * 7) % 11 < 4 and k // 6 != 2)",
        "~where(q // 3 % 2 == 0) & window(9, 3, dilation = 2)",
    ],
)
@pytest.mark.parametrize(
    "sizes", [(300, 300), *(pytest.param(s, marks=pytest.mark.slow) for s in [(157, 421), (421, 157)])]
)
def test_one_sided_predicates_match_the_dense_mask(source, sizes):
    # read on one side only: decided on that side's pieces, so evaluations follow L, not L x L
    q_len, kv_len = sizes
    p = pd.compile(f"pattern p {{ {source} }}")
    for block, order in (((16, 16), "identity"), ((32, 8), "auto"), ((7, 13), "identity")):
        plan = p.plan(q_len, kv_len, heads=2, block=block, order=order)
        dense = p.mask(q_len, kv_len, heads=2)
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
        assert torch.equal(plan.tiles(), ref)
        assert plan.stats.allowed_pairs == int(dense.sum())


@pytest.mark.parametrize(
    "source",
    [
        "where(k.x % 3 == 0) | neighborhood(3)",
        "where(q.y // 2 == 1 or q.x > 4) & neighborhood(5)",
    ],
)
def test_one_sided_predicates_on_grids_match_the_dense_mask(source):
    p = pd.compile(f"pattern p {{ layout grid(y = 9, x = 12)\n {source} }}")
    for block in ((12, 12), (8, 16), (36, 36)):
        plan = p.plan(108, heads=1, block=block)
        dense = p.mask(108, heads=1)
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
        assert torch.equal(plan.tiles(), ref)
        assert plan.stats.allowed_pairs == int(dense.sum())


@pytest.mark.parametrize(
    "source",
    [
        # HaloNet: blocks of 4 with a halo of 1, per axis
        "where(k.y >= q.y // 4 * 4 - 1 and k.y < q.y // 4 * 4 + 5"
        " and k.x >= q.x // 4 * 4 - 1 and k.x < q.x // 4 * 4 + 5)",
        "where(abs(q.y - k.y) <= 1) | where(k.x % 3 == q.x % 3)",
        "where(q.x // 3 == k.x // 3) & ~where(q.y < k.y - 2)",
        "where(k.y * 2 <= q.y + h or (q.x + k.x) % 4 == 1)",
    ],
)
def test_parts_reading_one_axis_are_counted_axis_by_axis(source):
    p = pd.compile(f"pattern p {{ layout grid(y = 10, x = 12)\n {source} }}")
    for block, order in (((12, 12), "identity"), ((8, 16), "identity"), ((24, 24), "auto")):
        plan = p.plan(120, heads=2, block=block, order=order)
        dense = p.mask(120, heads=2)
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
        assert torch.equal(plan.tiles(), ref)
        assert plan.stats.allowed_pairs == int(dense.sum())
        # per axis, distinct coordinate ranges only: fewer than the pairs of the partial tiles
        assert plan.stats.elements_evaluated < _partial_pairs(plan)


def _partial_pairs(plan) -> int:
    tiles = plan.tiles()
    rows = torch.diff(torch.tensor([min(m * plan.block_m, plan.q_len) for m in range(plan.n_q_tiles + 1)]))
    cols = torch.diff(torch.tensor([min(n * plan.block_n, plan.kv_len) for n in range(plan.n_kv_tiles + 1)]))
    return int(((tiles == 1) * rows[:, None] * cols[None, :]).sum())


def test_orders_stop_once_every_visited_pair_is_allowed():
    # the dilation offers a second order (classes mod 2), but the identity order visits only
    # allowed pairs already: no other order is planned
    p = pd.compile("pattern p { blocks(32) | window(0, dilation = 2) }")
    plan = p.plan(96, heads=1, block=(16, 16))
    assert plan.stats.tiles_partial == 0 and plan.stats.extra["orders_tried"] == 1
    assert plan.stats.allowed_pairs == int(p.mask(96, heads=1).sum())
    # with partial tiles, the other order is still tried
    p = pd.compile("pattern p { causal & window(5, dilation = 2) }")
    assert p.plan(96, heads=1, block=(16, 16)).stats.extra["orders_tried"] == 2


@pytest.mark.parametrize("shape", [(12, 16), (4, 6, 8)])
def test_box_orders_find_candidates_by_axis(monkeypatch, shape):
    # many key-tile runs (grid box orders at long lengths): candidates by first-axis start, a few
    # query tiles at a time; forced here at a small size
    from patterndsl.analysis import engine

    monkeypatch.setattr(engine, "_MAX_CHAINS", 0)
    monkeypatch.setattr(engine, "_PAIR_CHUNK", 7)
    names = "yx" if len(shape) == 2 else "tyx"
    axes = ", ".join(f"{name} = {n}" for name, n in zip(names, shape, strict=True))
    size = "3" if len(shape) == 2 else "(3, 3, 5)"
    p = pd.compile(f"pattern p {{ layout grid({axes})\n neighborhood({size}) | where(k.x == 0) }}")
    length = int(np.prod(shape))
    dense = p.mask(length, heads=1)
    for block in (8, 16):
        plan = p.plan(length, heads=1, block=(block, block))
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], block, block)
        assert torch.equal(plan.tiles(), ref)
        assert plan.stats.allowed_pairs == int(dense.sum())
