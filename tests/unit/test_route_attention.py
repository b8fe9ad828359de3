"""route(...) attention on the CPU path: forward, LSE and gradients against the float64 reference.

The reference is ``tests/reference.py`` over the ``[B, H, Lq, Lk]`` mask of
``Pattern.mask(..., q=, k=)`` (the dense meaning, itself checked against a loop
oracle in test_route_reference.py and test_routing.py). Inputs are random every
run; ties are built deliberately in one case.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from tests.reference import reference_attention

MOBA = "pattern p { causal & (blocks(8) | route(topk = 2, block = 8, qblock = 1, among = causal - blocks(8))) }"
LANDMARK = (
    "pattern p { causal & (window(5) | route(topk = 2, block = 6, score = landmark, qblock = 1,"
    " among = causal - window(5))) }"
)
BIFORMER = "pattern p { layout grid(y = 6, x = 8)\n route(topk = 2, block = (2, 4), qblock = (3, 4)) }"
CASES = {
    "moba": (MOBA, 40, 40),
    "moba_decode_chunk": (MOBA, 13, 40),
    "moba_long_queries": (MOBA, 45, 37),
    "landmark": (LANDMARK, 33, 33),
    "biformer_grid": (BIFORMER, 48, 48),
    "max_per_block": ("pattern p { causal & route(2, block = 5, score = max, qblock = 7, among = causal) }", 31, 31),
    "difference": ("pattern p { window(6, 6) - route(1, block = 4) }", 24, 24),
    "two_routes": (
        "pattern p { causal & (route(1, block = 4, qblock = 1, among = causal)"
        " | route(1, block = 6, score = max, among = causal)) }",
        30,
        30,
    ),
    # Diagonal tiles are partial whatever the choice, but the choice still decides their elements.
    "static_partial_reached": ("pattern p { causal & (window(2) | route(1, block = 4, among = causal)) }", 24, 24),
    "empty_rows": ("pattern p { route(1, block = 4, qblock = 2, among = causal - blocks(4)) }", 20, 20),
    "per_head": ("pattern p { heads 0..1: causal & window(3)\n causal & (sink(2) | route(2, block = 4)) }", 22, 22),
    # Candidates differ per head; under GQA the heads of a group share the union's choice, so
    # a head may get a block its own among excludes (the plan must not call such tiles empty).
    "among_reads_head": (
        "pattern p { causal & route(1, block = 4, qblock = 4, among = where((k // 4 + h) % 2 == 0)) }",
        24,
        24,
    ),
    # ... and where such a block lies in a tile that is partial whatever the choice, the tile's
    # elements must still follow the choice (found by tests/unit/test_cpu_property.py).
    "among_reads_head_static_partial": (
        "pattern p { route(1, block = 5, qblock = 5, among = where((k // 5 + h) % 3 == 0)) | where((q - k) % 5 == 0) }",
        41,
        12,
    ),
}


@pytest.fixture(params=[(8, 8), (4, 8), (64, 64)], ids=lambda b: f"tiles{b[0]}x{b[1]}", autouse=True)
def cpu_tiles(request, monkeypatch):
    """Small CPU tiles so that the merge of run-time and static tiles is exercised at small sizes."""
    import patterndsl.runtime as rt

    monkeypatch.setattr(rt, "CPU_BLOCK", request.param)
    return request.param


def _data(b, h, hkv, lq, lk, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def _check(p, q, k, v, atol, scale=None):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = p(q, k, v, scale=scale, return_lse=True, backend="cpu")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    mask = p.mask(q.shape[2], k.shape[2], q.shape[1], q=q, k=k)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, mask, scale)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=atol)
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, atol=10 * atol, rtol=10 * atol)
    return mask


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)])
def test_route_attention_matches_reference(name, heads, kv_heads):
    src, lq, lk = CASES[name]
    p = patterndsl.compile(src)
    q, k, v = _data(2, heads, kv_heads, lq, lk, 16, torch.float32, seed=hash((name, heads)) % 1000)
    mask = _check(p, q, k, v, atol=2e-5)
    assert mask.any()


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-6), (torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_route_attention_dtypes(dtype, atol):
    q, k, v = _data(1, 2, 1, 40, 40, 16, dtype, seed=3)
    _check(patterndsl.compile(MOBA), q, k, v, atol=atol, scale=0.3)


def test_empty_rows_give_zeros_and_minus_inf():
    p = patterndsl.compile(CASES["empty_rows"][0])
    q, k, v = _data(1, 2, 2, 20, 20, 8, torch.float32, seed=5)
    out, lse = p(q, k, v, return_lse=True, backend="cpu")
    # The first block's queries have no candidate (among excludes their own block).
    assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
    assert bool(torch.isinf(lse[:, :, :4]).all()) and bool(torch.isfinite(lse[:, :, 4:]).all())


def test_tied_scores_choose_the_lower_blocks():
    # Every key block holds the same keys: all candidates tie and the lowest blocks win.
    p = patterndsl.compile(
        "pattern p { causal & (blocks(4) | route(2, block = 4, qblock = 1, among = causal - blocks(4))) }"
    )
    k = torch.randn(1, 1, 4, 8).repeat(1, 1, 6, 1)
    q, _, v = _data(1, 2, 1, 24, 24, 8, torch.float32, seed=7)
    mask = _check(p, q, k, v, atol=2e-5)
    # A query in block 5 sees blocks 0 and 1 (ties) and its own block up to itself.
    row = mask[0, 0, 22]
    assert row[:8].all() and not row[8:20].any() and row[20:23].all()


def test_choice_follows_the_data():
    p = patterndsl.compile("pattern p { route(1, block = 4) }")
    q = torch.ones(1, 1, 8, 4)
    k = torch.zeros(1, 1, 8, 4)
    v = torch.arange(8.0).view(1, 1, 8, 1).expand(1, 1, 8, 4).contiguous()
    k[:, :, 4:] = 1.0  # block 1 scores higher
    assert torch.allclose(p(q, k, v)[0, 0, :, 0], torch.full((8,), 5.5))
    k2 = k.flip(2)
    assert torch.allclose(p(q, k2, v)[0, 0, :, 0], torch.full((8,), 1.5))
