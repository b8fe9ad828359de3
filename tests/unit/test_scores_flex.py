"""Score modifiers against FlexAttention's ``score_mod`` on CPU.

The same modifier written once as a pattern and once as a ``score_mod`` (Gemma 2's softcap on a
causal sliding window, ALiBi on causal, a per-head relative bias of ``q - k``, and a learned
relative bias table), with the same block mask: outputs and log-sum-exp agree with
``flex_attention`` to float32 rounding. ``flex_attention`` refuses a backward on CPU, so the
gradients (``q``, ``k``, ``v`` and the learned table) are compared with Flex's own eager
implementation (``math_attention``: the ``score_mod`` vmapped over every pair) differentiated by
autograd.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl

flex = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, L, D = 1, 4, 256, 32


def _alibi_slope(h):
    return torch.exp2(-8.0 * (h + 1) / H)


CASES = {
    "softcap_window": (
        "pattern p(cap = 20.0, w = 64) { causal & window(w)\n score cap * tanh(s / cap) }",
        lambda score, b, h, qi, kv: 20.0 * torch.tanh(score / 20.0),
        lambda b, h, qi, kv: (kv <= qi) & (qi - kv <= 64),
    ),
    "alibi_causal": (
        f"pattern p(n = {H}) {{ causal\n score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k) }}",
        lambda score, b, h, qi, kv: score - _alibi_slope(h) * (qi - kv),
        lambda b, h, qi, kv: kv <= qi,
    ),
    "relative_bias": (
        "pattern p { full\n score s + 0.1 * (h + 1) * tanh(0.05 * (q - k)) - 0.01 * (abs(q - k) // 8) }",
        lambda score, b, h, qi, kv: (
            score
            + 0.1 * (h + 1) * torch.tanh(0.05 * (qi - kv))
            - 0.01 * torch.div(torch.abs(qi - kv), 8, rounding_mode="floor")
        ),
        None,
    ),
}


TABLE = torch.randn(H, 2 * L - 1, generator=torch.Generator().manual_seed(5))
CASES["learned_table"] = (
    f"pattern p {{ input rel: float[head, {2 * L - 1}]\n causal\n score s + rel[h, k - q + {L - 1}] }}",
    lambda score, b, h, qi, kv: score + TABLE[h, kv - qi + L - 1],
    lambda b, h, qi, kv: kv <= qi,
)


def _flex_grads(name, leaves, dout):
    """Gradients of ``leaves`` through Flex's eager ``math_attention`` (its ``score_mod`` reads the table)."""
    from torch._higher_order_ops.flex_attention import math_attention

    _, score_mod, mask_mod = CASES[name]
    q, k, v, *table = leaves
    if table:

        def score_mod(score, b, h, qi, kv):
            return score + table[0][h, kv - qi + L - 1]

    n = q.shape[2]
    block_mask = flex.create_block_mask(mask_mod or (lambda b, h, qi, kv: qi >= 0), None, None, n, n, device="cpu")
    out, lse, _ = math_attention(q, k, v, score_mod, block_mask.as_tuple(), D**-0.5, {})
    # math_attention's lse is in base 2 (the kernels' convention); ours is natural.
    loss = (out * dout).sum() + (lse * 0.6931471805599453).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize(
    "name", [n if n == "learned_table" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CASES)]
)
def test_gradients_equal_flex_eager_score_mod(name):
    source = CASES[name][0]
    gen = torch.Generator().manual_seed(1)
    n = 64  # the dense eager reference is slow: a shorter sequence
    q, k, v = (torch.randn(B, H, n, D, generator=gen, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, n, D, generator=gen)
    tables = {"rel": TABLE.clone().requires_grad_()} if name == "learned_table" else {}
    leaves = (q, k, v, *tables.values())
    out, lse = patterndsl.compile(source)(q, k, v, return_lse=True, **tables)
    got = torch.autograd.grad((out * dout).sum() + lse.sum(), leaves)
    want = _flex_grads(name, leaves, dout)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_to_flex_attention_score_mod(name):
    source, score_mod, mask_mod = CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, None, None, L, L, device="cpu")
    want, want_lse = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    tables = {"rel": TABLE} if name == "learned_table" else {}
    out, lse = patterndsl.compile(source)(q, k, v, return_lse=True, **tables)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
