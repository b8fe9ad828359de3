"""Contract section 2 (dynamic primitives): route(...) selection rule against a hand-written brute force."""

from __future__ import annotations

import math

import pytest
import torch

import patterndsl
from tests.contract import oracle as o


def among_mask(rule, lq, lk, heads):
    return o.to_mask(lambda q, k, *_: rule(q, k) & o.full_like(q, k), lq, lk, heads)


def data(b=2, h=2, lq=16, lk=None, d=8, hkv=None, seed=0):
    q, k, _v = o.rand_qkv(b=b, hq=h, lq=lq, lk=lk, d=d, hkv=hkv, seed=seed)
    return q, k


ROUTES = [
    # (source args, oracle kwargs, among rule or None)
    ("2, block = 4", dict(topk=2, block=4), None),
    ("topk = 1, block = 4, score = max", dict(topk=1, block=4, score="max"), None),
    ("3, 4, score = landmark", dict(topk=3, block=4, score="landmark"), None),
    ("2, block = 4, qblock = 1", dict(topk=2, block=4, qblock=1), None),
    ("2, block = 4, qblock = 2", dict(topk=2, block=4, qblock=2), None),
    ("1, block = 3, qblock = 5", dict(topk=1, block=3, qblock=5), None),
    ("2, block = 4, among = causal", dict(topk=2, block=4), o.causal),
    ("3, block = 4, qblock = 1, among = causal", dict(topk=3, block=4, qblock=1), o.causal),
    (
        "2, block = 4, qblock = 1, among = causal - blocks(4)",
        dict(topk=2, block=4, qblock=1),
        lambda q, k: o.causal(q, k) & ~o.blocks(q, k, 4),
    ),
    (
        "2, block = 4, score = landmark, qblock = 1, among = causal - window(3)",
        dict(topk=2, block=4, score="landmark", qblock=1),
        lambda q, k: o.causal(q, k) & ~o.window(q, k, 3),
    ),
    ("10, block = 4", dict(topk=10, block=4), None),
]


@pytest.mark.parametrize("args,kw,among", ROUTES, ids=[r[0] for r in ROUTES])
@pytest.mark.parametrize("lq,lk", [(16, 16), (6, 16), (14, 14), (16, 10)])
def test_route_mask_matches_selection_rule(args, kw, among, lq, lk):
    q, k = data(lq=lq, lk=lk, seed=lq * 31 + lk)
    p = patterndsl.compile(f"pattern p {{ route({args}) }}")
    got = p.mask(lq, lk, 2, q=q, k=k)
    assert got.dtype == torch.bool and tuple(got.shape) == (2, 2, lq, lk)
    am = None if among is None else among_mask(among, lq, lk, 2)
    want = o.route_mask(q, k, among=am, **kw)
    assert torch.equal(got, want)


def test_route_ties_go_to_lower_block_index():
    # Every key block has the same contents, so every candidate scores the same.
    q = torch.ones(1, 1, 16, 4)
    k = torch.arange(4.0)[:, None].repeat(4, 4)[None, None]  # key j holds j % 4: blocks of 4 are identical
    got = patterndsl.compile("pattern p { route(2, block = 4) }").mask(16, 16, 1, q=q, k=k)[0, 0]
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[:, :8] = True
    assert torch.equal(got, want)
    got = patterndsl.compile("pattern p { route(2, block = 4, among = ~blocks(4)) }").mask(16, 16, 1, q=q, k=k)[0, 0]
    expect = {0: {1, 2}, 1: {0, 2}, 2: {0, 1}, 3: {0, 1}}
    for a, chosen in expect.items():
        rows = got[a * 4 : a * 4 + 4]
        have = {b for b in range(4) if bool(rows[:, b * 4 : b * 4 + 4].all())}
        assert have == chosen
        assert int(rows.sum()) == 4 * 4 * len(chosen)


def test_route_gives_fewer_blocks_when_fewer_candidates():
    q, k = data(b=1, h=1, lq=16)
    got = patterndsl.compile("pattern p { route(3, block = 4, among = causal) }").mask(16, 16, 1, q=q, k=k)[0, 0]
    # Query group a (positions 4a..4a+3) has candidates 0..a under causal: min(3, a + 1) blocks.
    for a in range(4):
        n_blocks = int(got[a * 4].sum()) // 4
        assert n_blocks == min(3, a + 1)
        assert not bool(got[a * 4 : a * 4 + 4, (a + 1) * 4 :].any())


def test_route_scores_are_per_batch_element_and_head():
    q, k = data(b=3, h=3, lq=16, seed=5)
    got = patterndsl.compile("pattern p { route(1, block = 4) }").mask(16, 16, 3, q=q, k=k)
    want = o.route_mask(q, k, topk=1, block=4)
    assert torch.equal(got, want)
    # With random data the choices should not all coincide across batch and heads.
    flat = got.reshape(9, 16, 16)
    assert any(not torch.equal(flat[0], flat[i]) for i in range(1, 9))


