"""Score modifiers on ragged batches and paged caches (sections 8 and 9 together).

Every element of a ragged call must equal the same pattern run on that element alone (the
unragged path, itself checked against float64 in test_scores.py), forward and gradients.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd

SOURCES = [
    "pattern a(cap = 2.0) { causal & (window(5) | sink(2))\n score cap * tanh(s / cap) }",
    "pattern a { causal\n score s - 0.25 * (q - k) }",
    "pattern a(n = 4) { window(3, 3)\n score s * (h + 1) / n + 0.01 * Lk - 0.02 * Lq }",
]


@pytest.mark.parametrize("source", SOURCES)
def test_each_element_equals_its_own_call(source):
    p = pd.compile(source)
    torch.manual_seed(0)
    q = torch.randn(3, 4, 13, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 13, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, 13, 8, dtype=torch.float64, requires_grad=True)
    kv_lengths = torch.tensor([13, 9, 4])
    q_lengths = torch.tensor([13, 2, 4])
    out = p(q, k, v, q_lengths=q_lengths, kv_lengths=kv_lengths)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v))
    for b in range(3):
        nq, nk = int(q_lengths[b]), int(kv_lengths[b])
        qb, kb, vb = q[b : b + 1, :, :nq], k[b : b + 1, :, :nk], v[b : b + 1, :, :nk]
        alone = p(qb, kb, vb)
        torch.testing.assert_close(out[b, :, :nq], alone[0])
        assert not out[b, :, nq:].any()
        want = torch.autograd.grad((alone * g[b : b + 1, :, :nq]).sum(), (q, k, v))
        for got, ref in zip(grads, want, strict=True):
            torch.testing.assert_close(got[b], ref[b])
