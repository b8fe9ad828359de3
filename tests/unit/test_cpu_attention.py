"""The CPU executor against the float64 dense reference: forward, LSE and gradients.

Random inputs every run; sizes small enough that the whole file runs in seconds.
Tiles are shrunk (``CPU_BLOCK``) so that short sequences still have many tiles,
tails, affine segments and gathered buckets.
"""

from __future__ import annotations

import sys

import pytest
import torch

import patterndsl
from patterndsl import runtime, semantics
from patterndsl.analysis.plan import plan_from_mask
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu.forward import split
from tests.reference import reference_attention

GRID = "layout grid(y = 6, x = 10)\n"
PATTERNS = {
    "full": "full",
    "empty": "empty",
    "causal": "causal",
    "window": "window(5)",
    "window_after": "window(3, 2)",
    "window_dilated": "causal & window(4, 0, 3)",
    "strided": "strided(4)",
    "blocks": "blocks(16)",
    "summary": "summary(8, 2)",
    "sink": "causal & sink(3)",
    "global": "global(5)",
    "landmarks": "landmarks(7)",
    "random": "random(2, 16, 1)",
    "where": "where(abs(q - k) % 5 == 0 or k < 2)",
    "where_empty_rows": "where(q % 3 == 0 and k <= q)",
    "streaming": "causal & (window(20) | sink(4))",
    "difference": "blocks(16) - causal",
    "complement": "~causal",
    "strict_causal": "causal - window(0)",
    "bigbird": "window(3, 3) | global(2) | random(1, 16, 7)",
    "neighborhood": GRID + "neighborhood(3)",
    "neighborhood_dil": GRID + "neighborhood((3, 5), dilation = (1, 2))",
    "neighborhood_causal": GRID + "neighborhood(3, stride = 2, causal = (true, false))",
    "grid_where": GRID + "where(abs(q.y - k.y) <= 1 and q.x >= k.x)",
    "per_head": "heads 0..1: causal\nheads 1..3: window(4)\nfull",
    "head_where": "where((q + h) % 3 != 0)",
}
GRID_LEN = 60


def _compile(body: str):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


def _inputs(b, h, hkv, lq, lk, d, dtype):
    q = torch.randn(b, h, lq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, dtype=dtype, requires_grad=True)
    return q, k, v


def _check(pattern, q, k, v, scale=None, atol=2e-5, gtol=1e-4):
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    out, lse = pattern(q, k, v, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert out.shape == q.shape and lse.shape == (b, h, lq)
    mask = pattern.mask(lq, lk, h)
    ref_out, ref_lse = reference_attention(q, k, v, mask, scale)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=atol)
    empty = ~mask.any(-1).expand(b, -1, -1)
    assert bool(torch.isneginf(lse[empty]).all())
    torch.testing.assert_close(lse[~empty].double(), ref_lse.detach()[~empty], atol=atol, rtol=atol)
    assert bool((out[empty] == 0).all())
    grad = torch.randn_like(out)
    (out.float() * grad).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (ref_out * grad.double()).sum().backward()
    for name, g, t in zip("qkv", got, (q, k, v), strict=True):
        assert bool(torch.isfinite(g).all()), f"d{name} has NaN/inf"
        expect = t.grad.double()
        torch.testing.assert_close(g.double(), expect, atol=gtol, rtol=gtol, msg=lambda m, n=name: f"d{n}: {m}")
    if bool(empty.any()):
        assert bool((got[0][empty] == 0).all())


@pytest.fixture(params=[(16, 16), (16, 32)], ids=lambda b: f"{b[0]}x{b[1]}")
def block(request, monkeypatch):
    monkeypatch.setattr(runtime, "CPU_BLOCK", request.param)
    return request.param


@pytest.fixture(params=["fused", "math"])
def kernel(request):
    with cpu.options(kernel=request.param):
        yield request.param