def test_route_grid_boxes_biformer():
    src = "pattern p { layout grid(y = 4, x = 6)\n route(topk = 2, block = (2, 3)) }"
    q, k = data(b=1, h=2, lq=24, seed=3)
    got = patterndsl.compile(src).mask(24, 24, 2, q=q, k=k)
    want = o.route_mask(q, k, topk=2, block=(2, 3), extents=(4, 6))
    assert torch.equal(got, want)


def test_route_grid_boxes_with_qblock_tuple():
    src = "pattern p { layout grid(y = 4, x = 4)\n route(topk = 1, block = (2, 2), qblock = (1, 2)) }"
    q, k = data(b=1, h=1, lq=16, seed=4)
    got = patterndsl.compile(src).mask(16, 16, 1, q=q, k=k)
    want = o.route_mask(q, k, topk=1, block=(2, 2), qblock=(1, 2), extents=(4, 4))
    assert torch.equal(got, want)


def moba(q, k, block=4, topk=2):
    lq, lk, h = q.shape[2], k.shape[2], q.shape[1]
    among = among_mask(lambda a, b: o.causal(a, b) & ~o.blocks(a, b, block), lq, lk, h)
    r = o.route_mask(q, k, topk=topk, block=block, qblock=1, among=among)
    static = among_mask(lambda a, b: o.blocks(a, b, block), lq, lk, h)
    causal = among_mask(o.causal, lq, lk, h)
    return causal[None] & (static[None] | r)


MOBA = "pattern moba { causal & (blocks(4) | route(topk = 2, block = 4, qblock = 1, among = causal - blocks(4))) }"
LANDMARK = (
    "pattern lm { causal & (window(3) | route(topk = 2, block = 4, score = landmark, qblock = 1,"
    " among = causal - window(3))) }"
)


def test_moba_example_compiles_and_matches():
    q, k = data(b=1, h=2, lq=20, seed=9)
    got = patterndsl.compile(MOBA).mask(20, 20, 2, q=q, k=k)
    assert torch.equal(got, moba(q, k))


def test_landmark_example_compiles_and_matches():
    q, k = data(b=2, h=1, lq=12, lk=20, seed=11)
    got = patterndsl.compile(LANDMARK).mask(12, 20, 1, q=q, k=k)
    among = among_mask(lambda a, b: o.causal(a, b) & ~o.window(a, b, 3), 12, 20, 1)
    r = o.route_mask(q, k, topk=2, block=4, score="landmark", qblock=1, among=among)
    static = among_mask(lambda a, b: o.causal(a, b) & o.window(a, b, 3), 12, 20, 1)
    causal = among_mask(o.causal, 12, 20, 1)
    assert torch.equal(got, static[None] | (causal[None] & r))


def test_contract_examples_at_full_size_compile():
    patterndsl.compile(MOBA.replace("(4)", "(512)").replace("block = 4", "block = 512"))
    src = (
        "pattern lm { causal & (window(63) | route(topk = 4, block = 64, score = landmark, qblock = 1,"
        " among = causal - window(63))) }"
    )
    patterndsl.compile(src)


def test_route_mask_requires_data():
    p = patterndsl.compile("pattern p { route(2, block = 4) }")
    o.expect_pattern_error(lambda: p.mask(16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_route_attention_matches_reference(dtype):
    q, k, v = o.rand_qkv(b=2, hq=2, lq=20, d=8, seed=21)
    got = patterndsl.compile(MOBA)(q.to(dtype), k.to(dtype), v.to(dtype), backend="cpu")
    assert got.dtype == dtype
    # Scores in float32 at least: choose from the cast inputs as the product would see them.
    m = moba(q.to(dtype), k.to(dtype))
    want, _ = o.reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), m)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol * 10)


