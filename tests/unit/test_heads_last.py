"""``runtime.heads_last``: attention returned as ``[batch, Lq, heads, head_dim]`` (the integration's layout).

An eager call that needs no gradient runs the op's implementation directly and keeps the fused
kernel's ``[B, Lq, H, D]`` memory; the others go through the op. Checked against the float64
reference with grouped-query heads and transposed (``transformers``-style) operands, the
non-finite rule (a NaN in a key no row attends stays out), which calls take the direct path, and
gradients through the op when they are needed.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl.runtime import heads_last, op, plans
from tests.reference import reference_attention


def _compile(body: str):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


def _operands(lq, lk, h, hkv, dtype, gen):
    """``q``, ``k``, ``v`` as transformers hands them: ``[B, L, H, D]`` memory viewed as ``[B, H, L, D]``."""
    q = torch.randn(2, lq, h, 8, generator=gen, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(2, lk, hkv, 8, generator=gen, dtype=dtype).transpose(1, 2) for _ in range(2))
    return q, k, v


@pytest.fixture
def direct(monkeypatch):
    """The ``contiguous`` flag of each ``op.forward_impl`` call: False for a call that bypassed the op."""
    seen = []
    original = op.forward_impl

    def spy(*args, contiguous=True, **kwargs):
        seen.append(contiguous)
        return original(*args, contiguous=contiguous, **kwargs)

    monkeypatch.setattr(op, "forward_impl", spy)
    return seen


@pytest.mark.parametrize("body", ["causal", "full", "causal & window(5)"])
@pytest.mark.parametrize("lq,lk,h,hkv", [(37, 37, 4, 2), (9, 40, 4, 1), (33, 33, 2, 2), (1, 40, 4, 2), (5, 1, 2, 1)])
def test_matches_reference_in_heads_last_layout(body, lq, lk, h, hkv, direct, monkeypatch):
    pattern = _compile(body)
    gen = torch.Generator().manual_seed(lq + lk + h)
    q, k, v = _operands(lq, lk, h, hkv, torch.float64, gen)
    if body in ("causal", "full"):
        # plain patterns run the fused kernel from the sizes alone: no plan (a decoding step would plan anew each step)
        monkeypatch.setattr(plans, "get", None)
    with torch.no_grad():
        out = heads_last(q, k, v, pattern, scale=0.3)
    # plain patterns need neither the op nor a plan; the others run the op's implementation without its copy
    assert direct == ([] if body in ("causal", "full") else [False])
    assert out.shape == (2, lq, h, 8) and out.is_contiguous()
    ref, _ = reference_attention(q, k, v, pattern.mask(lq, lk, h), scale=0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-12, rtol=1e-12)


def test_float32_causal_prefill_needs_no_copy():
    pattern = _compile("causal")
    gen = torch.Generator().manual_seed(0)
    q, k, v = _operands(64, 64, 4, 2, torch.float32, gen)
    with torch.no_grad():
        out = heads_last(q, k, v, pattern)
        want = pattern(q, k, v)
    # the fused kernel wrote [B, Lq, H, D] memory: the result is that buffer, not a copy of a copy
    assert out.is_contiguous()
    torch.testing.assert_close(out, want.transpose(1, 2), atol=0, rtol=0)
    ref, _ = reference_attention(q.double(), k.double(), v.double(), pattern.mask(64, 64, 4))
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_nan_in_a_key_no_row_attends_stays_out(direct):
    pattern = _compile("causal")
    gen = torch.Generator().manual_seed(1)
    q, k, v = _operands(20, 20, 2, 1, torch.float32, gen)
    k, v = k.clone(), v.clone()
    k[:, :, -1] = float("nan")
    v[:, :, -1] = float("nan")
    with torch.no_grad():
        out = heads_last(q, k, v, pattern)
    assert direct == [False]  # the fused result held NaN: the executor ran again, selecting
    assert bool(torch.isfinite(out[:, :-1]).all()) and bool(torch.isnan(out[:, -1]).all())
    first = (x[:, :, :-1].double() for x in (q, k, v))  # the rows before the last attend no NaN
    ref, _ = reference_attention(*first, pattern.mask(19, 19, 2))
    torch.testing.assert_close(out[:, :-1].double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_gradients_and_inputs_go_through_the_op(direct):
    pattern = _compile("causal")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (t.requires_grad_() for t in _operands(12, 12, 4, 2, torch.float64, gen))
    out = heads_last(q, k, v, pattern)
    assert direct == [True]  # a gradient is needed: the differentiable op ran (contiguous outputs)
    ref, _ = reference_attention(q, k, v, pattern.mask(12, 12, 4))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref.transpose(1, 2), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)
    doc_pattern = patterndsl.compile("pattern d { input doc: int[batch, token]\n within(doc, causal) }")
    doc = torch.tensor([[0] * 5 + [1] * 7] * 2)
    with torch.no_grad():
        out = heads_last(q, k, v, doc_pattern, doc=doc)
    assert direct == [True, True]
    want = doc_pattern(q, k, v, doc=doc).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
