"""Operands whose head dim is not unit-stride (a ``v`` made by a transpose, a [B, D, L] layout) give the
same outputs and gradients as contiguous ones on every CPU path: the tile schedule, the dense fused
path, documents under ``within`` and ragged/paged calls. torch's fused CPU flash kernel reads rows as
contiguous vectors whatever the strides say; the op hands it unit-stride operands."""

import pytest
import torch

import patterndsl

L = 48
SOURCES = {
    "tiles": "pattern p { causal & window(5) }",
    "dense": "pattern p { causal }",
    "gathered": "pattern p { window(3, dilation = 2) | global(2) }",
}


def _transposed(*shape, gen):
    """A tensor of ``shape`` whose last dim has stride != 1 (stored as [..., D, L])."""
    return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)


def _pair(gen, h=4, hkv=2, d=8):
    strided = [_transposed(2, n, L, d, gen=gen) for n in (h, hkv, hkv)]
    assert all(x.stride(-1) != 1 for x in strided)
    return strided, [x.contiguous() for x in strided]


def _run(p, xs, **kw):
    xs = [x.detach().requires_grad_(True) for x in xs]
    out = p(*xs, **kw)
    out.backward(torch.ones_like(out))
    return out, [x.grad for x in xs]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_static_paths(name):
    p = patterndsl.compile(SOURCES[name])
    strided, contiguous = _pair(torch.Generator().manual_seed(0))
    (o1, g1), (o2, g2) = _run(p, strided), _run(p, contiguous)
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ragged_lengths():
    p = patterndsl.compile(SOURCES["tiles"])
    strided, contiguous = _pair(torch.Generator().manual_seed(1))
    lengths = torch.tensor([30, L])
    torch.testing.assert_close(p(*strided, kv_lengths=lengths), p(*contiguous, kv_lengths=lengths), atol=0, rtol=0)


def test_documents():
    p = patterndsl.compile("pattern p { input doc: int[batch, token]\n within(doc, causal) }")
    strided, contiguous = _pair(torch.Generator().manual_seed(2))
    doc = torch.tensor([0] * 20 + [1] * 17 + [2] * 11).expand(2, L)
    (o1, g1), (o2, g2) = _run(p, strided, doc=doc), _run(p, contiguous, doc=doc)
    torch.testing.assert_close(o1, o2, atol=0, rtol=0)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