def test_route_gqa_query_heads_share_one_choice():
    q, k, v = o.rand_qkv(b=2, hq=4, hkv=2, lq=16, d=8, seed=13)
    p = patterndsl.compile("pattern p { causal & route(2, block = 4, among = causal) }")
    out, lse = p(q, k, v, return_lse=True, backend="cpu")
    am = among_mask(o.causal, 16, 16, 4)
    m = o.route_mask(q, k, topk=2, block=4, among=am) & am[None]
    # The choice is shared by heads 0,1 and by heads 2,3 (scores added per kv head).
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 2], m[:, 3])
    want, want_lse = o.reference_attention(q, k, v, m)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_route_gradients_flow_through_attention_not_choice():
    q, k, v = o.rand_qkv(b=1, hq=2, lq=16, d=8, seed=17, grad=True)
    p = patterndsl.compile(MOBA)
    out = p(q, k, v, backend="cpu")
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    m = moba(q.detach(), k.detach())
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, _ = o.reference_attention(q2, k2, v2, m)
    wq, wk, wv = torch.autograd.grad(want, (q2, k2, v2), g.double())
    for a, b in ((dq, wq), (dk, wk), (dv, wv)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_route_plan_marks_dynamic_tiles_3_and_others_exact():
    p = patterndsl.compile(MOBA)
    lq, bm = 20, 4
    plan = p.plan(lq, lq, heads=2, block=(bm, bm), order="identity")
    tiles = plan.tiles()
    assert tiles.dtype == torch.int8 and tuple(tiles.shape) == (2, math.ceil(lq / bm), math.ceil(lq / bm))
    assert bool((tiles == 3).any()), "route decides some tiles at run time"
    assert set(tiles.unique().tolist()) <= {0, 1, 2, 3}
    fixed = tiles != 3
    for seed in range(4):
        q, k = data(b=1, h=2, lq=lq, seed=100 + seed)
        m = moba(q, k)[0]
        red = o.tile_reduce(m, bm, bm)
        assert torch.equal(tiles[fixed], red[fixed])
    # Above the diagonal nothing is ever allowed (causal): those tiles are exactly empty, not 3.
    for a in range(tiles.shape[1]):
        assert bool((tiles[:, a, a + 1 :] == 0).all())


def test_route_plan_unequal_lengths_and_auto_order_exact_outside_dynamic_tiles():
    src = "pattern p { causal & (window(2) | route(1, block = 4, among = causal)) }"
    p = patterndsl.compile(src)
    lq, lk = 12, 20
    for order in ("auto", "identity"):
        plan = p.plan(lq, lk, heads=2, block=(4, 4), order=order)
        qo, ko = plan.q_order, plan.kv_order
        assert torch.equal(torch.sort(qo).values, torch.arange(lq)) and torch.equal(
            torch.sort(ko).values, torch.arange(lk)
        )
        tiles = plan.tiles()
        fixed = tiles != 3
        for seed in range(3):
            q, k = data(b=1, h=2, lq=lq, lk=lk, seed=200 + seed)
            am = among_mask(o.causal, lq, lk, 2)
            static = among_mask(lambda a, b: o.causal(a, b) & o.window(a, b, 2), lq, lk, 2)
            m = (static[None] | (am[None] & o.route_mask(q, k, topk=1, block=4, among=am)))[0]
            red = o.tile_reduce(m[:, qo][:, :, ko], 4, 4)
            assert torch.equal(tiles[fixed], red[fixed])


def test_route_plan_marks_3_only_tiles_decided_at_run_time():
    # Diagonal tiles of causal & (window(2) | route(...)) are partial whatever route picks: the
    # causal upper triangle is never allowed and the diagonal always is. Their state is not
    # "decided only at run time", so they must be 1, not 3. The off-diagonal lower tiles do
    # depend on the choice (empty or partial/full) and may be 3.
    p = patterndsl.compile("pattern p { causal & (window(2) | route(1, block = 4, among = causal)) }")
    tiles = p.plan(16, block=(4, 4), order="identity").tiles()[0]
    assert tiles.diagonal().tolist() == [1, 1, 1, 1]
    # route(1, among = blocks(4)): group a has a single candidate, block a, so it is always chosen.
    tiles = patterndsl.compile("pattern p { route(1, block = 4, among = blocks(4)) }").plan(16, block=(4, 4)).tiles()[0]
    assert tiles.tolist() == [[2 if a == b else 0 for b in range(4)] for a in range(4)]


def test_route_kernel_source_is_text():
    src = patterndsl.compile(MOBA.replace("(4)", "(64)").replace("block = 4", "block = 64")).kernel_source(256)
    assert isinstance(src, str) and "triton" in src


def test_route_scores_in_float32_at_least():
    # float16 inputs whose dot products overflow float16 (8 * 200 * 200 > 65504): computed in
    # float16 every score is inf and the tie would go to block 0; in float32 block 3 wins.
    q = torch.full((1, 1, 16, 8), 200.0, dtype=torch.float16)
    k = torch.cat([torch.full((4, 8), 200.0 + 0.5 * b) for b in range(4)])[None, None].to(torch.float16)
    got = patterndsl.compile("pattern p { route(1, block = 4) }").mask(16, 16, 1, q=q, k=k)[0, 0]
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[:, 12:] = True
    assert torch.equal(got, want)
    assert torch.equal(got, o.route_mask(q, k, topk=1, block=4)[0, 0])
