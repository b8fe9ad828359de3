"""A key with an infinite component whose scores are ``-inf`` (issue 11): ``P`` is 0 on its pairs in the
backward as in the forward.

The selecting backward paths (the CPU's ``_backward_select`` and gathered ``route`` blocks, and the Triton
launcher's exact rows in :mod:`patterndsl.runtime.triton_finite`) used to score the cleaned keys (the
infinite value replaced by 0): the pair got a finite score and a ``P`` the forward never had (the row's
``P`` summed to more than 1), so ``dQ`` was wrong on finite elements. Found by the interpreter case
``masked_non_finite_keys_never_leak`` (Triton and CPU disagreed on ``dq`` under a ``route`` head).
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from tests.reference import reference_attention

CAUSAL = "pattern p { causal }"
# Every causal block is chosen: the pattern equals causal, and the CPU runs the route part gathered.
ROUTE = "pattern p { causal & (blocks(4) | route(topk = 8, block = 4, qblock = 1, among = causal - blocks(4))) }"
L, D, BAD_KEY = 24, 8, 9


def _inputs():
    """float64 q, k, v ``[1, 2, L, D]`` with ``q[..., 0] > 0`` and ``k[0, 1, BAD_KEY, 0] = -inf``: every score
    of that key in head 1 is ``-inf``, which is the pattern with the pair blocked."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, w = (torch.randn(1, 2, L, D, generator=gen, dtype=torch.float64) for _ in range(4))
    q[..., 0] = q[..., 0].abs() + 0.5
    kb = k.clone()
    kb[0, 1, BAD_KEY, 0] = float("-inf")
    return q, k, kb, v, w


def _reference(p, q, k, kb, v, w):
    """Out and gradients of the pattern with head 1's pairs of the poisoned key blocked (its key cleaned)."""
    mask = p.mask(L, L, 2, q=q, k=kb).clone() if p.is_dynamic else p.mask(L, L, 2)[None].clone()
    mask[:, 1, :, BAD_KEY] = False
    leaves = [t.clone().requires_grad_() for t in (q, k.masked_fill(~torch.isfinite(kb), 0.0), v)]
    out, lse = reference_attention(*leaves, mask, 0.5)
    (out * w).sum().backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("src", [CAUSAL, ROUTE])
@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_cpu_gradients_give_the_minus_inf_score_no_weight(src, kernel):
    from patterndsl.runtime import cpu

    p = patterndsl.compile(src)
    q, k, kb, v, w = _inputs()
    ref_out, ref_lse, ref_grads = _reference(p, q, k, kb, v, w)
    leaves = [t.clone().requires_grad_() for t in (q, kb, v)]
    with cpu.options(kernel=kernel):
        out, lse = p(*leaves, scale=0.5, return_lse=True)
        (out * w).sum().backward()
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    # dQ reads the infinite key component only through P = 0 (finite); dK of the poisoned key is 0 there.
    for name, leaf, want in zip("qkv", leaves, ref_grads, strict=True):
        assert bool(torch.isfinite(leaf.grad).all()), name
        torch.testing.assert_close(leaf.grad, want, atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("src", [CAUSAL, ROUTE])
def test_triton_launcher_rows_give_the_minus_inf_score_no_weight(src):
    """The launcher's exact rows (:func:`triton_finite.backward_rows`) on the rows connected to the key,
    against the reference restricted to those rows' loss."""
    from patterndsl.runtime import triton_finite

    p = patterndsl.compile(src)
    plan = p.plan(L, L, 2, block=(16, 16), order="identity")
    q, k, kb, v, w = _inputs()
    fix = triton_finite.rows_to_fix(plan, q, kb, v)
    rows = fix.rows
    assert bool(rows[0, 1].any()) and not bool(rows[0, 0].any())
    w_rows = w.masked_fill(~rows[..., None], 0.0)
    ref_out, ref_lse, (ref_dq, ref_dk, ref_dv) = _reference(p, q, k, kb, v, w_rows)
    out, lse = ref_out.clone(), ref_lse.clone()
    triton_finite.forward_rows(q, kb, v, plan, 0.5, fix, out, lse)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    dq = torch.zeros_like(q)
    dk_heads, dv_heads = torch.zeros_like(q), torch.zeros_like(q)
    triton_finite.backward_rows(q, kb, v, out, lse, w_rows, None, plan, 0.5, fix, dq, dk_heads, dv_heads)
    assert bool(torch.isfinite(dq).all())
    torch.testing.assert_close(dq[rows], ref_dq[rows], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dk_heads, ref_dk, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dv_heads, ref_dv, atol=1e-12, rtol=1e-12)
