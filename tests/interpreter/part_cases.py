"""Interpreter cases for plans that run as parts (issue 17): one kernel pass per part, merged by
log-sum-exp exactly as the op merges them (:mod:`patterndsl.runtime.combine`), compared with the
float64 reference (out, lse and the gradients, a gradient on lse included). The split options make
small plans split; blocks of 32 leave room for the thin 16-wide tiles."""

from __future__ import annotations

import functools
import random

import torch

import patterndsl
from patterndsl.analysis import parts
from patterndsl.runtime import combine
from patterndsl.runtime import triton_backend as tb
from tests.reference import reference_attention

#: Splits pay at these sizes: no cost per pass or tile, thin tiles counted by their pairs alone.
EAGER = parts.PartOptions(pass_tiles=0, keep_above=1.0, tile_pairs=0, min_side=0)


def check_parts(source: str, lq: int, lk: int, heads: int, kv_heads: int, d: int = 16) -> None:
    pattern = patterndsl.compile(source)
    with parts.options(EAGER):
        plan = pattern.plan(lq, lk, heads, block=(32, 32))
    assert len(plan.parts) >= 2, "the case must run as parts"
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, d, generator=gen)
    k, v = (torch.randn(2, kv_heads, lk, d, generator=gen) for _ in range(2))
    dout, dlse = torch.randn(2, heads, lq, d, generator=gen), torch.randn(2, heads, lq, generator=gen)
    scale = 0.7 * d**-0.5
    out, lse = combine.forward(functools.partial(tb.forward, q, k, v, part, scale) for part in plan.parts)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, pattern.mask(lq, lk, heads), scale)
    where = f"(seed {seed})"
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4, msg=lambda m: f"out {where}: {m}")
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=2e-4, msg=lambda m: f"lse {where}: {m}")
    grads = combine.backward(
        functools.partial(tb.backward, q, k, v, out, lse, dout, part, scale, dlse=dlse) for part in plan.parts
    )
    torch.autograd.backward((ref_out, ref_lse), (dout.double(), dlse.double()))
    for name, got, want in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"{n} {where}: {m}")


PER_HEAD = """pattern p {
    heads 0..1: causal & (window(3) | window(12, dilation = 4))
    causal & window(12, dilation = 4)
}"""

PART_CHECKS = {
    # grouped-query heads, a dilated window in residue classes and the global rows and keys in thin tiles
    "parts_dilated_global_gqa": functools.partial(
        check_parts, "pattern p { window(2, 2, dilation = 8) | global(2) }", 128, 128, 2, 1
    ),
    "slow_parts_end_aligned": functools.partial(
        check_parts, "pattern p { window(2, 2, dilation = 8) | global(2) }", 64, 128, 1, 1
    ),
    "slow_parts_per_head": functools.partial(check_parts, PER_HEAD, 64, 64, 2, 2),
}
