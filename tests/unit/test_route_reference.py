"""route(...) reference selection: hand-computed tiny cases and a loop-by-loop oracle."""

from __future__ import annotations

import itertools

import pytest
import torch

from patterndsl import ir, semantics
from tests.brute import brute_node, coords, pattern, prim


def col(*values):
    """A ``[1, 1, L, 1]`` tensor (batch 1, one head, head_dim 1)."""
    return torch.tensor(values, dtype=torch.float64).view(1, 1, -1, 1)


def select(node, q, k, Lq=None, Lk=None, layout=None, heads=None):
    Lq = q.shape[2] if Lq is None else Lq
    Lk = k.shape[2] if Lk is None else Lk
    lay = ir.Layout(tuple(layout.items())) if layout else None
    return semantics.route_selection(node, q, k, semantics.Context(Lq, Lk, lay), heads)


def test_mean_picks_the_best_block():
    r = prim("route", 1, block=2)
    sel = select(r, col(1, 1, 1, 1), col(0, 2, 5, -1))  # key block means 1 and 2
    assert sel.tolist() == [[[[False, True], [False, True]]]]
    m = semantics.mask(pattern(r), 4, q=col(1, 1, 1, 1), k=col(0, 2, 5, -1))
    assert m[0, 0].tolist() == [[False, False, True, True]] * 4


