"""The CPU forward of a score modifier selects blocked pairs on partial key tiles only.

:func:`patterndsl.runtime.cpu.views.partial_columns` gives the column ranges of a segment's key
windows that hold blocked pairs (a sliding window's affine segment: its first and last key tile);
the math forward masks those and leaves full tiles alone, and a score that reads no position
(``cap * tanh(s / cap)``, a per-head term) is evaluated without per-pair position indices. Outputs,
lse and gradients equal a float64 reference: grouped-query heads, ``Lq != Lk``, rows with no key,
chunks of one tile and whole segments.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

import patterndsl
from patterndsl import analysis, semantics
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import pool
from patterndsl.runtime.cpu.scoremod import reads_positions
from patterndsl.runtime.cpu.units import units
from patterndsl.runtime.cpu.views import partial_columns
from tests.reference import reference_attention

SOFTCAP = "pattern p(cap = 2.0) { causal & window(20) & where(q % 7 != 3)\n score cap * tanh(s / cap) }"
PER_HEAD = "pattern p { causal & window(20)\n score s * (h + 1.0) / 4.0 }"
ADDITIVE = "pattern p { causal & window(20)\n score s + 0.5 * h }"


def _score(source):
    if "tanh" in source:
        return lambda s, q, k, h, lq, lk: 2.0 * torch.tanh(s / 2.0)
    if "/ 4.0" in source:
        return lambda s, q, k, h, lq, lk: s * (h + 1.0) / 4.0
    return lambda s, q, k, h, lq, lk: s + 0.5 * h


def _segments(source):
    plan = analysis.plan(patterndsl.compile(source).ir, 96, 96, 2, block=(8, 8))
    q = torch.zeros(1, 2, 96, 4)
    return [seg for _, sched, _ in units(plan, q, q, cpu.CpuOptions(), None)[0] for seg in sched.segments]


@pytest.mark.parametrize("source", [SOFTCAP, PER_HEAD.replace("20", "40")])
def test_partial_columns_cover_exactly_the_key_tiles_with_blocked_pairs(source):
    segments = _segments(source)
    assert any(seg.affine is not None for seg in segments)
    for seg in segments:
        runs = partial_columns(seg, 8)
        covered = torch.zeros(seg.width * 8, dtype=torch.bool)
        for a, b in runs:
            assert a % 8 == 0 and b % 8 == 0 and a < b
            covered[a:b] = True
        if seg.blocked is None:
            assert runs == []
            continue
        tiles = seg.blocked.reshape(-1, seg.width, 8).any(-1).any(0)
        assert torch.equal(covered, tiles.repeat_interleave(8))
        # Consecutive partial tiles merge into one range.
        assert all(b0 < a1 for (_, b0), (a1, _) in itertools.pairwise(runs))


def test_a_sliding_windows_affine_segment_masks_two_key_tiles():
    affine = next(seg for seg in _segments(PER_HEAD.replace("20", "40")) if seg.affine is not None)
    assert affine.width == 6 and partial_columns(affine, 8) == [(0, 8), (40, 48)]


def test_reads_positions():
    assert not reads_positions(patterndsl.compile(SOFTCAP).ir.score)
    assert not reads_positions(patterndsl.compile(PER_HEAD).ir.score)
    assert reads_positions(patterndsl.compile("pattern p { causal\n score s - 0.1 * (q - k) }").ir.score)


@pytest.mark.parametrize(
    ("source", "kernel", "chunk"),
    [
        (SOFTCAP, "fused", 4 << 20),
        (SOFTCAP, "math", 1),
        (SOFTCAP, "math", 4 << 20),
        (PER_HEAD, "math", 1),
        (ADDITIVE, "fused", 4 << 20),
    ],
)
def test_modified_forward_and_backward_match_the_reference(source, kernel, chunk):
    pir = patterndsl.compile(source).ir
    lq, lk, heads, kv_heads = 70, 83, 4, 2
    plan = analysis.plan(pir, lq, lk, heads, block=(8, 8))
    opts = cpu.CpuOptions(kernel=kernel, chunk_bytes=chunk)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, lq, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, lk, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, heads, lq, 8, generator=gen, dtype=torch.float64)
    dlse = torch.randn(2, heads, lq, generator=gen, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference_attention(qr, kr, vr, semantics.mask(pir, lq, lk, heads), 0.5, score=_score(source))
    out, lse = cpu.forward(q, k, v, plan, 0.5, options=opts)
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=1e-10, rtol=1e-10)
    empty = ~torch.isfinite(ref_lse)
    assert bool(empty.any()) == ("where" in source)
    grads = cpu.backward(q, k, v, out, lse, dout, plan, 0.5, dlse=dlse, options=opts)
    loss = (ref * dout).sum() + (ref_lse.masked_fill(empty, 0.0) * dlse).sum()
    for g, w in zip(grads, torch.autograd.grad(loss, (qr, kr, vr)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_pool_runs_every_step_restores_the_thread_count_and_raises():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        done = []
        pool.run([functools.partial(done.append, i) for i in range(7)], 2)
        assert sorted(done) == list(range(7)) and torch.get_num_threads() == 2

        def boom():
            raise ValueError("step failed")

        with pytest.raises(ValueError, match="step failed"):
            pool.run([boom, functools.partial(done.append, 7)], 2)
        assert 7 in done and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threaded_steps_equal_serial_ones():
    pir = patterndsl.compile(SOFTCAP).ir
    plan = analysis.plan(pir, 64, 64, 2, block=(8, 8))
    opts = cpu.CpuOptions(kernel="math", chunk_bytes=1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = cpu.forward(q, k, v, plan, 0.5, options=opts)
        torch.set_num_threads(2)
        threaded = cpu.forward(q, k, v, plan, 0.5, options=opts)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(serial, threaded, strict=True):
        assert torch.equal(a, b)