@pytest.fixture(
    params=[((16, 16), "fused"), ((16, 32), "fused"), ((16, 32), "math")], ids=["16x16-fused", "16x32-fused", "math"]
)
def config(request, monkeypatch):
    """Tile sizes and inner kernel: both kernels, square and non-square tiles, without the full product."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", request.param[0])
    with cpu.options(kernel=request.param[1]):
        yield request.param


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_fp32(name, config):
    pattern = _compile(PATTERNS[name])
    length = GRID_LEN if "layout" in PATTERNS[name] else 100
    _check(pattern, *_inputs(2, 3, 3, length, length, 16, torch.float32))


@pytest.mark.parametrize("name", ["streaming", "bigbird", "where_empty_rows", "neighborhood_dil"])
def test_default_tiles_longer_sequences(name, kernel):
    pattern = _compile(PATTERNS[name].replace("y = 6, x = 10", "y = 20, x = 30"))
    length = 600 if "layout" in PATTERNS[name] else 333
    _check(pattern, *_inputs(1, 2, 1, length, length, 16, torch.float32))


@pytest.mark.parametrize("name", ["causal", "streaming", "where_empty_rows", "bigbird", "per_head", "sink"])
def test_lq_ne_lk_gqa_tails(name, config):
    pattern = _compile(PATTERNS[name])
    _check(pattern, *_inputs(1, 4, 2, 37, 90, 24, torch.float32))


@pytest.mark.parametrize("name", ["window", "neighborhood", "head_where"])
def test_gqa_and_scale(name, block):
    pattern = _compile(PATTERNS[name])
    length = GRID_LEN if "layout" in PATTERNS[name] else 83
    _check(pattern, *_inputs(2, 6, 2, length, length, 8, torch.float32), scale=0.37)


@pytest.mark.parametrize("dtype,atol,gtol", [(torch.float16, 2e-3, 2e-2), (torch.bfloat16, 1.6e-2, 1e-1)])
@pytest.mark.parametrize("name", ["streaming", "bigbird", "neighborhood_dil", "where_empty_rows"])
def test_low_precision(name, dtype, atol, gtol, block):
    pattern = _compile(PATTERNS[name])
    length = GRID_LEN if "layout" in PATTERNS[name] else 96
    _check(pattern, *_inputs(1, 2, 1, length, length, 32, dtype), atol=atol, gtol=gtol)


def test_lse_gradient():
    pattern = _compile(PATTERNS["streaming"])
    q, k, v = _inputs(1, 2, 2, 50, 50, 8, torch.float64)
    mask = pattern.mask(50, 50, 2)

    def loss(fn):
        out, lse = fn()
        return (out * 0.5).sum() + (lse * torch.linspace(-1, 1, 50, dtype=lse.dtype)).sum()

    loss(lambda: pattern(q, k, v, return_lse=True)).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss(lambda: reference_attention(q, k, v, mask)).backward()
    for g, t in zip(got, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "body",
    [
        PATTERNS["streaming"],
        PATTERNS["where_empty_rows"],
        "layout grid(y = 3, x = 4)\nneighborhood(3, stride = 2, causal = (true, false))",
    ],
    ids=["streaming", "empty_rows", "neighborhood"],
)
def test_gradcheck_float64(body, kernel, monkeypatch):
    monkeypatch.setattr(runtime, "CPU_BLOCK", (4, 4))
    pattern = _compile(body)
    q, k, v = _inputs(1, 2, 1, 12, 12, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: pattern(q, k, v), (q, k, v), fast_mode=True)
    # float64 inputs keep a float64 lse: finite differences see it exactly (-inf rows have no gradient).
    lse_of = lambda q, k, v: pattern(q, k, v, return_lse=True)[1].nan_to_num(neginf=0.0)  # noqa: E731
    assert torch.autograd.gradcheck(lse_of, (q, k, v), fast_mode=True)


def test_reordered_plan_matches_reference(kernel):
    """A plan that permutes queries and keys still returns results in the original order."""
    pattern = _compile(PATTERNS["window_dilated"])
    lq = lk = 70
    mask = pattern.mask(lq, lk, 2)
    q_order, kv_order = torch.randperm(lq), torch.randperm(lk)
    nodes = [pattern.ir.node_for_head(h) for h in range(2)]
    plan = plan_from_mask(mask, (16, 16), q_order, kv_order, pattern=pattern.ir, nodes=nodes)
    q, k, v = _inputs(1, 2, 2, lq, lk, 8, torch.float32)
    out, lse = cpu.forward(q, k, v, plan, 0.3)
    ref_out, ref_lse = reference_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=2e-5, rtol=2e-5)
    dout = torch.randn_like(out)
    dq, dk, dv = cpu.backward(q, k, v, out, lse, dout, plan, 0.3)
    ref_out.backward(dout.double())
    for g, t in zip((dq, dk, dv), (q, k, v), strict=True):
        torch.testing.assert_close(g.double(), t.grad.double(), atol=1e-4, rtol=1e-4)


def test_sliding_window_runs_as_one_affine_segment_with_shared_mask():
    pattern = _compile("causal & window(100)")
    lq = 1024
    plan = plan_from_mask(pattern.mask(lq, lq, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    (sched,) = cpu.schedules(plan)
    affine = [s for s in sched.segments if s.affine is not None]
    assert len(affine) == 1
    seg = affine[0]
    assert seg.affine[1] == 1 and seg.width == 3 and len(seg) >= 12
    assert seg.blocked is not None and seg.blocked.shape[0] == 1  # one mask shared by every tile
    covered = torch.cat([s.q_tiles for s in sched.segments]).sort().values
    assert torch.equal(covered, torch.arange(plan.n_q_tiles))
    # The two narrower leading tiles (widths 1 and 2) share one padded, gathered step.
    (gathered,) = [s for s in sched.segments if s.affine is None]
    assert gathered.width == 2 and len(gathered) == 2
    assert bool(gathered.blocked[0, :, 64:].all())


def test_full_tiles_get_no_mask():
    pattern = _compile("blocks(64)")
    plan = plan_from_mask(pattern.mask(512, 512, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    (sched,) = cpu.schedules(plan)
    assert all(s.blocked is None for s in sched.segments)


def test_partial_masks_come_from_semantics(monkeypatch):
    """Element masks are evaluated only for partial tiles, never for full ones."""
    calls = []
    real = semantics.evaluate

    def spy(node, i, j, h, ctx, *args):
        calls.append(int(i.shape[0]))
        return real(node, i, j, h, ctx, *args)

    pattern = _compile("causal & window(127)")
    plan = plan_from_mask(pattern.mask(640, 640, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    monkeypatch.setattr(semantics, "evaluate", spy)
    cpu.schedules(plan)
    tiles = plan.tiles()
    assert sum(calls) == int((tiles == 1).sum())


def test_zero_length_sequences_are_a_pattern_error():
    pattern = _compile("causal")
    q, k, v = _inputs(1, 2, 2, 5, 0, 8, torch.float32)
    with pytest.raises(patterndsl.PatternError, match="k and v have sequence length 0"):
        pattern(q, k, v)


SPLIT_CASES = {
    "sliding": ("causal & window(100)", 704),
    "sliding_wide": ("causal & window(255)", 1024),
    "two_sided": ("window(40, 20)", 640),
    # Rows 24..31 of every sub-tile see no key: empty rows inside the shared sub-tile mask.
    "empty_rows": ("causal & window(100) & where(q % 32 < 24)", 700),
}


@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
def test_split_sub_tiles_match_reference(name, monkeypatch):
    """Forward runs affine segments as 32-row sub-tiles over narrower key windows: same values, LSE, gradients."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (64, 64))
    # Small chunks so the backward runs several chunks, whatever the thread count.
    opts = cpu.CpuOptions(kernel="fused", fused_chunk_bytes=256 << 10, fused_chunk_bytes_serial=256 << 10)
    body, length = SPLIT_CASES[name]
    pattern = _compile(body)
    plan = plan_from_mask(pattern.mask(length, length, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    splits = [split(s, plan.block, torch.float32, opts.split_rows) for s in cpu.schedules(plan, opts)[0].segments]
    assert any(sp is not None and sp.width < 64 * 5 for sp in splits), "the split path is not exercised"
    with cpu.options(opts):
        _check(pattern, *_inputs(2, 4, 2, length, length, 16, torch.float32))


def test_split_sub_tiles_never_see_keys_outside_their_window(monkeypatch):
    """A sub-tile's key window never starts before key 0 nor covers keys a row may not see."""
    pattern = _compile("causal & window(100)")
    plan = plan_from_mask(pattern.mask(1024, 1024, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    (seg,) = [s for s in cpu.schedules(plan)[0].segments if s.affine is not None]
    sp = split(seg, plan.block, torch.float32, cpu.CpuOptions().split_rows)
    assert sp is not None and sp.parts == 2 and sp.key0 >= 0
    first = int(seg.q_tiles[0])
    mask = pattern.mask(1024, 1024, 1)[0]
    for i in range(len(seg) * sp.parts):
        rows = torch.arange(first * 64 + i * sp.rows, first * 64 + (i + 1) * sp.rows)
        keys = torch.arange(sp.key0 + i * sp.step, sp.key0 + i * sp.step + sp.width)
        seen = torch.zeros(1024, dtype=torch.bool)
        seen[keys] = True
        # Every allowed pair of these rows lies inside the window ...
        assert not bool(mask[rows][:, ~seen].any())
        # ... and the window's mask blocks exactly the pairs the pattern forbids.
        assert torch.equal(~sp.blocked, mask[rows][:, keys])


#: Affine segments of every kind the in-place backward handles: (pattern, Lq, Lk, expected
#: (step, mask kind) among the affine segments of the plan at 8x8 tiles).
AFFINE_CASES = {
    # Query tile m reaches key tiles 2m, 2m+1, fully: step 2, no mask.
    "step2_full": ("where(k // 16 == (q - 64) // 8)", 64, 128, (2, "none")),
    # The same with holes that differ from tile to tile: step 2, one mask per tile.
    "step2_masked": ("where(k // 16 == (q - 64) // 8 and (q + k) % 5 != 0)", 64, 128, (2, "per_tile")),
    # Every query tile reaches the same two key tiles: step 0, one shared mask.
    "step0_shared": ("where(k < 13)", 64, 64, (0, "shared")),
    # A sliding window: step 1, one shared mask.
    "step1_shared": ("causal & window(12)", 80, 80, (1, "shared")),
    # Rows with no allowed key inside an affine segment.
    "empty_rows": ("causal & window(12) & where(q % 8 < 5)", 80, 80, (1, "shared")),
}


def _affine_kinds(plan) -> set[tuple[int, str]]:
    kinds = set()
    for sched in cpu.schedules(plan):
        for seg in sched.segments:
            if seg.affine is None:
                continue
            mask = "none" if seg.blocked is None else "shared" if seg.blocked.shape[0] == 1 else "per_tile"
            kinds.add((seg.affine[1], mask))
    return kinds


@pytest.mark.parametrize("name", sorted(AFFINE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_backward_accumulates_in_place(name, dtype, monkeypatch):
    """dQ/dK/dV (with a gradient on lse too) of affine segments of every step and mask kind."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (8, 8))
    # Steps of 3 query tiles: several steps per segment, the last one short; in float64 the
    # byte budget cuts steps to one tile.
    opts = cpu.CpuOptions(affine_bwd_tiles=3, affine_bwd_bytes=1 if dtype == torch.float64 else 4 << 20)
    body, lq, lk, kind = AFFINE_CASES[name]
    pattern = _compile(body)
    plan = plan_from_mask(pattern.mask(lq, lk, 1), (8, 8), pattern=pattern.ir, nodes=[pattern.ir.default])
    assert kind in _affine_kinds(plan), _affine_kinds(plan)
    q, k, v = _inputs(2, 4, 2, lq, lk, 8, dtype)
    mask = pattern.mask(lq, lk, 4)
    w_out, w_lse = torch.randn(2, 4, lq, 8, dtype=dtype), torch.randn(2, 4, lq, dtype=torch.float64)

    def loss(out, lse):
        # lse of rows with no allowed key is -inf; its gradient there is 0 by contract.
        lse = lse.double().masked_fill(torch.isinf(lse), 0.0)
        return (out.double() * w_out.double()).sum() + (lse * w_lse).sum()

    with cpu.options(opts):
        loss(*pattern(q, k, v, return_lse=True)).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss(*reference_attention(q, k, v, mask)).backward()
    # float64 inputs are computed in float64 throughout, the saved lse included.
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name_, g, t in zip("qkv", got, (q, k, v), strict=True):
        assert bool(torch.isfinite(g).all())
        torch.testing.assert_close(g.double(), t.grad.double(), atol=tol, rtol=tol, msg=lambda m, n=name_: f"d{n}: {m}")


GATHERED_CASES = {
    # Per-tile masks, repeated key tiles across query tiles (random blocks), global rows and columns.
    "bigbird": ("window(3, 3) | global(2) | random(1, 16, 7)", 72, 72),
    # Rows with no allowed key in a gathered bucket, keys beyond the queries.
    "empty_rows": ("where(q % 3 == 0 and k <= q + 20 and k % 7 != 1)", 45, 70),
    # More queries than keys.
    "random": ("random(1, 8, 3) | where(k == 0)", 70, 45),
}


@pytest.mark.parametrize("name", sorted(GATHERED_CASES))
@pytest.mark.parametrize("budget", [1, 64 << 20], ids=["per_tile", "one_step"])
def test_gathered_backward_matches_reference(name, budget, monkeypatch):
    """dQ/dK/dV of gathered segments (our own exp2 backward, one index_add_ per step), with a gradient
    on lse, grouped-query heads and Lq != Lk, in float64, one tile per step or the whole segment."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (8, 8))
    body, lq, lk = GATHERED_CASES[name]
    pattern = _compile(body)
    plan = plan_from_mask(pattern.mask(lq, lk, 1), (8, 8), pattern=pattern.ir, nodes=[pattern.ir.default])
    opts = cpu.CpuOptions(fused_chunk_bytes=budget, fused_chunk_bytes_serial=budget)
    assert any(seg.affine is None for seg in cpu.schedules(plan, opts)[0].segments)
    steps = []
    bwd = sys.modules["patterndsl.runtime.cpu.backward"]
    original = bwd._backward_gathered
    monkeypatch.setattr(bwd, "_backward_gathered", lambda *a: steps.append(1) or original(*a))
    q, k, v = _inputs(2, 4, 2, lq, lk, 8, torch.float64)
    mask = pattern.mask(lq, lk, 4)
    w_out, w_lse = torch.randn(2, 4, lq, 8, dtype=torch.float64), torch.randn(2, 4, lq, dtype=torch.float64)

    def loss(out, lse):
        return (out * w_out).sum() + (lse.masked_fill(torch.isinf(lse), 0.0) * w_lse).sum()

    with cpu.options(opts):
        got = torch.autograd.grad(loss(*pattern(q, k, v, return_lse=True)), (q, k, v))
    assert steps
    want = torch.autograd.grad(loss(*reference_attention(q, k, v, mask)), (q, k, v))
    for name_, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=lambda m, n=name_: f"d{n}: {m}")


def test_affine_backward_gradcheck(monkeypatch):
    monkeypatch.setattr(runtime, "CPU_BLOCK", (4, 4))
    pattern = _compile("where(k // 8 == (q - 16) // 4 and (q + k) % 5 != 0)")
    q, k, v = _inputs(1, 2, 1, 16, 32, 3, torch.float64)
    with cpu.options(affine_bwd_tiles=2):
        assert torch.autograd.gradcheck(lambda q, k, v: pattern(q, k, v), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_wide_full_runs_merge_by_lse(name, kernel, monkeypatch):
    """Long runs of full tiles in loose rows run alone and merge by log-sum-exp (any pattern, 8x8 tiles)."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (8, 8))
    pattern = _compile(PATTERNS[name])
    length = GRID_LEN if "layout" in PATTERNS[name] else 100
    with cpu.options(wide_min=2, affine_bwd_tiles=3):
        _check(pattern, *_inputs(2, 3, 3, length, length, 16, torch.float32))


@pytest.mark.parametrize("kernel_name", ["fused", "math"])
def test_causal_rows_split_into_full_runs_and_diagonal(kernel_name, monkeypatch):
    """Causal: the diagonal tiles form one masked affine segment, the full prefixes merge into it."""
    opts = cpu.CpuOptions(kernel=kernel_name, dense=False)
    pattern = _compile("causal")
    plan = plan_from_mask(pattern.mask(1024, 1024, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    (sched,) = cpu.schedules(plan, opts)
    writers = [s for s in sched.segments if not s.merge]
    wide = [s for s in sched.segments if s.merge]
    # Rows with >= wide_min full tiles before the diagonal: one masked affine diagonal segment
    # plus one unmasked full prefix each; the shorter first rows are gathered as before.
    diagonal = [s for s in writers if s.affine is not None]
    assert len(diagonal) == 1 and diagonal[0].affine == (opts.wide_min, 1) and diagonal[0].width == 1
    assert [int(s.q_tiles[0]) for s in wide] == list(range(opts.wide_min, plan.n_q_tiles))
    assert all(s.blocked is None and s.affine[0] == 0 and s.width == int(s.q_tiles[0]) for s in wide)
    covered = torch.cat([s.q_tiles for s in writers]).sort().values
    assert torch.equal(covered, torch.arange(plan.n_q_tiles))
    # Values and gradients, with a key tail inside the last diagonal tile.
    monkeypatch.setattr(runtime, "CPU_BLOCK", (64, 64))
    with cpu.options(opts):
        _check(pattern, *_inputs(1, 2, 1, 1000, 1000, 16, torch.float32))


def test_global_rows_run_unmasked_without_copies():
    pattern = _compile("window(3, 3) | global(70)")
    plan = plan_from_mask(pattern.mask(1024, 1024, 1), (64, 64), pattern=pattern.ir, nodes=[pattern.ir.default])
    (sched,) = cpu.schedules(plan)
    wide = [s for s in sched.segments if s.merge]
    # Query tile 0 sees every key: one unmasked 16-tile run (the global rows 64..69 share tile 1).
    assert any(int(s.q_tiles[0]) == 0 and s.width >= 8 and s.blocked is None for s in wide)


@pytest.mark.parametrize("v_dim", [8, 40])
@pytest.mark.parametrize("name", ["streaming", "where_empty_rows", "neighborhood"])
def test_value_head_size_of_its_own(name, v_dim):
    """v may have its own head size (as SDPA allows, e.g. MLA): values, LSE and gradients."""
    pattern = _compile(PATTERNS[name])
    length = GRID_LEN if "layout" in PATTERNS[name] else 77
    q, k, _ = _inputs(2, 4, 2, length, length, 24, torch.float32)
    v = torch.randn(2, 2, length, v_dim, requires_grad=True)
    out, lse = pattern(q, k, v, return_lse=True)
    assert out.shape == (2, 4, length, v_dim)
    ref, ref_lse = reference_attention(q, k, v, pattern.mask(length, length, 4))
    torch.testing.assert_close(out.double(), ref.detach(), atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse.detach()[finite], atol=2e-5, rtol=2e-5)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad.double())
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)


def test_box_ordered_rows_split_into_affine_pieces():
    """A 3-D neighborhood in box order: rows of a few contiguous runs become affine pieces merged by
    log-sum-exp, nothing is gathered (copied), and values and gradients stay exact."""
    pattern = _compile(
        "layout grid(t = 4, y = 16, x = 32)\nneighborhood(size = (3, 7, 7), causal = (true, false, false))"
    )
    plan = pattern.plan(2048, 2048, 1, block=(64, 64))
    assert plan.order != "identity"
    (sched,) = cpu.schedules(plan)
    assert all(s.affine is not None for s in sched.segments)
    assert any(s.merge for s in sched.segments)
    _check(pattern, *_inputs(1, 2, 1, 2048, 2048, 16, torch.float32))