def test_among_limits_candidates_and_fewer_than_topk():
    r = prim("route", 3, block=2, among=prim("causal"))
    sel = select(r, col(*[1] * 6), col(*[1] * 6))
    # group a holds positions 2a, 2a+1; causal allows key blocks 0..a
    assert sel[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_ties_go_to_the_lower_block():
    r = prim("route", 2, block=2)
    sel = select(r, col(1, 1), col(*[3] * 8), Lq=2, Lk=8)
    assert sel[0, 0].tolist() == [[True, True, False, False]]


def test_gqa_sums_scores_of_the_heads_sharing_a_kv_head():
    r = prim("route", 1, block=2)
    q = torch.tensor([1.0, 1.0, -3.0, -3.0], dtype=torch.float64).view(1, 2, 2, 1)  # head 0: +1, head 1: -3
    k = col(1, 1, -1, -1)  # block means +1 and -1
    shared = select(r, q, k)  # scores: head 0 [1, -1], head 1 [-3, 3]; sum [-2, 2]
    assert shared.shape == (1, 1, 1, 2) and shared[0, 0].tolist() == [[False, True]]
    per_head = select(r, q, k.expand(1, 2, 4, 1))
    assert per_head[0].tolist() == [[[True, False]], [[False, True]]]
    m = semantics.mask(pattern(r), 2, 4, heads=2, q=q, k=k)
    assert m[0, 0].tolist() == m[0, 1].tolist() == [[False, False, True, True]] * 2


def test_landmark_uses_the_last_key_of_each_block():
    q, k = col(1, 1), col(10, 0, 0, 1)  # means 5 and 0.5; last keys 0 and 1
    assert select(prim("route", 1, block=2), q, k, Lq=2)[0, 0].tolist() == [[True, False]]
    assert select(prim("route", 1, block=2, score="landmark"), q, k, Lq=2)[0, 0].tolist() == [[False, True]]


def test_max_pools_elementwise():
    q = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    k = torch.tensor([[1, 0], [0, 1], [3, -10], [-10, 3]], dtype=torch.float64).view(1, 1, 4, 2)
    # mean: block 0 [.5, .5] -> 1, block 1 [-3.5, -3.5] -> -7; max: [1, 1] -> 2, [3, 3] -> 6
    assert select(prim("route", 1, block=2), q, k, Lq=2)[0, 0].tolist() == [[True, False]]
    assert select(prim("route", 1, block=2, score="max"), q, k, Lq=2)[0, 0].tolist() == [[False, True]]


def test_qblock_one_selects_per_token():
    r = prim("route", 1, block=2, qblock=1)
    sel = select(r, col(1, -1, 1, -1), col(1, 1, -1, -1))
    assert sel[0, 0].tolist() == [[True, False], [False, True], [True, False], [False, True]]


def test_partial_last_block_pools_over_its_members():
    # block 1 = keys 2, 3 (mean 4); block 2 = key 4 alone (mean 5, not 2.5)
    sel = select(prim("route", 1, block=2), col(1), col(0, 0, 4, 4, 5), Lq=1)
    assert sel[0, 0].tolist() == [[False, False, True]]


def test_end_aligned_query_groups():
    r = prim("route", 1, block=2, qblock=2)
    n_q, n_k, qgroup, kblock = semantics.route_blocks(r, semantics.Context(3, 8))
    # positions 5, 6, 7 -> groups 2, 3, 3 -> numbered from the first: 0, 1, 1
    assert (n_q, n_k, qgroup.tolist(), kblock.tolist()) == (2, 4, [0, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3])


def test_boxes_on_a_grid():
    layout = {"y": 4, "x": 4}
    r = prim("route", 1, block=(2, 2), qblock=(2, 2))
    ctx = semantics.Context(16, 16, ir.Layout(tuple(layout.items())))
    n_q, n_k, qgroup, kblock = semantics.route_blocks(r, ctx)
    assert qgroup.tolist() == kblock.tolist()
    assert (n_q, n_k) == (4, 4)
    assert kblock.tolist() == [(p // 4 // 2) * 2 + (p % 4) // 2 for p in range(16)]
    k = torch.tensor([5.0 if (p // 4 >= 2 and p % 4 >= 2) else 0.0 for p in range(16)]).view(1, 1, 16, 1)
    m = semantics.mask(pattern(r, layout), 16, q=torch.ones(1, 1, 16, 1), k=k)
    assert m[0, 0].tolist() == [[p // 4 >= 2 and p % 4 >= 2 for p in range(16)]] * 16


# --------------------------------------------------------------------------- loop-by-loop oracle


def brute_selection(r, q, k, Lq, Lk, layout=None):
    """``[batch][kv_head][group] -> set of blocks``, from LANGUAGE.md with Python loops."""
    a = r.kwargs
    off = Lk - Lq

    def box(pos, side):
        if isinstance(side, tuple):
            c = coords(pos, layout)
            ident = 0
            for ci, extent, s in zip(c, layout.shape, side, strict=True):
                ident = ident * -(-extent // s) + ci // s
            return ident
        return pos // side

    qkeys = [box(i + off, a["qblock"]) for i in range(Lq)]
    groups = sorted(set(qkeys))
    kkeys = [box(j, a["block"]) for j in range(Lk)]
    blocks = sorted(set(kkeys))
    among = brute_node(a["among"], Lq, Lk, 0, layout)
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    out = {}
    for b, kvh in itertools.product(range(batch), range(kv_heads)):
        for g in groups:
            members = [i for i in range(Lq) if qkeys[i] == g]
            scores = {}
            for blk in blocks:
                keys = [j for j in range(Lk) if kkeys[j] == blk]
                total = 0.0
                for h in range(kvh * (heads // kv_heads), (kvh + 1) * (heads // kv_heads)):
                    for d in range(dim):
                        qs = [float(q[b, h, i, d]) for i in members]
                        ks = [float(k[b, kvh, j, d]) for j in keys]
                        pq = max(qs) if a["score"] == "max" else sum(qs) / len(qs)
                        pk = {"mean": sum(ks) / len(ks), "max": max(ks), "landmark": ks[-1]}[a["score"]]
                        total += pq * pk
                scores[blk] = total
            cands = [blk for blk in blocks if any(among[i][j] for i in members for j in range(Lk) if kkeys[j] == blk)]
            ranked = sorted(cands, key=lambda blk: (-scores[blk], blk))
            out[b, kvh, g] = set(ranked[: a["topk"]])
    return out, qkeys, kkeys


CASES = [
    (prim("route", 2, block=3), 10, 10, None),
    (prim("route", 1, block=4, score="max"), 6, 11, None),
    (
        prim("route", 2, block=2, score="landmark", qblock=1, among=ir.difference(prim("causal"), prim("window", 1))),
        7,
        9,
        None,
    ),
    (prim("route", 3, block=2, qblock=3, among=prim("causal")), 9, 9, None),
    (prim("route", 1, block=3, qblock=2), 8, 5, None),
    (prim("route", 2, block=(2, 3), qblock=(1, 3), score="max"), 18, 18, {"y": 3, "x": 6}),
]


@pytest.mark.parametrize("r,Lq,Lk,layout", CASES, ids=[str(c[0]) for c in CASES])
@pytest.mark.parametrize("heads,kv_heads", [(1, 1), (4, 2), (3, 1)])
def test_selection_matches_loop_oracle(r, Lq, Lk, layout, heads, kv_heads):
    gen = torch.Generator().manual_seed(Lq * 100 + Lk + heads)
    q = torch.randn(2, heads, Lq, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(2, kv_heads, Lk, 3, generator=gen, dtype=torch.float64)
    expected, qkeys, kkeys = brute_selection(r, q, k, Lq, Lk, ir.Layout(tuple(layout.items())) if layout else None)
    pir = pattern(ir.inter(prim("causal"), r) if layout is None else r, layout)
    got = semantics.mask(pir, Lq, Lk, heads=heads, q=q, k=k)
    for b, h, i, j in itertools.product(range(2), range(heads), range(Lq), range(Lk)):
        chosen = kkeys[j] in expected[b, h // (heads // kv_heads), qkeys[i]]
        causal_ok = layout is not None or j <= i + Lk - Lq
        assert bool(got[b, h, i, j]) == (chosen and causal_ok)


def test_low_precision_inputs_are_scored_in_float32():
    r = prim("route", 2, block=4)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 16, 8, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 16, 8, generator=gen).to(torch.bfloat16)
    assert torch.equal(select(r, q, k), select(r, q.float(), k.float()))


def test_route_only_on_some_heads():
    r = prim("route", 1, block=2)
    pir = pattern(prim("causal"), heads=[(1, 2, r)])
    q = torch.tensor([[1.0, 1.0], [1.0, 1.0]]).view(1, 2, 2, 1)
    k = col(0, 0, 1, 1).float()
    m = semantics.mask(pir, 2, 4, heads=2, q=q, k=k)
    assert m[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert m[0, 1].tolist() == [[False, False, True, True]] * 2


def test_inputs_that_require_grad():
    q = torch.randn(1, 1, 4, 2, requires_grad=True)
    k = torch.randn(1, 1, 4, 2, requires_grad=True)
    m = semantics.mask(pattern(prim("route", 1, block=2)), 4, q=q, k=k)
    assert m.shape == (1, 1, 4, 4) and not m.requires_grad


@pytest.mark.parametrize(
    "node",
    [
        ir.inter(prim("causal"), ir.union(prim("blocks", 4), prim("route", 1, block=4, among=prim("causal")))),
        ir.difference(prim("window", 5, 2), prim("route", 2, block=3)),
        ir.union(prim("sink", 1), ir.complement(ir.inter(prim("causal"), prim("route", 1, block=2, qblock=1)))),
    ],
    ids=str,
)
def test_route_bounds_hold_for_any_data(node):
    lower, upper = semantics.route_bounds(node)
    assert not ir.is_dynamic(lower) and not ir.is_dynamic(upper)
    lo = semantics.mask(pattern(lower), 12, heads=2)
    up = semantics.mask(pattern(upper), 12, heads=2)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(2, 2, 12, 3, generator=gen)
        k = torch.randn(2, 1, 12, 3, generator=gen)
        got = semantics.mask(pattern(node), 12, heads=2, q=q, k=k)
        assert not (lo & ~got).any() and not (got & ~up).any()
    assert (up & ~lo).any()  # the route really is undecided somewhere
