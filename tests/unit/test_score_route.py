"""``score`` with ``route(...)``: the modifier applies to the routed pairs, the routing itself is unchanged.

A score never changes which pairs are allowed (contract section 8), so ``route`` chooses its blocks
from the unmodified pooled scores exactly as without ``score``; the chosen pairs then get the
modified logits, on the tile path and on the gathered per-row path (``qblock = 1``) alike. Outputs,
``lse`` and gradients equal a float64 reference built from the route mask and the modified scores.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl import semantics

SOURCES = {
    "softcap_route_tiles": "pattern p(cap = 3.0) { causal & (route(block = 16, topk = 2) | window(8))\n"
    " score cap * tanh(s / cap) }",
    "alibi_route_rows": "pattern p { causal & (route(block = 16, topk = 2, qblock = 1) | window(4))\n"
    " score s - 0.1 * (h + 1) * (q - k) }",
}


def reference(p, q, k, v):
    """Float64 attention over the route mask (chosen from q and k) with the modified logits."""
    _, h, lq, d = q.shape
    allowed = p.mask(lq, k.shape[2], h, q=q.detach(), k=k.detach())
    s = semantics.modified_scores(p.ir, q.double() @ k.double().transpose(-1, -2) * d**-0.5)
    s = torch.where(allowed, s, torch.tensor(float("-inf"), dtype=s.dtype))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]).nan_to_num(0.0) @ v.double(), lse


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_route_with_a_score_equals_the_float64_reference(name):
    p = pd.compile(SOURCES[name])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 70, 16, generator=gen, requires_grad=True) for _ in range(3))
    out, lse = p(q, k, v, return_lse=True, backend="cpu")
    ref, ref_lse = reference(p, q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * dout).sum() + lse.sum(), (q, k, v))
    want = torch.autograd.grad((ref * dout.double()).sum() + ref_lse.sum(), (q, k, v))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=2e-5)


def test_a_score_beside_a_bare_route_compiles():
    # Refused before score modifiers reached route patterns; now the routed pairs take the score.
    p = pd.compile("pattern p { route(2)\n score s * 2.0 }")
    assert p.ir.score is not None and not p.ir.score.additive


def test_the_score_does_not_change_what_route_chooses():
    scored, plain = (
        pd.compile(SOURCES["softcap_route_tiles"]),
        pd.compile("pattern p { causal & (route(block = 16, topk = 2) | window(8)) }"),
    )
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(2))
    assert torch.equal(scored.mask(70, 70, 2, q=q, k=k), plain.mask(70, 70, 2, q=q, k=k))
