"""Interpreter cases for plans that run as parts (issue 17): one kernel pass per part, merged by
log-sum-exp exactly as the op merges them (:mod:`patterndsl.runtime.combine`), compared with the
float64 reference (out, lse and the gradients, a gradient on lse included). The split options make
small plans split; blocks of 32 leave room for the thin 16-wide tiles."""

from __future__ import annotations

import functools
import random

import torch

import patterndsl
from patterndsl import runtime
from patterndsl.analysis import parts
from patterndsl.codegen import passes
from patterndsl.codegen.launch import fit_tiles
from patterndsl.runtime import combine, plans
from patterndsl.runtime import triton_backend as tb
from tests.interpreter.cases import TOL
from tests.reference import reference_attention

#: Splits pay at these sizes: no cost per pass or tile, thin tiles counted by their pairs alone.
EAGER = parts.PartOptions(pass_tiles=0, keep_above=1.0, tile_pairs=0, min_side=0)


def check_parts(
    source: str,
    lq: int,
    lk: int,
    heads: int,
    kv_heads: int,
    d: int = 16,
    dtype: torch.dtype = torch.float32,
    row: tuple[int, int] | None = None,
) -> None:
    """Attention through the plan's parts (each fitted to a launch row's tiles ``row`` first, as a GPU
    launch fits them: ``codegen.passes``) equals the float64 reference: out, lse and the gradients."""
    pattern = patterndsl.compile(source)
    with parts.options(EAGER):
        plan = pattern.plan(lq, lk, heads, block=(32, 32))
    # runs as parts: two or more, or one part in a tile shape of its own (random's blocks)
    assert len(plan.parts) >= 2 or (plan.parts and plan.parts[0].block != plan.block), "the case must run as parts"
    runs = plan.parts
    if row is not None:
        runs = tuple(passes.fitted(part, row) for part in plan.parts)
        for part, run in zip(plan.parts, runs, strict=True):
            assert run.block == fit_tiles(row, part.block) and run.order == part.order
        assert any(run.block != part.block for part, run in zip(plan.parts, runs, strict=True))
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, d, generator=gen).to(dtype)
    k, v = (torch.randn(2, kv_heads, lk, d, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(2, heads, lq, d, generator=gen).to(dtype)
    dlse = torch.randn(2, heads, lq, generator=gen)
    scale = 0.7 * d**-0.5
    fwd_tol, grad_tol = TOL[dtype]
    out, lse = combine.forward(functools.partial(tb.forward, q, k, v, part, scale) for part in runs)
    assert out.dtype == dtype
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, pattern.mask(lq, lk, heads), scale)
    where = f"(seed {seed})"
    torch.testing.assert_close(out.double(), ref_out, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"out {where}: {m}")
    torch.testing.assert_close(lse.double(), ref_lse, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"lse {where}: {m}")
    grads = combine.backward(
        functools.partial(tb.backward, q, k, v, out, lse, dout, part, scale, dlse=dlse) for part in runs
    )
    torch.autograd.backward((ref_out, ref_lse), (dout.double(), dlse.double()))
    for name, got, want in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad), strict=True):
        assert got.dtype == dtype, name
        torch.testing.assert_close(
            got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n} {where}: {m}"
        )


def check_op_parts(source: str, length: int, heads: int) -> None:
    """``attention(..., backend="triton")`` runs the parts through the op (one pass each, merged by lse)."""
    pattern = patterndsl.compile(source)
    plans.clear()
    try:
        with parts.options(EAGER):
            key = runtime._plan_key(pattern.ir, "triton")
            assert len(plans.get(key, length, length, heads).parts) >= 2, "the case must run as parts"
            gen = torch.Generator().manual_seed(random.randrange(2**31))
            q, k, v = (torch.randn(1, heads, length, 16, generator=gen, requires_grad=True) for _ in range(3))
            out, lse = patterndsl.attention(q, k, v, pattern, return_lse=True, backend="triton")
            (out.sum() + lse.sum()).backward()
    finally:
        plans.clear()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, pattern.mask(length, length, heads), 16**-0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=2e-4)
    (ref_out.sum() + ref_lse.sum()).backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)


PER_HEAD = """pattern p {
    heads 0..1: causal & (window(3) | window(12, dilation = 4))
    causal & window(12, dilation = 4)
}"""

#: A GPU launch row narrower than the plan (float32, head dim 256, backward: 32 x 16 on sm_80/sm_90, here on
#: a 32 x 32 plan): every part is re-planned in its own order, a 16-row part stays 16 rows.
NARROW_ROW = (32, 16)
DILATED_GLOBAL = "pattern p { window(2, 2, dilation = 8) | global(2) }"
SPARSE_FIXED = "pattern p { causal & (blocks(16) | summary(16, 2)) }"
SPARSE_STRIDED = "pattern p { causal & (window(7) | strided(8)) }"  # splits from 256 tokens at 32 x 32
LONGFORMER = "pattern p { window(4, 4, dilation = 2) | global(2) }"
BIGBIRD = "pattern p { window(3, 4) | global(4) | random(1, 16, seed = 1) }"

PART_CHECKS = {
    # grouped-query heads, a dilated window in residue classes and the global rows and keys in thin tiles
    "parts_dilated_global_gqa": functools.partial(
        check_parts, "pattern p { window(2, 2, dilation = 8) | global(2) }", 128, 128, 2, 1
    ),
    "slow_parts_end_aligned": functools.partial(
        check_parts, "pattern p { window(2, 2, dilation = 8) | global(2) }", 64, 128, 1, 1
    ),
    "slow_parts_per_head": functools.partial(check_parts, PER_HEAD, 64, 64, 2, 2),
    # the thin part tiles fitted to a narrower launch row, half precision
    "slow_parts_fitted_row_fp16": functools.partial(
        check_parts, DILATED_GLOBAL, 128, 128, 1, 1, dtype=torch.float16, row=NARROW_ROW
    ),
    "slow_parts_sparse_fixed": functools.partial(check_parts, SPARSE_FIXED, 128, 128, 1, 1, row=NARROW_ROW),
    "slow_parts_sparse_strided_fp16": functools.partial(
        check_parts, SPARSE_STRIDED, 256, 256, 1, 1, dtype=torch.float16
    ),
    "slow_parts_longformer": functools.partial(check_parts, LONGFORMER, 128, 128, 1, 1, row=NARROW_ROW),
    "slow_parts_bigbird_fp16": functools.partial(check_parts, BIGBIRD, 64, 64, 1, 1, dtype=torch.float16),
    "slow_parts_through_the_op": functools.partial(check_op_parts, DILATED_GLOBAL, 128, 2),
}
