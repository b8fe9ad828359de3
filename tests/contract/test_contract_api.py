"""Contract section 3: plan(...) tiles/orders/statistics, attention and Pattern.__call__, kernel_source."""

from __future__ import annotations

import math

import pytest
import torch

import patterndsl
from tests.contract import oracle as o

# (source, rule or dense-mask builder) for static patterns used across the API tests.
PATTERNS = {
    "streaming": (
        "pattern p { causal & (window(5) | sink(2)) }",
        lambda q, k: o.causal(q, k) & (o.window(q, k, 5) | o.sink(q, k, 2)),
    ),
    "dilated": ("pattern p { window(3, 3, 3) }", lambda q, k: o.window(q, k, 3, 3, 3)),
    "strided": (
        "pattern p { causal & (strided(4) | blocks(4)) }",
        lambda q, k: o.causal(q, k) & (o.strided(q, k, 4) | o.blocks(q, k, 4)),
    ),
    "bigbird": (
        "pattern p { where(abs(q // 4 - k // 4) <= 1) | global(4) }",
        lambda q, k: (abs(q // 4 - k // 4) <= 1) | o.global_(q, k, 4),
    ),
    "empty_rows": ("pattern p { where(q % 3 != 1) & causal }", lambda q, k: (q % 3 != 1) & o.causal(q, k)),
    "empty": ("pattern p { empty }", lambda q, k: ~o.full_like(q, k)),
}

GRID = "pattern p { layout grid(y = 6, x = 6)\n neighborhood(3, dilation = 2) }"


def dense(name, lq, lk=None, heads=1):
    return o.to_mask(lambda q, k, *_: PATTERNS[name][1](q, k) & o.full_like(q, k), lq, lk, heads)


def stat(plan, name):
    """A plan statistic by name, on the plan or on its ``stats`` record (the contract names neither)."""
    for holder in (plan, getattr(plan, "stats", None)):
        if holder is not None and hasattr(holder, name):
            v = getattr(holder, name)
            return v() if callable(v) else v
    raise AssertionError(f"plan reports no {name!r}")


def check_plan(plan, mask, bm, bn):
    lq, lk = mask.shape[1], mask.shape[2]
    tiles = plan.tiles()
    assert tiles.dtype == torch.int8
    assert tuple(tiles.shape) == (mask.shape[0], math.ceil(lq / bm), math.ceil(lk / bn))
    qo, ko = plan.q_order, plan.kv_order
    assert qo.dtype == torch.int64 and ko.dtype == torch.int64
    assert torch.equal(torch.sort(qo).values, torch.arange(lq))
    assert torch.equal(torch.sort(ko).values, torch.arange(lk))
    assert torch.equal(tiles, o.tile_reduce(mask[:, qo][:, :, ko], bm, bn))
    return tiles


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("order", ["auto", "identity"])
@pytest.mark.parametrize(
    "lq,lk,bm,bn", [(24, 24, 4, 4), (23, 23, 4, 8), (10, 30, 4, 4), (30, 10, 8, 2), (16, 16, 16, 16)]
)
def test_plan_tiles_equal_dense_reduction(name, order, lq, lk, bm, bn):
    p = patterndsl.compile(PATTERNS[name][0])
    plan = p.plan(lq, lk, heads=2, block=(bm, bn), order=order)
    check_plan(plan, dense(name, lq, lk, 2), bm, bn)
    if order == "identity":
        assert torch.equal(plan.q_order, torch.arange(lq)) and torch.equal(plan.kv_order, torch.arange(lk))


def test_plan_default_order_is_auto_and_kv_len_defaults_to_q_len():
    p = patterndsl.compile(PATTERNS["dilated"][0])
    a = p.plan(24, block=(4, 4))
    b = p.plan(24, 24, heads=1, block=(4, 4), order="auto")
    assert torch.equal(a.tiles(), b.tiles()) and torch.equal(a.q_order, b.q_order)
    check_plan(a, dense("dilated", 24), 4, 4)


def test_plan_default_block_is_128():
    p = patterndsl.compile("pattern p { causal }")
    assert tuple(p.plan(300).tiles().shape) == (1, 3, 3)


@pytest.mark.parametrize("order", ["auto", "identity"])
def test_plan_grid_and_heads(order):
    p = patterndsl.compile(GRID)
    plan = p.plan(36, heads=2, block=(4, 4), order=order)
    check_plan(plan, o.neighborhood_mask((6, 6), 3, 2).expand(2, 36, 36), 4, 4)
    src = "pattern p {\n heads 0..1: causal\n window(2, 2)\n}"
    plan = patterndsl.compile(src).plan(12, heads=3, block=(4, 4), order=order)
    m = o.to_mask(lambda q, k, h, *_: o.causal(q, k) if h == 0 else o.window(q, k, 2, 2), 12, heads=3)
    check_plan(plan, m, 4, 4)


def test_plan_auto_can_reorder_dilated_pattern_denser():
    # The contract permits (not requires) reordering; when it does reorder, tiles must follow.
    p = patterndsl.compile("pattern p { strided(4) }")
    auto = p.plan(32, block=(8, 8), order="auto")
    ident = p.plan(32, block=(8, 8), order="identity")
    check_plan(auto, dense_rule(lambda q, k: o.strided(q, k, 4), 32), 8, 8)
    assert stat(auto, "block_efficiency") >= stat(ident, "block_efficiency") - 1e-12


def dense_rule(rule, lq, lk=None, heads=1):
    return o.to_mask(lambda q, k, *_: rule(q, k) & o.full_like(q, k), lq, lk, heads)


@pytest.mark.parametrize("order", ["auto", "identity"])
@pytest.mark.parametrize("lq,lk,bm,bn", [(24, 24, 4, 4), (22, 30, 8, 4)])
def test_plan_statistics(order, lq, lk, bm, bn):
    p = patterndsl.compile(PATTERNS["streaming"][0])
    plan = p.plan(lq, lk, heads=2, block=(bm, bn), order=order)
    m = dense("streaming", lq, lk, 2)
    tiles = plan.tiles()
    assert stat(plan, "density") == pytest.approx(m.sum().item() / m.numel())
    counts = {v: int((tiles == v).sum()) for v in (0, 1, 2)}
    found = {}
    for key, names in {
        0: ("tiles_empty", "empty_tiles", "n_empty"),
        1: ("tiles_partial", "partial_tiles", "n_partial"),
        2: ("tiles_full", "full_tiles", "n_full"),
    }.items():
        for n in names:
            try:
                found[key] = stat(plan, n)
                break
            except AssertionError:
                continue
    assert found == counts, "plan must report its empty/partial/full tile counts"
    # Block efficiency: allowed pairs over pairs in visited (non-empty) tiles, counting real pairs at the edges.
    mm = m[:, plan.q_order][:, :, plan.kv_order]
    visited = 0
    for h, a, b in zip(*torch.nonzero(tiles, as_tuple=True), strict=True):
        visited += mm[h, a * bm : (a + 1) * bm, b * bn : (b + 1) * bn].numel()
    assert stat(plan, "block_efficiency") == pytest.approx(m.sum().item() / visited)


# Attention.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run_both(p, q, k, v, m, **kw):
    got = p(q, k, v, **kw)
    also = patterndsl.attention(q, k, v, p, **kw)
    want = o.reference_attention(q, k, v, m, kw.get("scale"))
    return got, also, want


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_matches_float64_reference(name, dtype):
    p = patterndsl.compile(PATTERNS[name][0])
    q, k, v = o.rand_qkv(b=2, hq=2, lq=20, d=8, dtype=dtype, seed=1)
    m = dense(name, 20, 20, 2)
    (out, lse), (out2, lse2), (want, want_lse) = run_both(p, q, k, v, m, return_lse=True, backend="cpu")
    assert out.dtype == dtype and tuple(out.shape) == (2, 2, 20, 8)
    # float32, float64 for float64 inputs (LANGUAGE.md section 3).
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert tuple(lse.shape) == (2, 2, 20)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(lse.double(), want_lse, atol=tol * 4, rtol=tol * 4)
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)


def test_empty_rows_give_zero_output_and_minus_inf_lse():
    p = patterndsl.compile(PATTERNS["empty_rows"][0])
    q, k, v = o.rand_qkv(b=1, hq=1, lq=9, d=4)
    out, lse = p(q, k, v, return_lse=True)
    rows = [i for i in range(9) if i % 3 == 1]
    assert bool((out[0, 0, rows] == 0).all())
    assert bool(torch.isneginf(lse[0, 0, rows]).all())
    assert bool(torch.isfinite(lse[0, 0, [0, 2, 3]]).all())


def test_empty_pattern_output_zero_and_gradients_finite():
    p = patterndsl.compile("pattern p { empty }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=6, d=4, grad=True)
    out, lse = p(q, k, v, return_lse=True)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and bool(torch.isfinite(t.grad).all()) and bool((t.grad == 0).all())


@pytest.mark.parametrize("lq,lk", [(5, 17), (17, 5), (1, 12)])
def test_attention_unequal_lengths_end_aligned(lq, lk):
    p = patterndsl.compile(PATTERNS["streaming"][0])
    q, k, v = o.rand_qkv(b=1, hq=2, lq=lq, lk=lk, d=8, seed=2)
    out, lse = p(q, k, v, return_lse=True)
    want, want_lse = o.reference_attention(q, k, v, dense("streaming", lq, lk, 2))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 3)])
