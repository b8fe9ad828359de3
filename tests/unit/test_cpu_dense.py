"""CPU executor: plain ``causal`` and ``full`` run as torch's fused kernel on the whole tensors (runtime/cpu/dense.py).

Checked against the float64 reference: outputs, log-sum-exp and gradients, with ``Lq != Lk`` both
ways (end-aligned causal cut into a dense prefix and a causal square; rows before the first key
empty), grouped-query heads, the routing (which patterns and calls take it) and the NaN rules.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import dense
from tests.reference import reference_attention
from tests.spies import count_calls


def _compile(body: str):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


@pytest.fixture
def calls(monkeypatch):
    """Counts the dense path's forward and backward calls."""
    return count_calls(monkeypatch, dense)


@pytest.mark.parametrize("body", ["causal", "full"])
@pytest.mark.parametrize("lq,lk,h,hkv", [(45, 45, 4, 4), (30, 71, 4, 2), (71, 30, 2, 1), (3, 20, 4, 2), (1, 20, 8, 2)])
def test_values_lse_and_gradients_match_reference(body, lq, lk, h, hkv, calls):
    pattern = _compile(body)
    gen = torch.Generator().manual_seed(lq * lk + h)
    q = torch.randn(2, h, lq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hkv, lk, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = pattern(q, k, v, return_lse=True)
    assert calls["forward"] == 1
    mask = pattern.mask(lq, lk, h)
    ref, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    empty = ~mask.any(-1).expand(2, -1, -1)
    assert bool(empty.any()) == (body == "causal" and lq > lk)
    assert bool(torch.isneginf(lse[empty]).all()) and bool((out[empty] == 0).all())
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert calls["backward"] == 1
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    assert bool((got[0][empty] == 0).all())


def test_float32_gqa_matches_reference(calls):
    pattern = _compile("causal")
    q = torch.randn(1, 6, 100, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(2))
    # The native kernel would take this square causal call (test_cpu_native covers it).
    with cpu.options(native_dense=False):
        out = pattern(q, k, v, scale=0.3)
    ref, _ = reference_attention(q, k, v, pattern.mask(100, 100, 6), 0.3)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    with cpu.options(native_dense=False):
        got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)
    assert calls == {"forward": 1, "backward": 1}


def test_lse_gradient_takes_the_tile_schedule_and_is_exact(calls):
    pattern = _compile("causal")
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weights = torch.linspace(-1, 1, 40, dtype=torch.float64)

    def loss(out, lse):
        return (out * 0.5).sum() + (lse * weights).sum()

    got = torch.autograd.grad(loss(*pattern(q, k, v, return_lse=True)), (q, k, v))
    assert calls == {"forward": 1, "backward": 0}
    want = torch.autograd.grad(loss(*reference_attention(q, k, v, pattern.mask(40, 40, 2))), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "body,options",
    [
        ("causal & window(5)", {}),
        ("causal - window(0)", {}),
        ("heads 0..1: causal\nfull", {}),
        ("causal", {"kernel": "math"}),
        ("causal", {"dense": False}),
    ],
    ids=["window", "strict", "per_head", "math", "off"],
)
def test_other_patterns_and_calls_run_through_the_tiles(body, options, calls):
    pattern = _compile(body)
    q, k, v = (torch.randn(1, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    with cpu.options(**options):
        out = pattern(q, k, v)
    assert calls["forward"] == 0
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern.mask(33, 33, 2))[0], atol=1e-12, rtol=1e-12)


def test_values_of_their_own_head_size_are_not_given_to_the_kernel():
    """The kernel wants one head size (attention() pads v to it; a direct executor call may not)."""
    plan = _compile("causal").plan(16, 16, 1)
    q, v = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 12)
    assert dense.applies(plan, q, q, cpu.CpuOptions(), None)
    assert not dense.applies(plan, q, v, cpu.CpuOptions(), None)


def test_a_nan_key_reaches_only_the_rows_that_see_it(calls):
    """The kernel adds its causal mask, so a NaN key poisons earlier rows there; the selecting rerun fixes it."""
    pattern = _compile("causal")
    q, k, v = (torch.randn(1, 1, 20, 4, dtype=torch.float64) for _ in range(3))
    k[0, 0, 12] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pattern(*leaves)
    assert bool(torch.isnan(out[0, 0, 12:]).all()) and not bool(torch.isnan(out[0, 0, :12]).any())
    ref, _ = reference_attention(q, k, v, pattern.mask(20, 20, 1))
    torch.testing.assert_close(out[0, 0, :12], ref[0, 0, :12], atol=1e-12, rtol=1e-12)
    (out[:, :, :12] ** 2).sum().backward()
    assert bool(torch.isfinite(leaves[0].grad[0, 0, :12]).all())


def test_strided_layouts_are_read_as_they_are(calls):
    """The kernel reads a head's vector as contiguous: a tensor whose head dim is strided (v and dO here)
    is copied first; a [B, L, H, D] layout seen as [B, H, L, D] is read in place."""
    pattern = _compile("causal")
    q = torch.randn(2, 30, 4, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 2, 30, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 8, 30, dtype=torch.float64).transpose(2, 3).requires_grad_()
    grad = torch.randn(2, 4, 8, 30, dtype=torch.float64).transpose(2, 3)
    out, lse = pattern(q, k, v, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, pattern.mask(30, 30, 4))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    assert calls == {"forward": 1, "backward": 1}
