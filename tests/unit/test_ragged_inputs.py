"""Ragged batches and paged caches with run-time inputs (LANGUAGE.md sections 7 and 9): every element is its own
problem, its inputs its own row cut to its own ``kv_lengths`` (a ``token`` dimension is indexed by positions of
the element's unpadded keys). Outputs and gradients against the float64 reference of each element alone."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError
from tests.reference import reference_attention
from tests.unit.test_ragged import _tensors, paged

PACKED = """pattern packed(w = 5) {
    input doc: int[batch, token]
    within(doc, causal & (window(w) | sink(2)))
}"""
PREFIX = """pattern prefix_lm {
    input prefix: int[batch]
    causal | where(k < prefix)
}"""
BIAS = """pattern biased {
    input rel: float[head, 64]
    input tag: int[token]
    causal & where(tag[k] != 3)
    score s + rel[h, min(q - k, 63)]
}"""


def _inputs(source, batch, lk, heads, rng, gen):
    if "doc" in source:
        doc = torch.tensor([[rng.randint(0, 1) for _ in range(lk)] for _ in range(batch)]).cumsum(1)
        return {"doc": doc}
    if "prefix" in source:
        return {"prefix": torch.tensor([rng.randint(0, lk) for _ in range(batch)])}
    return {
        "rel": torch.randn(heads, 64, generator=gen, dtype=torch.float64).requires_grad_(),
        "tag": torch.tensor([rng.randint(0, 4) for _ in range(lk)]),
    }


def _element(inputs, b, lk):
    """Element ``b``'s inputs for a call of its own (batch kept as 1, token dims cut to ``lk``)."""
    out = {}
    for name, t in inputs.items():
        if name in ("doc",):
            out[name] = t[b : b + 1, :lk]
        elif name == "prefix":
            out[name] = t[b : b + 1]
        elif name == "tag":
            out[name] = t[:lk]
        else:
            out[name] = t
    return out


@pytest.mark.parametrize(
    ("source", "page_size"),
    [
        (PACKED, 4),
        (PREFIX, 0),
        (BIAS, 4),
        pytest.param(PACKED, 0, marks=pytest.mark.slow),
        pytest.param(PREFIX, 4, marks=pytest.mark.slow),
        pytest.param(BIAS, 0, marks=pytest.mark.slow),
    ],
)
def test_lengths_with_inputs_match_each_element_alone(source, page_size):
    p = pd.compile(source)
    rng, gen = random.Random(len(source) + page_size), torch.Generator().manual_seed(3)
    batch, heads, lq, lk = 3, 2, 3, 21
    q, k, v = _tensors(batch, heads, 1, lq, lk, 8, torch.float64, 5)
    kvl, ql = torch.tensor([21, 9, 2]), torch.tensor([3, 1, 2])
    inputs = _inputs(source, batch, lk, heads, rng, gen)
    q.requires_grad_()
    kk, vv, table = k.clone().requires_grad_(), v.clone().requires_grad_(), None
    if page_size:
        kp, vp, table = paged(k, v, kvl, page_size, rng)
        kk, vv = kp.clone().requires_grad_(), vp.clone().requires_grad_()
    out, lse = p(q, kk, vv, kv_lengths=kvl, q_lengths=ql, block_table=table, return_lse=True, **inputs)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    tables = [t for t in inputs.values() if t.requires_grad]
    grads = torch.autograd.grad((out * dout).sum(), [q, *tables])
    want_tables = [torch.zeros_like(t) for t in tables]
    for b in range(batch):
        n, m = int(kvl[b]), int(ql[b])
        qq = q.detach()[b : b + 1, :, :m]
        mine = _element(inputs, b, n)
        want = p(qq, k[b : b + 1, :, :n], v[b : b + 1, :, :n], return_lse=True, **mine)
        if "score" not in source:
            mask = p.mask(m, n, heads, **mine)
            mask = mask[0] if mask.dim() == 4 else mask
            ref = reference_attention(qq, k[b : b + 1, :, :n], v[b : b + 1, :, :n], mask)
            assert torch.allclose(want[0], ref[0], atol=1e-9)
        assert torch.allclose(out[b : b + 1, :, :m], want[0], atol=1e-9)
        assert torch.allclose(lse[b : b + 1, :, :m], want[1], atol=1e-9)
        assert torch.equal(out[b, :, m:], torch.zeros_like(out[b, :, m:]))
        qg = qq.clone().requires_grad_()
        got = p(qg, k[b : b + 1, :, :n], v[b : b + 1, :, :n], **mine)
        g = torch.autograd.grad((got * dout[b : b + 1, :, :m]).sum(), [qg, *tables])
        assert torch.allclose(grads[0][b, :, :m], g[0][0], atol=1e-8)
        for acc, gt in zip(want_tables, g[1:], strict=True):
            acc += gt
    for got, want in zip(grads[1:], want_tables, strict=True):
        assert torch.allclose(got, want, atol=1e-8)


def test_paged_token_inputs_must_cover_the_lengths():
    p = pd.compile(PACKED)
    q, k, v = _tensors(2, 2, 1, 1, 12, 8, torch.float32, 0)
    kvl = torch.tensor([12, 5])
    kp, vp, table = paged(k, v, kvl, 4, random.Random(0))
    with pytest.raises(InputError, match=r"doc.*token entries.*kv_lengths holds 12"):
        p(q, kp, vp, kv_lengths=kvl, block_table=table, doc=torch.zeros(2, 11, dtype=torch.int64))
    with pytest.raises(InputError, match="doc"):
        p(q, k, v, kv_lengths=kvl, doc=torch.zeros(2, 11, dtype=torch.int64))
    out = p(q, kp, vp, kv_lengths=kvl, block_table=table, doc=torch.zeros(2, 12, dtype=torch.int64))
    assert out.shape == q.shape
