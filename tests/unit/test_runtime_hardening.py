"""Hardening of the runtime (issue 11): zero batches, float64 computed in float64 throughout, and the fake
kernels' log-sum-exp dtype."""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl.runtime import op, plans

CAUSAL = "pattern p { causal }"
WINDOW = "pattern p { window(2) | sink(1) }"
PER_HEAD = "pattern p {\n heads 0..1: causal\n window(1, 3)\n}"
MOBA = "pattern p { causal & (blocks(4) | route(topk = 1, block = 4, qblock = 1, among = causal - blocks(4))) }"


@pytest.mark.parametrize("src", [CAUSAL, WINDOW, MOBA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_batch_gives_empty_outputs_and_gradients(src, dtype):
    p = patterndsl.compile(src)
    q, k, v = (torch.randn(0, 2, 8, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    assert out.shape == (0, 2, 8, 4) and out.dtype == dtype
    assert lse.shape == (0, 2, 8) and lse.dtype == op.lse_dtype(dtype)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape


def test_zero_batch_through_the_executor_directly():
    from patterndsl.runtime import cpu

    p = patterndsl.compile(CAUSAL)
    plan = p.plan(8, block=(4, 4))
    q = torch.randn(0, 2, 8, 4)
    out, lse = cpu.forward(q, q, q, plan, 0.5)
    assert out.shape == q.shape and lse.shape == (0, 2, 8)
    grads = cpu.backward(q, q, q, out, lse, out, plan, 0.5)
    assert [g.shape for g in grads] == [q.shape] * 3


def test_zero_length_sequences_are_a_pattern_error_not_a_crash():
    p = patterndsl.compile(CAUSAL)
    x = torch.randn(1, 2, 0, 4)
    with pytest.raises(patterndsl.PatternError):
        p(x, x, x)


@pytest.mark.parametrize("src", [CAUSAL, WINDOW, PER_HEAD, MOBA])
def test_float64_gradcheck_at_default_tolerances(src):
    """float64 inputs are computed in float64 throughout: torch's gradcheck passes with its defaults,
    for the output and for the log-sum-exp (which is float64 too)."""
    p = patterndsl.compile(src)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True)
    assert out.dtype == lse.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda q, k, v: p(q, k, v), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: p(q, k, v, return_lse=True)[1].nan_to_num(neginf=0.0), (q, k, v))


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_float64_lse_is_float64_exact(kernel):
    from patterndsl.runtime import cpu

    p = patterndsl.compile(WINDOW)
    q, k, v = (torch.randn(2, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    with cpu.options(kernel=kernel):
        _, lse = p(q, k, v, return_lse=True)
    mask = p.mask(33)
    s = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    assert lse.dtype == torch.float64
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_fake_lse_dtype_follows_the_inputs(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = plans.register(patterndsl.compile(CAUSAL).ir, (16, 16), "auto")
    q = torch.randn(1, 2, 8, 4, dtype=dtype)
    out, lse = op.attention_fwd(q, q, q, key, [], 0.5, "cpu")
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        fake_out, fake_lse = op.attention_fwd(fq, fq, fq, key, [], 0.5, "cpu")
    assert fake_lse.dtype == lse.dtype == op.lse_dtype(dtype)
    assert fake_out.dtype == out.dtype == dtype


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("what", ["k", "v", "kv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_in_the_last_key_stays_in_the_row_that_sees_it(kernel, what, value):
    """The issue's case: causal at L = 40 with a non-finite last key. As with SDPA's is_causal, only the
    last row sees it; every other row's output and gradient are finite and exact."""
    from patterndsl.runtime import cpu

    p = patterndsl.compile(CAUSAL)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    kb, vb = k.clone(), v.clone()
    for name in what:
        (kb if name == "k" else vb)[0, 0, -1] = value
    leaves = [t.clone().requires_grad_() for t in (q, kb, vb)]
    with cpu.options(kernel=kernel):
        out = p(*leaves)
        (out[:, :, :-1] ** 2).sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_leaves, is_causal=True)
    (ref[:, :, :-1] ** 2).sum().backward()
    torch.testing.assert_close(out[:, :, :-1], ref[:, :, :-1], atol=1e-12, rtol=1e-12)
    if value != value:
        assert bool(torch.isnan(out[0, 0, -1]).any())
    # Row 39 of head 0 attends every key, so only dQ of the other rows is defined there; head 1 holds
    # no poison at all and must be exact everywhere.
    dq, ref_dq = leaves[0].grad, ref_leaves[0].grad
    torch.testing.assert_close(dq[:, 0, :-1], ref_dq[:, 0, :-1], atol=1e-12, rtol=1e-12)
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(leaf.grad[:, 1], ref_leaf.grad[:, 1], atol=1e-12, rtol=1e-12)
