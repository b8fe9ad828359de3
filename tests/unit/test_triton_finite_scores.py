"""The Triton launcher's exact rows (:mod:`patterndsl.runtime.triton_finite`) apply the score modifier.

A key with an infinite component whose scores are ``-inf`` (``q[..., 0] > 0``, ``k[0, 1, BAD, 0] = -inf``):
the rows the pattern connects to it are computed by the launcher, not the kernels. Those rows must see
the ``score`` (a learned relative bias and a per-key bias, both float tables) and give the tables their
share of the gradient (the kernels give those rows ``P = 0``). With an additive score the key's pairs
weigh nothing, so the reference is the pattern with those pairs blocked (the key cleaned). A softcap maps
the ``-inf`` score to ``-cap``: the forward rows equal the float64 meaning on the raw inputs.
"""

from __future__ import annotations

import torch

import patterndsl
from patterndsl import semantics
from patterndsl.runtime import triton_finite
from tests.reference import reference_attention

W, L, D, BAD = 5, 24, 8, 9
TABLES = f"""pattern p(w = {W}) {{
    input rel: float[head, 2 * w + 1]
    input kb: float[batch, token]
    causal & window(w)
    score s + rel[h, k - q + w] + kb[k]
}}"""
SOFTCAP = TABLES.replace("score s + rel[h, k - q + w] + kb[k]", "score 2.0 * tanh((s + rel[h, k - q + w]) / 2.0)")


def _inputs():
    gen = torch.Generator().manual_seed(4)
    q, k, v, w = (torch.randn(2, 2, L, D, generator=gen, dtype=torch.float64) for _ in range(4))
    q[..., 0] = q[..., 0].abs() + 0.5
    kb = k.clone()
    kb[0, 1, BAD, 0] = float("-inf")
    tables = {"rel": torch.randn(2, 2 * W + 1, generator=gen, dtype=torch.float64),
              "kb": torch.randn(2, L, generator=gen, dtype=torch.float64)}  # fmt: skip
    return q, k, kb, v, w, tables


def _score(rel, kb):
    def score(s, q, k, h, lq, lk):
        # k is every key in order: the per-key bias is kb's rows broadcast over heads and queries.
        return s + rel[h, (k - q + W).clamp(0, 2 * W)] + kb[:, None, None, :]

    return score


def test_exact_rows_apply_the_score_and_give_the_tables_their_gradient():
    p = patterndsl.compile(TABLES)
    plan = p.plan(L, L, 2, block=(16, 16), order="identity")
    q, k, kb, v, w, tables = _inputs()
    fix = triton_finite.rows_to_fix(plan, q, kb, v)
    rows = fix.rows
    assert bool(rows[0, 1].any()) and not bool(rows[0, 0].any()) and not bool(rows[1].any())
    w_rows = w.masked_fill(~rows[..., None], 0.0)
    window = patterndsl.compile(f"pattern p {{ causal & window({W}) }}").ir
    mask = semantics.mask(window, L, L, 2)[None].repeat(2, 1, 1, 1)
    mask[0, 1, :, BAD] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v, tables["rel"], tables["kb"])]
    ref_out, ref_lse = reference_attention(*leaves[:3], mask, 0.5, score=_score(leaves[3], leaves[4]))
    want = torch.autograd.grad((ref_out * w_rows).sum(), leaves)

    out, lse = ref_out.detach().clone(), ref_lse.detach().clone()
    out[rows], lse[rows] = 0.0, 0.0
    data = list(tables.values())
    triton_finite.forward_rows(q, kb, v, plan, 0.5, fix, out, lse, data=data)
    torch.testing.assert_close(out, ref_out.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=1e-12, rtol=1e-12)

    dq = torch.zeros_like(q)
    dk_heads, dv_heads = torch.zeros_like(q), torch.zeros_like(q)
    grads = triton_finite.table_accumulators(p.ir.inputs, data)
    triton_finite.backward_rows(
        q, kb, v, out, lse, w_rows, None, plan, 0.5, fix, dq, dk_heads, dv_heads, data=data, tables=grads
    )
    torch.testing.assert_close(dq[rows], want[0][rows], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dk_heads, want[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dv_heads, want[2], atol=1e-12, rtol=1e-12)
    for name, want_table in zip(("rel", "kb"), want[3:], strict=True):
        assert bool(want_table.abs().sum() > 0)
        torch.testing.assert_close(grads[name].double(), want_table, atol=1e-6, rtol=1e-6, msg=name)


def test_exact_rows_apply_a_softcap_to_the_infinite_score():
    p = patterndsl.compile(SOFTCAP)
    plan = p.plan(L, L, 2, block=(16, 16), order="identity")
    q, _, kb, v, _, tables = _inputs()
    fix = triton_finite.rows_to_fix(plan, q, kb, v)
    want, want_lse = semantics.attention(p.ir, q, kb, v, scale=0.5, data=tables)
    out, lse = torch.zeros_like(q), torch.zeros(2, 2, L, dtype=torch.float64)
    triton_finite.forward_rows(q, kb, v, plan, 0.5, fix, out, lse, data=list(tables.values()))
    rows = fix.rows
    torch.testing.assert_close(out[rows], want[rows], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse[rows], want_lse[rows], atol=1e-12, rtol=1e-12)
