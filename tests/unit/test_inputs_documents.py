"""``within(doc, causal)`` and ``within(doc, full)`` on the CPU run document by document: exact vs float64."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.runtime.cpu import documents
from tests.inputs_reference import random_documents
from tests.reference import reference_attention

SOURCE = """pattern docs {{
    input doc: int[batch, token]
    within(doc, {body})
}}"""


def run_mask(ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """bool ``[B, 1, L, L]``: same run of ``ids`` (runs, not equal values) and, if causal, ``k <= q``."""
    change = torch.ones(ids.shape, dtype=torch.int64)
    change[:, 1:] = (ids[:, 1:] != ids[:, :-1]).to(torch.int64)
    run = change.cumsum(1)
    same = run[:, :, None] == run[:, None, :]
    if causal:
        same &= torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    return same[:, None]


def check(p, q, k, v, doc, causal, atol, dlse=False):
    out, lse = p(q, k, v, return_lse=True, backend="cpu", doc=doc)
    ref, ref_lse = reference_attention(q, k, v, run_mask(doc.expand(q.shape[0], -1), causal))
    assert torch.allclose(out.double(), ref, atol=atol)
    assert torch.allclose(lse.double(), ref_lse, atol=atol)
    dout = torch.randn_like(out)
    loss, ref_loss = (out * dout).sum(), (ref * dout.double()).sum()
    if dlse:
        loss, ref_loss = loss + lse.sum(), ref_loss + ref_lse.sum()
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(ref_loss, (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=atol * 10)


def tensors(batch, heads, kv_heads, length, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, n, length, 16, generator=g, dtype=dtype).requires_grad_()
        for n in (heads, kv_heads, kv_heads)
    ]


@pytest.mark.parametrize("seed", range(8))
def test_documents_match_float64_reference(seed, monkeypatch):
    rng = random.Random(1200 + seed)
    body = rng.choice(["causal", "full"])
    p = pd.compile(SOURCE.format(body=body))
    length = rng.randint(1, 300)
    batch = rng.randint(1, 3)
    shared = rng.random() < 0.4
    doc = torch.stack([random_documents(rng, length) for _ in range(1 if shared else batch)])
    dtype = rng.choice([torch.float32, torch.float64])
    calls = []
    flash = documents.FLASH
    monkeypatch.setattr(documents, "FLASH", lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    kv_heads = rng.randint(1, 2)
    q, k, v = tensors(batch, kv_heads * rng.randint(1, 2), kv_heads, length, dtype, seed)
    check(p, q, k, v, doc, body == "causal", 1e-4 if dtype == torch.float32 else 1e-9)
    assert calls, "the document path was not taken"


def test_documents_with_an_lse_gradient_take_the_tile_schedule():
    p = pd.compile(SOURCE.format(body="causal"))
    doc = torch.tensor([[0] * 70 + [1] * 3 + [2] * 60])
    q, k, v = tensors(2, 2, 2, doc.shape[1], torch.float64, 4)
    check(p, q, k, v, doc, True, 1e-9, dlse=True)


def test_lengths_and_patterns_beside_within_are_not_run_by_document():
    assert documents.body_of(pd.compile(SOURCE.format(body="causal")).plan(32, 64, 2)) is None
    beside = "pattern t {\n input doc: int[batch, token]\n within(doc, causal) | sink(2)\n}"
    assert documents.body_of(pd.compile(beside).plan(64, 64, 2)) is None
    body = documents.body_of(pd.compile(SOURCE.format(body="causal & window(4)")).plan(64, 64, 2))
    assert body is not None and documents._kinds(body, torch.tensor([1, 5, 6, 40]), (16, 16)).tolist() == [
        documents.DENSE,  # one token: full is causal too; the dense call is preferred
        documents.CAUSAL,
        documents.OWN,
        documents.OWN,
    ]


def test_kinds_of_documents_are_exact():
    def kinds(body, lengths):
        plan = pd.compile(SOURCE.format(body=body)).plan(64, 64, 1)
        return documents._kinds(documents.body_of(plan), torch.tensor(lengths), plan.block).tolist()

    c, d, o = documents.CAUSAL, documents.DENSE, documents.OWN
    # Up to 10 tokens the sinks and the window cover every earlier key; at 11, key 4 of query 10 is missing.
    assert kinds("causal & (window(5) | sink(4))", [1, 6, 10, 11, 12]) == [d, c, c, o, o]
    assert kinds("window(3, 3)", [1, 4, 5]) == [d, d, o]
    assert kinds("causal | sink(2)", [1, 2, 3]) == [d, d, o]
    assert kinds("blocks(4)", [2, 9]) == [o, o]  # bodies with block edges always run their own plans
    assert kinds("causal & window(3, dilation = 2)", [1, 9]) == [o, o]


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_other_bodies_run_document_by_document_and_match_the_reference(seed):
    rng = random.Random(1300 + seed)
    body = ["causal & (window(6) | sink(2))", "window(2, 2) | sink(1)", "causal & window(3, dilation = 2)"][seed]
    p = pd.compile(SOURCE.format(body=body))
    length = rng.randint(16, 40)
    doc = torch.stack([random_documents(rng, length) for _ in range(2)])
    q, k, v = tensors(2, 4, 2, length, torch.float64, seed)
    plan = p.plan(length, length, 4)
    assert documents.applies(plan, q, k, documents.CpuOptions(), [doc]) == (
        sum(kind == documents.OWN for segs in documents.documents(plan, [doc], 2) for _, _, kind in segs)
        <= documents.MAX_OWN
    )
    out, lse = p(q, k, v, return_lse=True, backend="cpu", doc=doc)
    ref, ref_lse = reference_attention(q, k, v, p.mask(length, length, 4, doc=doc))
    assert torch.allclose(out.double(), ref, atol=1e-9)
    assert torch.allclose(lse.double()[ref_lse > -1e30], ref_lse[ref_lse > -1e30], atol=1e-9)
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    want = torch.autograd.grad((ref * dout).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-8)


def test_a_nan_value_reaches_only_its_own_document():
    p = pd.compile(SOURCE.format(body="causal"))
    doc = torch.tensor([[0] * 40 + [1] * 50])
    q, k, v = (x.detach() for x in tensors(1, 2, 2, 90, torch.float32, 5))
    v[0, :, 60] = float("nan")
    out = p(q, k, v, backend="cpu", doc=doc)
    assert torch.isfinite(out[0, :, :60]).all()
    assert torch.isnan(out[0, :, 60:]).all()


def test_a_score_modifier_is_not_dropped_by_the_document_path():
    """``within(doc, causal)`` with a ``score`` runs where the score is applied (torch's kernel cannot)."""
    p = pd.compile("pattern soft { input doc: int[batch, token]\n within(doc, causal)\n score s * 0.25 }")
    assert documents.body_of(p.plan(16, 16, 2)) is None
    doc = torch.tensor([[0] * 7 + [1] * 9])
    q, k, v = (x.detach() for x in tensors(1, 2, 2, 16, torch.float64, 6))
    # a quarter of the logits is the unmodified attention with a quarter of the scale
    ref, _ = reference_attention(q * 0.25, k, v, run_mask(doc, True))
    torch.testing.assert_close(p(q, k, v, backend="cpu", doc=doc).double(), ref, atol=1e-9, rtol=1e-9)
