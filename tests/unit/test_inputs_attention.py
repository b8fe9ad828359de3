"""Attention with run-time inputs on the CPU path: outputs and gradients vs float64, validation, caching, compile."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError
from patterndsl.runtime import inputs as runtime_inputs
from tests.inputs_reference import random_documents, random_pattern_source, reference_mask
from tests.reference import reference_attention

PACKED = """pattern packed(w = 5) {
    input doc: int[batch, token]
    within(doc, causal & (window(w) | sink(2)))
}"""


def tensors(batch, heads, kv_heads, q_len, kv_len, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def check_against_reference(p, q, k, v, mask, atol, **inputs):
    out, lse = p(q, k, v, return_lse=True, backend="cpu", **inputs)
    ref, ref_lse = reference_attention(q, k, v, mask)
    assert torch.allclose(out.double(), ref, atol=atol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert torch.allclose(lse.double()[finite], ref_lse[finite], atol=atol)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=atol * 10)


@pytest.mark.parametrize("seed", range(10))
def test_random_patterns_match_float64_reference(seed):
    rng = random.Random(900 + seed)
    source, make_inputs = random_pattern_source(rng)
    p = pd.compile(source)
    kv = rng.randint(1, 80)
    q_len = rng.choice([kv, rng.randint(1, kv)])
    kv_heads = rng.randint(1, 2)
    heads = kv_heads * rng.randint(1, 2)
    inputs = make_inputs(rng, kv, heads)
    batch = inputs["doc"].shape[0]
    dtype = rng.choice([torch.float32, torch.float64])
    q, k, v = tensors(batch, heads, kv_heads, q_len, kv, 16, dtype, seed)
    mask = reference_mask(make_inputs.oracle, inputs, q_len, kv, heads)
    check_against_reference(p, q, k, v, mask, 1e-4 if dtype == torch.float32 else 1e-9, **inputs)


def test_documents_with_gqa_and_shared_inputs():
    p = pd.compile(PACKED)
    q, k, v = tensors(2, 4, 2, 150, 150, 32, torch.float64)
    rng = random.Random(3)
    doc = torch.stack([random_documents(rng, 150), random_documents(rng, 150)])
    check_against_reference(p, q, k, v, p.mask(150, 150, 4, doc=doc), 1e-9, doc=doc)
    shared = pd.segments([1, 70, 79])
    check_against_reference(p, q, k, v, p.mask(150, 150, 4, doc=shared), 1e-9, doc=shared)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({}, "needs input 'doc'"),
        ({"doc": torch.zeros(2, 16, dtype=torch.int64), "dco": torch.zeros(16)}, "has no input 'dco'"),
        ({"doc": torch.zeros(2, 16)}, "must be an integer tensor"),
        ({"doc": torch.zeros(3, 16, dtype=torch.int64)}, "has shape [3, 16], expected [2, 16] or [16]"),
        ({"doc": torch.zeros(2, 15, dtype=torch.int64)}, "expected [2, 16] or [16]"),
        ({"doc": torch.zeros(16, 2, dtype=torch.int64)}, "expected [2, 16] or [16]"),
        ({"doc": torch.zeros(2, 16, dtype=torch.int64, device="meta")}, "must be on cpu like q"),
    ],
)
def test_bad_inputs_are_errors_naming_the_input(given, error):
    p = pd.compile(PACKED)
    q, k, v = tensors(2, 2, 2, 16, 16, 8, torch.float32)
    with pytest.raises(InputError) as info:
        pd.attention(q, k, v, p, **given)
    assert error in str(info.value)


def test_static_pattern_refuses_inputs():
    q, k, v = tensors(1, 1, 1, 8, 8, 8, torch.float32)
    with pytest.raises(InputError, match="declares no input"):
        pd.compile("pattern c { causal }")(q, k, v, doc=torch.zeros(8, dtype=torch.int64))


def test_call_plan_is_cached_per_tensor_version(monkeypatch):
    from patterndsl.analysis import inputplan

    calls = []
    real = inputplan.call_plan
    monkeypatch.setattr(inputplan, "call_plan", lambda *a: calls.append(1) or real(*a))
    runtime_inputs.clear()
    p = pd.compile(PACKED)
    q, k, v = tensors(1, 2, 2, 32, 32, 8, torch.float32)
    doc = pd.segments([10, 22])
    first = p(q, k, v, doc=doc)
    p(q, k, v, doc=doc).sum().backward()
    assert len(calls) == 1  # one plan for two forwards and a backward
    doc[:5] = 7  # an in-place write bumps the version: planned again, and the result follows
    again = p(q, k, v, doc=doc)
    assert len(calls) == 2
    ref, _ = reference_attention(q, k, v, p.mask(32, 32, 2, doc=doc))
    assert torch.allclose(again.double(), ref, atol=1e-5)
    assert not torch.allclose(first, again)


def test_torch_compile_fullgraph_with_inputs():
    p = pd.compile(PACKED)
    q, k, v = tensors(2, 2, 1, 48, 48, 16, torch.float32)
    f = torch.compile(lambda q, k, v, doc: p(q, k, v, doc=doc), fullgraph=True)
    for lengths in ([20, 1, 27], [48]):
        doc = torch.stack([pd.segments(lengths), pd.segments([24, 24])])
        out = f(q, k, v, doc)
        ref, _ = reference_attention(q, k, v, p.mask(48, 48, 2, doc=doc))
        assert torch.allclose(out.double(), ref, atol=1e-5)
        (gq,) = torch.autograd.grad(out.sum(), (q,))
        (rq,) = torch.autograd.grad(ref.sum(), (q,))
        assert torch.allclose(gq.double(), rq.double(), atol=1e-4)


def test_generated_kernels_read_inputs_from_the_run_time_table():
    from patterndsl.errors import BackendError

    source = pd.compile(PACKED).kernel_source(64, 64, 1)
    assert "within(doc, causal" in source and "def _allowed_g0_w0(q, k, h, n):" in source
    assert "inp = RT + (lst // NHK) * 64" in source  # segment starts, [Lk]
    tagged = pd.compile("pattern t {\n input tag: int[batch, token]\n where(tag[k] == 1)\n}").kernel_source(64, 64, 1)
    assert "tl.load(inp + 0 + tl.minimum(k, 63))" in tagged
    p = pd.compile(PACKED)
    q, k, v = tensors(1, 1, 1, 16, 16, 8, torch.float32)
    with pytest.raises(BackendError, match="TRITON_INTERPRET"):
        p(q, k, v, doc=pd.segments([8, 8]), backend="triton")


def test_reordered_plans_run_in_the_original_order():
    p = pd.compile("pattern r {\n input tag: int[batch, token]\n window(3, 3, dilation = 4) | where(tag[k] == 1)\n}")
    tag = torch.zeros(2, 512, dtype=torch.int64)
    tag[0, [3, 100]] = 1
    q, k, v = tensors(2, 2, 1, 512, 512, 16, torch.float64)
    assert p.plan(512, 512, 2, block=(64, 64), tag=tag).static.order == "classes mod 4"
    check_against_reference(p, q, k, v, p.mask(512, 512, 2, tag=tag), 1e-9, tag=tag)
