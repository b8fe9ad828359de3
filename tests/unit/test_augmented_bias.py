"""A bias ``g(q) + u(k)`` on plain ``causal`` / ``full`` runs as torch's fused kernel with one more head column.

:mod:`patterndsl.runtime.cpu.augmented` folds ``u(k)`` (shifted per chunk of rows) into the product
``[scale * q, 1] . [k, x_k - c]`` and ``g(q)`` into the log-sum-exp. Outputs, lse and gradients equal a
float64 reference: steep slopes (several chunks per head, heads in groups of different chunk sizes),
``full``, ``Lq != Lk`` both ways (rows with no key), grouped-query heads, a per-key float table; a bias
too steep for the shortest chunk, float tables needing a gradient and a gradient on the lse run through
the tile schedule instead. In float32 the error stays at float32 rounding of the shifted bias.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl import analysis, semantics
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import augmented
from tests.reference import reference_attention

# Slopes 4, 2, 1, 1/2 (head 0 the steepest): chunks of at most 127, 255, 510, 1020 rows.
ALIBI = "pattern p(n = 4) { PRIM\n score s - 2.0 ** (2.0 - h) * (q - k) }"
KEY_TABLE = "pattern p { input kb: float[token]\n causal\n score s + kb[k] - 0.25 * q }"


def _alibi(s, q, k, h, lq, lk):
    return s - torch.exp2(2.0 - h.double()) * (q - k)


def _calls(monkeypatch):
    seen = {"forward": 0, "backward": 0}
    for name in seen:
        original = getattr(augmented, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            seen[_name] += result is not None
            return result

        monkeypatch.setattr(augmented, name, counted)
    return seen


def _run(source, lq, lk, heads, kv_heads, score, dtype=torch.float64, data=None, dlse=False, d=8, allowed=None):
    pir = patterndsl.compile(source).ir
    plan = analysis.plan(pir, lq, lk, heads)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, lq, d, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, lk, d, generator=gen, dtype=dtype) for _ in range(2))
    dout = torch.randn(1, heads, lq, d, generator=gen, dtype=dtype)
    glse = torch.randn(1, heads, lq, generator=gen, dtype=dtype) if dlse else None
    leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference_attention(*leaves, semantics.mask(allowed or pir, lq, lk, heads), 0.5, score=score)
    out, lse = cpu.forward(q, k, v, plan, 0.5, data=data)
    grads = cpu.backward(q, k, v, out, lse, dout, plan, 0.5, dlse=glse, data=data)
    empty = ~torch.isfinite(ref_lse)
    loss = (ref * dout.double()).sum()
    if dlse:
        loss = loss + (ref_lse.masked_fill(empty, 0.0) * glse.double()).sum()
    want = torch.autograd.grad(loss, leaves)
    return (out, lse, grads[:3]), (ref.detach(), ref_lse.detach(), want)


def _close(got, want, tol):
    for g, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)
    for g, w in zip(*(x[2:] and x[2] for x in (got, want)), strict=True):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("prim", "lq", "lk", "kv_heads"),
    [("causal", 200, 200, 4), ("causal", 130, 200, 2), ("causal", 200, 130, 4), ("full", 100, 120, 2)],
)
def test_alibi_runs_augmented_and_equals_the_reference(monkeypatch, prim, lq, lk, kv_heads):
    calls = _calls(monkeypatch)
    got, want = _run(ALIBI.replace("PRIM", prim), lq, lk, 4, kv_heads, _alibi)
    _close(got, want, 1e-10)
    assert calls == {"forward": 1, "backward": 1}
    assert bool(torch.isinf(got[1]).any()) == (lq > lk)


def test_steep_heads_run_in_chunks_grouped_by_size():
    plan = analysis.plan(patterndsl.compile(ALIBI.replace("PRIM", "causal")).ir, 300, 300, 4)
    x, _, layouts = augmented.layout_of(plan, 1, 4, None)
    sizes = {int(torch.arange(4)[hs][0]): lay.size for hs, lay in layouts}
    assert sizes == {0: 100, 1: 150, 2: 300, 3: 300}  # heads 2 and 3: one chunk of every row
    for hs, lay in layouts:
        seen = x[:, hs].cummax(-1).values
        for c, rows, _ in augmented._chunks(lay, 300):
            # Every row's largest visible x_k is within SPREAD of its chunk's shift.
            assert float((seen[..., rows] - c[..., None]).abs().max()) <= augmented.SPREAD


def test_float32_error_stays_at_rounding_of_the_shifted_bias(monkeypatch):
    """Steep heads in float32: no larger errors than the tile schedule's (which adds each tile's bias)."""
    source = ALIBI.replace("PRIM", "causal")
    calls = _calls(monkeypatch)
    got, want = _run(source, 200, 200, 4, 4, _alibi, dtype=torch.float32, d=32)
    assert calls == {"forward": 1, "backward": 1}
    monkeypatch.setattr(augmented, "applies", lambda *args, **kwargs: False)
    tiles, _ = _run(source, 200, 200, 4, 4, _alibi, dtype=torch.float32, d=32)
    for g, t, w in zip([*got[:2], *got[2]], [*tiles[:2], *tiles[2]], [*want[:2], *want[2]], strict=True):
        finite = torch.isfinite(w)
        error, tile_error = ((x.double() - w)[finite].abs().max() for x in (g, t))
        assert error <= 1.5 * tile_error + 1e-6, (error, tile_error)
    _close(got[:2], want[:2], 2e-5)


def test_a_key_table_runs_augmented_forward_and_its_gradient_through_the_tiles(monkeypatch):
    calls = _calls(monkeypatch)
    table = torch.randn(120, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def score(s, q, k, h, lq, lk):
        return s + table[k] - 0.25 * q

    allowed = patterndsl.compile("pattern p { causal }").ir
    got, want = _run(KEY_TABLE, 120, 120, 2, 2, score, data=[table], allowed=allowed)
    _close(got, want, 1e-10)
    assert calls == {"forward": 1, "backward": 0}


@pytest.mark.parametrize("steep", [False, True])
def test_too_steep_or_a_gradient_on_lse_runs_the_tile_schedule(monkeypatch, steep):
    calls = _calls(monkeypatch)
    source = ALIBI.replace("PRIM", "causal").replace("2.0 - h", "9.0 - h" if steep else "2.0 - h")

    def score(s, q, k, h, lq, lk):
        return s - torch.exp2((9.0 if steep else 2.0) - h.double()) * (q - k)

    got, want = _run(source, 100, 100, 4, 4, score, dlse=not steep)
    _close(got, want, 1e-9)
    assert calls == {"forward": int(not steep), "backward": 0}


def test_public_call_with_gradients_on_worker_threads_leaves_denormals_alone(monkeypatch):
    """Through the op (inputs requiring grad, two threads: the heads run on workers that flush denormals
    and do not record a graph); the calling thread's denormal setting is untouched."""
    calls = _calls(monkeypatch)
    p = patterndsl.compile(ALIBI.replace("PRIM", "causal"))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 150, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out, lse = p(q, k, v, scale=0.5, return_lse=True)
        got = torch.autograd.grad((out * out.detach()).sum(), (q, k, v))  # no gradient on lse
    finally:
        torch.set_num_threads(threads)
    assert calls == {"forward": 1, "backward": 1}
    assert (torch.tensor([1e-30]) * 1e-10).item() != 0.0
    allowed = semantics.mask(p.ir, 150, 150, 4)
    ref, ref_lse = reference_attention(q, k, v, allowed, 0.5, score=_alibi)
    want = torch.autograd.grad((ref * ref.detach()).sum(), (q, k, v))
    _close((out, lse, got), (ref, ref_lse, want), 1e-10)
