"""The native backward's pieces: each register block's 16-row groups run over only the stretches of keys they see.

Gradients (dq, dk, dv) against float64 on the shapes whose edge tiles are cut into pieces (2-D and 3-D
neighborhoods on odd grids, dilated ones, windows of odd lengths, grouped-query heads, rows with no
key), for register blocks of 16, 32 and 64 rows; and the kernel's pair counter
(:func:`~patterndsl.runtime.cpu.native.backward_pairs`) against the stretches read off the program's masks,
so a backward that went back to whole blocks, or to one span per group, fails here.
"""

from __future__ import annotations

import functools

import pytest
import torch

import patterndsl
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import native
from patterndsl.runtime.cpu.native import build
from tests.reference import reference_attention
from tests.spies import count_calls

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {build.last_reason[0]}")

#: What the kernel joins (attention.cpp: kStretchGap, kStretches).
GAP, MAX_STRETCHES = 4, 4


def _compile(body: str):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


def _inputs(h, hkv, length, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, length, d, generator=g)
    k, v = (torch.randn(1, hkv, length, d, generator=g) for _ in range(2))
    return q, k, v, torch.randn(1, h, length, d, generator=g)


@functools.cache
def _case(body, length, h, hkv, block, d=32):
    """The case's plan, inputs and float64 gradients (shared by the block heights)."""
    pattern = _compile(body)
    plan = pattern.plan(length, length, h, block=block)
    q, k, v, dout = _inputs(h, hkv, length, d, seed=length + h)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference_attention(*leaves, pattern.mask(length, length, h), d**-0.5)
    ref.backward(dout.double())
    return plan, (q, k, v, dout), [w.grad for w in leaves]


def _grads_vs_float64(body, length, h, hkv, block, d=32):
    """Largest error of the executor's dq, dk, dv against float64."""
    plan, (q, k, v, dout), ref = _case(body, length, h, hkv, block, d)
    scale = d**-0.5
    out, lse = cpu.forward(q, k, v, plan, scale)
    grads = cpu.backward(q, k, v, out, lse, dout, plan, scale)
    errs = {}
    for name, x, y in zip(("dq", "dk", "dv"), grads, ref, strict=True):
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        errs[name] = float((x.double() - y).abs().max())
    return errs


CASES = [
    # (body, length, h, hkv, block): every one has partial tiles whose groups see several stretches or parts.
    ("layout grid(y = 9, x = 13)\nneighborhood(5)", 117, 2, 2, (64, 64)),
    ("layout grid(t = 3, y = 7, x = 9)\nneighborhood(3)", 189, 1, 1, (64, 64)),
    ("layout grid(y = 11, x = 15)\nneighborhood(5, dilation = 2)", 165, 2, 2, (64, 64)),
    ("window(37, 11)", 203, 2, 2, (64, 32)),
    ("causal & window(40, 0, 3)", 251, 1, 1, (128, 64)),
    ("layout grid(y = 9, x = 13)\nneighborhood(5)", 117, 4, 2, (64, 64)),  # grouped-query heads: tiled layout
    ("causal & window(9) & where(q >= 70)", 150, 2, 2, (64, 16)),  # rows 0..69 have no key
]


@pytest.mark.parametrize("rows", [16, 32, 64])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].splitlines()[-1]}-L{c[1]}-h{c[2]}/{c[3]}" for c in CASES])
def test_backward_pieces_match_float64(monkeypatch, case, rows):
    body, length, h, hkv, block = case
    monkeypatch.setattr(native, "rows_for", lambda prog: rows)
    runs = count_calls(monkeypatch, native)
    errs = _grads_vs_float64(body, length, h, hkv, block)
    assert runs["backward"] == 1
    assert max(errs.values()) < 2e-5, errs


def _stretches(words: torch.Tensor) -> list[tuple[int, int]]:
    """The runs of keys one group sees (``words [BN]`` nonzero where some row does), joined as the kernel does."""
    runs: list[list[int]] = []
    for j in torch.nonzero(words).flatten().tolist():
        if runs and j - runs[-1][1] < GAP:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    while len(runs) > MAX_STRETCHES:
        i = min(range(len(runs) - 1), key=lambda i: runs[i + 1][0] - runs[i][1])
        runs[i : i + 2] = [[runs[i][0], runs[i + 1][1]]]
    return [(a, b) for a, b in runs]


def _expected_pairs(prog) -> tuple[int, int, int]:
    """Pairs of one (batch, head) with 16-row blocks (the groups' stretches), with one span per group, and with
    32-row blocks over the union of their groups' keys (what the backward computed before pieces)."""
    bm, bn = prog.block
    groups = bm // 16
    stretched = spans = whole = 0
    for mk in prog.ent_mask.tolist():
        if mk < 0:
            stretched += bm * bn
            spans += bm * bn
            whole += bm * bn
            continue
        words = prog.masks[mk]  # [BN, groups]
        runs = [_stretches(words[:, g]) for g in range(groups)]
        stretched += 16 * sum(b - a for r in runs for a, b in r)
        spans += 16 * sum(r[-1][1] - r[0][0] for r in runs if r)
        for g in range(0, groups, 2):
            both = [x for r in runs[g : g + 2] for x in r]
            if both:
                whole += 32 * (max(b for _, b in both) - min(a for a, _ in both))
    return stretched, spans, whole


def test_edge_tiles_run_as_pieces_over_the_stretches_their_groups_see(monkeypatch):
    # A 2-D neighborhood on a 32-wide grid: a 128-key tile is 4 grid rows, and a 16-query group sees a
    # stretch of keys in each of the 3 it reaches, 10 keys out of each 32 (holes of 22 keys between).
    pattern = _compile("layout grid(y = 16, x = 32)\nneighborhood(5)")
    h, length = 2, 512
    plan = pattern.plan(length, length, h, block=(128, 128))
    (sched,) = cpu.schedules(plan)
    prog = native.program(sched, plan.n_q_tiles, plan.block)
    stretched, spans, whole = _expected_pairs(prog)
    assert stretched < 0.75 * spans and spans < whole
    q, k, v, dout = _inputs(h, h, length, 16, seed=3)
    out, lse = cpu.forward(q, k, v, plan, 0.25)
    counted = {}
    for rows in (16, 32, 64):
        monkeypatch.setattr(native, "rows_for", lambda prog, rows=rows: rows)
        before = native.backward_pairs()
        cpu.backward(q, k, v, out, lse, dout, plan, 0.25)
        counted[rows] = native.backward_pairs() - before
    # 16-row blocks compute exactly their groups' stretches; wider blocks add only holes inside pieces.
    assert counted[16] == h * stretched
    assert h * stretched <= counted[32] <= counted[64] < h * spans


def test_pair_counter_reads_zero_without_the_library(monkeypatch):
    monkeypatch.setattr(native, "_library", lambda: None)
    assert native.backward_pairs() == 0