def test_attention_gqa(hq, hkv):
    src = "pattern p { causal & where((q + h) % 3 != 0 or k == 0) }"
    p = patterndsl.compile(src)
    q, k, v = o.rand_qkv(b=2, hq=hq, hkv=hkv, lq=11, d=8, seed=3)
    m = o.to_mask(lambda a, b, h, *_: o.causal(a, b) & (((a + h) % 3 != 0) | (b == 0)), 11, heads=hq)
    out, lse = p(q, k, v, return_lse=True)
    want, want_lse = o.reference_attention(q, k, v, m)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_scale_default_and_explicit():
    p = patterndsl.compile(PATTERNS["bigbird"][0])
    q, k, v = o.rand_qkv(b=1, hq=1, lq=16, d=16, seed=4)
    m = dense("bigbird", 16)
    out = p(q, k, v)
    torch.testing.assert_close(out.double(), o.reference_attention(q, k, v, m, 16**-0.5)[0], atol=1e-5, rtol=1e-5)
    out = p(q, k, v, scale=0.37)
    torch.testing.assert_close(out.double(), o.reference_attention(q, k, v, m, 0.37)[0], atol=1e-5, rtol=1e-5)
    # lse is the natural log of the sum of exp(scale * q.k) over allowed keys.
    _, lse = p(q, k, v, scale=1.0, return_lse=True)
    torch.testing.assert_close(lse.double(), o.reference_attention(q, k, v, m, 1.0)[1], atol=1e-5, rtol=1e-5)


