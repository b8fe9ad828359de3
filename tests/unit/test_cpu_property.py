"""Property tests of the CPU executor: for random patterns (the plan property generator), forward,
LSE and gradients (with a gradient on LSE too) equal the float64 dense reference.

Every executor option is drawn at random per case and passed to the executor explicitly, so affine
runs, gathered buckets, full runs merged by log-sum-exp, chunks down to one tile per step, sub-tiles
and both inner kernels meet arbitrary tile structures, reorderings,
``Lq != Lk``, tails, per-head rules, grouped-query heads and empty rows.
"""

from __future__ import annotations

import random

import pytest
import torch

from patterndsl import analysis, ir, semantics
from patterndsl.runtime import cpu
from tests.reference import reference_attention
from tests.unit.test_plan_property import _route, rand_case


def check_case(rng: random.Random, routes: bool = False) -> None:
    pir, lq, lk, heads, block = rand_case(rng)
    if routes:
        # A route joined to the pattern: the choice is made from q and k at every call.
        node = rng.choice([ir.union, ir.inter])(pir.default, _route(rng, pir.layout))
        pir = ir.PatternIR("r", (), pir.layout, pir.heads, ir.complement(node) if rng.random() < 0.2 else node)
    opts = cpu.CpuOptions(
        kernel=rng.choice(["fused", "math"]),
        wide_min=rng.choice([0, 1, 2, 8]),
        min_affine=rng.choice([1, 2, 4]),
        split_runs=rng.choice([0, 1, 2]),
        split_rows=rng.choice([0, 2, 32]),
        affine_bwd_tiles=rng.choice([1, 2, 32]),
        affine_bwd_bytes=rng.choice([1, 4 << 20]),
        chunk_bytes=rng.choice([1, 4 << 20]),
        fused_chunk_bytes=rng.choice([1, 64 << 20]),
        fused_chunk_bytes_serial=rng.choice([1, 8 << 20]),
        gather_row_chunk=rng.choice([1, 3, 2048]),
    )
    order = rng.choice(["identity", "auto"])
    plan = analysis.plan(pir, lq, lk, heads, block=block, order=order)
    kv_heads = rng.choice([h for h in (1, heads) if heads % h == 0])
    batch, dim = rng.choice([1, 2]), rng.choice([1, 3, 8])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q = torch.randn(batch, heads, lq, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, lk, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(batch, heads, lq, dim, generator=gen, dtype=torch.float64)
    dlse = torch.randn(batch, heads, lq, generator=gen, dtype=torch.float64)
    scale = rng.choice([0.3, dim**-0.5])
    where = f"{pir}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} block={block} order={plan.order}\n{opts}"

    out, lse = cpu.forward(q, k, v, plan, scale, options=opts)
    mask = semantics.mask(pir, lq, lk, heads, q=q, k=k) if routes else semantics.mask(pir, lq, lk, heads)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_attention(qr, kr, vr, mask, scale)
    torch.testing.assert_close(out, ref.detach(), atol=1e-9, rtol=1e-9, msg=lambda m: f"out: {m}\n{where}")
    # lse is float32 whatever the inputs (the contract's dtype); the backward gets it so, as through the op.
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-6, rtol=1e-6, msg=lambda m: f"lse: {m}\n{where}")
    use_dlse = rng.random() < 0.5
    grads = cpu.backward(q, k, v, out, lse, dout, plan, scale, dlse=dlse if use_dlse else None, options=opts)
    finite = torch.isfinite(ref_lse)
    loss = (ref * dout).sum() + ((ref_lse.masked_fill(~finite, 0.0) * dlse).sum() if use_dlse else 0.0)
    want = torch.autograd.grad(loss, (qr, kr, vr), allow_unused=True)
    for name, g, w in zip("qkv", grads, want, strict=True):
        w = torch.zeros_like(g) if w is None else w
        assert bool(torch.isfinite(g).all()), f"d{name} not finite\n{where}"
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"d{n}: {m}\n{where}")


@pytest.mark.parametrize("seed", range(6))
def test_random_patterns_match_reference(seed):
    rng = random.Random(7000 + seed)
    for _ in range(12):
        check_case(rng)


@pytest.mark.parametrize("seed", range(3))
def test_random_route_patterns_match_reference(seed):
    rng = random.Random(8000 + seed)
    for _ in range(10):
        check_case(rng, routes=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(30))
def test_random_patterns_match_reference_many(seed):
    rng = random.Random(90_000 + seed)
    for i in range(60):
        check_case(rng, routes=i % 4 == 0)
