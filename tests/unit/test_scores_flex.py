"""Score modifiers against FlexAttention's ``score_mod`` on CPU (forward; Flex has no CPU backward).

The same modifier written once as a pattern and once as a ``score_mod`` (Gemma 2's softcap on a
causal sliding window, ALiBi on causal, and a per-head relative bias of ``q - k``), with the same
block mask: outputs and log-sum-exp agree to float32 rounding.
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_equal_to_flex_attention_score_mod(name):
    source, score_mod, mask_mod = CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    block_mask = None if mask_mod is None else flex.create_block_mask(mask_mod, None, None, L, L, device="cpu")
    want, want_lse = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    out, lse = patterndsl.compile(source)(q, k, v, return_lse=True)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=2e-5)
