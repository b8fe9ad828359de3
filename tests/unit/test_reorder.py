"""Token reordering: candidate orders are valid permutations, the chosen one never visits more than
identity order, and plans stay exact in reordered space."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl import ir
from patterndsl.analysis import reorder, tiles
from patterndsl.analysis.plan import tile_reduce

CASES = [
    ("pattern t { window(16, 16, dilation = 4) }", 256, None),
    ("pattern t { causal & window(12, dilation = 8) }", 300, None),
    ("pattern t { causal & strided(6) }", 200, None),
    ("pattern t { strided(3) | window(5) }", 150, 90),
    ("pattern t { layout grid(y = 16, x = 16)\n neighborhood(5) }", 256, None),
    ("pattern t { layout grid(y = 16, x = 20)\n neighborhood((3, 5), dilation = (2, 2)) }", 320, None),
    ("pattern t { layout grid(t = 4, y = 8, x = 8)\n neighborhood((3, 3, 3), dilation = (1, 2, 2)) }", 256, None),
    ("pattern t { layout grid(y = 12, x = 12)\n neighborhood(3, stride = 2, causal = (true, false)) }", 144, None),
]


@pytest.mark.parametrize("src,lq,lk", CASES)
def test_auto_order_is_exact_and_never_worse(src, lq, lk):
    p = pd.compile(src)
    auto = p.plan(lq, lk, heads=1, block=(16, 16))
    ident = p.plan(lq, lk, heads=1, block=(16, 16), order="identity")
    assert auto.stats.visited_pairs <= ident.stats.visited_pairs
    assert auto.stats.allowed_pairs == ident.stats.allowed_pairs
    for plan in (auto, ident):
        for perm, n in ((plan.q_order, plan.q_len), (plan.kv_order, plan.kv_len)):
            assert perm.dtype == torch.int64
            assert torch.equal(torch.sort(perm).values, torch.arange(n))
        dense = p.mask(lq, lk)
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], 16, 16)
        assert torch.equal(plan.tiles(), ref)


def test_dilated_window_is_reordered_and_denser():
    p = pd.compile("pattern t { window(64, 64, dilation = 4) }")
    auto = p.plan(1024, block=(32, 32))
    ident = p.plan(1024, block=(32, 32), order="identity")
    assert auto.order != "identity"
    assert auto.stats.block_efficiency >= 2 * ident.stats.block_efficiency
    assert auto.stats.tiles_evaluated == 0


def test_candidates_are_permutations():
    rng = random.Random(7)
    for _ in range(30):
        lq = rng.randint(1, 90)
        lk = rng.randint(1, 90)
        m = rng.randint(2, 9)
        for length, off in ((lq, lk - lq), (lk, 0)):
            segs = tiles.class_segments(length, off, m)
            side = tiles.build_side(segs, length, rng.randint(1, 16), off, (lk,), False)
            assert sorted(side.order.tolist()) == list(range(length))
            # positions inside each class ascend; classes appear in residue order
            pos = side.order + off
            res = pos % m
            assert (res[1:] >= res[:-1]).all()
    for _ in range(20):
        shape = tuple(rng.randint(2, 9) for _ in range(rng.randint(1, 3)))
        dil = tuple(rng.randint(1, 3) for _ in shape)
        box = tuple(rng.randint(1, 4) for _ in shape)
        n = 1
        for e in shape:
            n *= e
        side = tiles.build_side(tiles.box_segments(shape, dil, box), n, rng.randint(1, 16), 0, shape, False)
        assert sorted(side.order.tolist()) == list(range(n))


def test_dynamic_and_random_patterns_keep_identity():
    nodes = [pd.compile("pattern t { random(2, 8) | window(3, dilation = 2) }").ir.default]
    assert [c[0] for c in reorder.candidates(nodes, None, 64, 64, (16, 16))] == ["identity"]


def test_heterogeneous_heads_share_one_order():
    src = """
    pattern s2 {
        heads 0..2: causal & (window(15) | strided(4))
        heads 2..4: causal & (window(15) | strided(8))
    }
    """
    p = pd.compile(src)
    auto = p.plan(256, heads=4, block=(16, 16))
    ident = p.plan(256, heads=4, block=(16, 16), order="identity")
    assert auto.stats.visited_pairs <= ident.stats.visited_pairs
    dense = p.mask(256, heads=4)
    assert torch.equal(auto.tiles(), tile_reduce(dense[:, auto.q_order][:, :, auto.kv_order], 16, 16))
    assert ir.SIGNATURES  # the IR module is the one the plan read