def test_return_lse_false_gives_a_tensor():
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=4, d=4)
    assert isinstance(p(q, k, v), torch.Tensor)
    assert isinstance(p(q, k, v, return_lse=True), tuple) and len(p(q, k, v, return_lse=True)) == 2


@pytest.mark.parametrize(
    "src,mask",
    [
        (GRID, lambda: o.neighborhood_mask((6, 6), 3, 2)),
        (
            "pattern p { strided(4) | blocks(4) }",
            lambda: dense_rule(lambda q, k: o.strided(q, k, 4) | o.blocks(q, k, 4), 36),
        ),
    ],
)
def test_reordering_plans_return_original_order(src, mask):
    p = patterndsl.compile(src)
    q, k, v = o.rand_qkv(b=1, hq=2, lq=36, d=8, seed=6)
    out, lse = p(q, k, v, return_lse=True)
    want, want_lse = o.reference_attention(q, k, v, mask())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["streaming", "dilated", "empty_rows"])
def test_gradients_match_autograd_through_reference(name):
    p = patterndsl.compile(PATTERNS[name][0])
    q, k, v = o.rand_qkv(b=2, hq=2, lq=14, lk=18, d=8, seed=7, grad=True)
    out = p(q, k, v)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, _ = o.reference_attention(q2, k2, v2, dense(name, 14, 18, 2))
    wq, wk, wv = torch.autograd.grad(want, (q2, k2, v2), g.double())
    for a, b in ((dq, wq), (dk, wk), (dv, wv)):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_gradients_gqa():
    p = patterndsl.compile(PATTERNS["streaming"][0])
    q, k, v = o.rand_qkv(b=1, hq=4, hkv=2, lq=12, d=8, seed=8, grad=True)
    out = p(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    want, _ = o.reference_attention(q2, k2, v2, dense("streaming", 12, 12, 4))
    exp = torch.autograd.grad(want, (q2, k2, v2), g.double())
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_backend_cpu_and_auto_agree():
    p = patterndsl.compile(PATTERNS["dilated"][0])
    q, k, v = o.rand_qkv(b=1, hq=1, lq=16, d=8)
    torch.testing.assert_close(p(q, k, v, backend="cpu"), p(q, k, v, backend="auto"))
    torch.testing.assert_close(p(q, k, v), p(q, k, v, backend="auto"))


def test_backend_triton_on_cpu_without_interpreter_is_a_pattern_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=16, d=16)
    o.expect_pattern_error(lambda: p(q, k, v, backend="triton"), "TRITON_INTERPRET")
    o.expect_pattern_error(lambda: patterndsl.attention(q, k, v, p, backend="triton"), "TRITON_INTERPRET")


