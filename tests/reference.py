"""Test oracle: dense float64 attention from a boolean mask.

Comes in: ``q``, ``k``, ``v`` ``[B, H, L, D]`` (grouped-query heads allowed) and a
dense mask ``[B or 1, H, Lq, Lk]`` (or ``[H, Lq, Lk]``, as ``Pattern.mask``
returns). Goes out: ``(out, lse)`` in float64, with the contract's convention
for rows that allow no key: output 0 and ``lse = -inf``. Shared by the CPU
executor tests and the Triton interpreter tests; differentiable, so gradients
of the reference are the reference gradients.
"""

from __future__ import annotations

import torch


def reference_attention(q, k, v, mask, scale=None, score=None):
    """Dense masked softmax attention in float64.

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, Hkv, Lk, D]`` with ``Hkv`` dividing ``H``.
        mask: bool ``[H, Lq, Lk]`` or ``[B or 1, H, Lq, Lk]``, True where allowed.
        scale: softmax scale, default ``D ** -0.5``.
        score: ``f(s, q, k, h, Lq, Lk) -> modified s`` (positions end-aligned, ``q`` ``[Lq, 1]``,
            ``k`` ``[1, Lk]``, ``h`` ``[H, 1, 1]``), applied to every pair before the mask selects.

    Returns:
        ``(out, lse)``: float64 ``[B, H, Lq, D]`` and ``[B, H, Lq]``.
    """
    q, k, v = q.double(), k.double(), v.double()
    h, d = q.shape[1], q.shape[3]
    group = h // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    mask = mask.to(torch.bool)
    scale = d**-0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if score is not None:
        lq, lk = s.shape[-2:]
        pos_q = torch.arange(lq)[:, None] + (lk - lq)
        s = score(s, pos_q, torch.arange(lk)[None, :], torch.arange(h)[:, None, None], lq, lk)
        s = torch.where(mask, s, torch.tensor(float("-inf"), dtype=s.dtype))
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = ~mask.any(-1)
    # Shift by a finite value on empty rows so exp() gives 0 instead of NaN.
    p = torch.exp(s - lse.masked_fill(empty.expand_as(lse), 0.0)[..., None])
    out = torch.matmul(p, v)
    return out, lse


def check_cpu_against_reference(pattern, length: int, seed: int, heads: int = 2, dim: int = 8) -> None:
    """Run ``pattern`` on the CPU executor over random float64 ``[1, heads, length, dim]`` inputs and
    assert its output and ``lse`` equal the dense reference's to 1e-9 (``route`` choices read from
    the same ``q`` and ``k``)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    out, lse = pattern(q, k, v, return_lse=True, backend="cpu")
    ref, ref_lse = reference_attention(q, k, v, pattern.mask(length, length, heads, q=q, k=k))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-9, rtol=1e-9)