@pytest.mark.parametrize("bad", ["cuda_fast", "", "CPU ", None, 3])
def test_bad_backend_name_is_a_pattern_error(bad):
    p = patterndsl.compile("pattern p { causal }")
    q, k, v = o.rand_qkv(b=1, hq=1, lq=4, d=4)
    o.expect_pattern_error(lambda: p(q, k, v, backend=bad), "backend")


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_kernel_source_is_text(kind):
    p = patterndsl.compile(PATTERNS["streaming"][0])
    src = p.kernel_source(128, 128, 2, kind=kind)
    assert isinstance(src, str) and "triton" in src and "def " in src
    assert src == p.kernel_source(128, 128, 2, kind=kind)


def test_kernel_source_default_arguments():
    src = patterndsl.compile("pattern p { causal }").kernel_source(64)
    assert isinstance(src, str) and len(src) > 100


def test_gradients_flow_through_lse_too():
    p = patterndsl.compile(PATTERNS["streaming"][0])
    q, k, v = o.rand_qkv(b=1, hq=2, lq=10, d=4, seed=3, grad=True)
    out, lse = p(q, k, v, return_lse=True)
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = o.reference_attention(q2, k2, v2, dense("streaming", 10, 10, 2))
    want = torch.autograd.grad((ref * go.double()).sum() + (ref_lse * gl.double()).sum(), (q2, k2, v2))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_scores_stay_finite(dtype):
    # Scores far beyond the float16 range must not overflow: softmax is shift-invariant.
    p = patterndsl.compile("pattern p { causal & window(6) }")
    q, k, v = o.rand_qkv(b=1, hq=2, lq=32, d=64, seed=1)
    q, k, v = (q * 20).to(dtype), (k * 20).to(dtype), v.to(dtype)
    out, lse = p(q, k, v, return_lse=True)
    ref, ref_lse = o.reference_attention(q, k, v, p.mask(32, 32, 2))
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-3)


def test_non_contiguous_inputs():
    p = patterndsl.compile(PATTERNS["dilated"][0])
    base = torch.randn(2, 12, 3, 8)  # [batch, seq, heads, dim], as many models keep it
    q = k = v = base.transpose(1, 2)
    out = p(q, k, v)
    want, _ = o.reference_attention(q, k, v, dense("dilated", 12, 12, 3))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "src,length,rule",
    [
        (
            "pattern p { layout grid(y = 16, x = 16)\n neighborhood(3, dilation = 4) }",
            256,
            lambda: o.neighborhood_mask((16, 16), 3, 4),
        ),
        (
            "pattern p { causal & strided(8) }",
            512,
            lambda: dense_rule(lambda q, k: o.causal(q, k) & o.strided(q, k, 8), 512),
        ),
        ("pattern p { window(4, 4, 16) }", 512, lambda: dense_rule(lambda q, k: o.window(q, k, 4, 4, 16), 512)),
    ],
)
def test_attention_in_original_order_at_sizes_where_plans_reorder(src, length, rule):
    p = patterndsl.compile(src)
    # At the kernel tile sizes the default plan does reorder these (dilation/stride classes, grid boxes) ...
    assert not torch.equal(p.plan(length, block=(64, 64)).q_order, torch.arange(length))
    # ... and the attention result must still come back in the original token order.
    q, k, v = o.rand_qkv(b=1, hq=1, lq=length, d=8, seed=12)
    out, lse = p(q, k, v, return_lse=True)
    want, want_lse = o.reference_attention(q, k, v, rule())
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
