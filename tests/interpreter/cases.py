"""Interpreter cases: generated kernels vs the float64 reference, forward and backward.

Runs inside the worker process (:mod:`tests.interpreter.worker`), which sets
``TRITON_INTERPRET=1`` before Triton is imported. Every case draws fresh random
inputs (the seed is in the failure message), poisons every output buffer
with NaN before the launch, and compares out, lse, dq, dk and dv with
``tests/reference.py`` on the pattern's dense mask. :data:`CHECKS` maps a case
name to a zero-argument function that raises on a mismatch.
"""

from __future__ import annotations

import dataclasses
import functools
import random

import sympy
import torch

import patterndsl
from patterndsl import analysis, ir, semantics
from patterndsl.analysis.plan import HeadGroup, RunForm, TileList, plan_from_mask
from patterndsl.runtime import triton_backend as tb
from tests.reference import reference_attention

TOL = {torch.float32: (2e-4, 1e-3), torch.float16: (2e-2, 4e-2)}  # (forward, gradients)

# (id, source, Lq, Lk, heads, kv_heads, head_dim, dtype)
CASES = [
    ("causal", "pattern p { causal }", 40, 40, 2, 2, 16, torch.float32),
    ("causal_fp16_d24", "pattern p { causal }", 40, 40, 1, 1, 24, torch.float16),
    ("sliding", "pattern p { causal & window(5) }", 45, 45, 1, 1, 16, torch.float32),
    ("window_dilated", "pattern p { window(3, 2, dilation = 2) }", 40, 40, 1, 1, 16, torch.float32),
    ("strided", "pattern p { causal & strided(3) }", 40, 40, 1, 1, 16, torch.float32),
    ("blocks", "pattern p { blocks(8) | sink(2) }", 40, 40, 1, 1, 16, torch.float16),
    ("summary_landmarks", "pattern p { summary(8, 2) | landmarks(5) }", 40, 40, 1, 1, 16, torch.float32),
    ("streaming", "pattern p { causal & (window(6) | sink(3)) }", 48, 48, 1, 1, 32, torch.float16),
    ("global", "pattern p { global(3) | window(1, 1) }", 40, 40, 1, 1, 16, torch.float32),
    ("random", "pattern p { causal & random(2, 8, seed = 3) }", 40, 40, 1, 1, 16, torch.float32),
    ("where_floor", "pattern p { where((q - k) // 4 == -1 or (k - q) % 5 == 2) }", 40, 40, 1, 1, 16, torch.float32),
    (
        "where_funcs",
        "pattern p { where(abs(q - k) < 3 or min(q, k) * 2 > max(q, k) + Lk // 2 and not (k % 3 == 0)) }",
        40,
        40,
        1,
        1,
        16,
        torch.float32,
    ),
    ("complement", "pattern p { ~causal | sink(1) }", 40, 40, 1, 1, 16, torch.float32),
    ("difference", "pattern p { causal - window(3) }", 40, 40, 1, 1, 16, torch.float32),
    ("per_head", "pattern p { heads 0..1: causal\n window(2, 2) }", 40, 40, 3, 3, 16, torch.float32),
    ("head_predicate", "pattern p { where(k <= q + h) }", 33, 33, 2, 2, 16, torch.float32),
    ("gqa", "pattern p { causal & window(9) }", 40, 40, 4, 2, 16, torch.float16),
    ("end_aligned_short_q", "pattern p { causal }", 24, 56, 2, 1, 16, torch.float32),
    ("end_aligned_long_q", "pattern p { causal & window(10) }", 56, 24, 1, 1, 16, torch.float32),
    # q * 5000011 * k reaches 1.1e10 at L = 48: int32 arithmetic gets 577 of 2304 pairs wrong.
    ("where_int64", "pattern p { where((q * 5000011 * k) % 5 == 0) }", 48, 48, 1, 1, 16, torch.float32),
    # Short-circuit guard: k % q is never evaluated at q = 0 in the language; the kernel guards the divisor.
    ("where_zero_divisor", "pattern p { where(q > 0 and k % q == 0) | sink(1) }", 40, 40, 1, 1, 16, torch.float32),
    ("empty_rows", "pattern p { causal & where(q % 3 != 1 and k > 4) }", 40, 40, 1, 1, 16, torch.float32),
    ("full_with_tails", "pattern p { full }", 37, 45, 1, 1, 16, torch.float32),
    ("grid_neighborhood", "pattern p { layout grid(y = 6, x = 8)\n neighborhood(3) }", 48, 48, 1, 1, 16, torch.float32),
    (
        "grid_dilated_strided",
        "pattern p { layout grid(y = 6, x = 8)\n neighborhood((3, 3), dilation = (1, 2), stride = (2, 1)) }",
        48,
        48,
        1,
        1,
        16,
        torch.float32,
    ),
    (
        "grid_dilated_reordered",
        "pattern p { layout grid(y = 12, x = 12)\n neighborhood(3, dilation = 2) }",
        144,
        144,
        1,
        1,
        16,
        torch.float32,
    ),
    ("dilated_window_reordered", "pattern p { causal & window(8, dilation = 4) }", 64, 64, 1, 1, 16, torch.float16),
    (
        "grid_causal_coords",
        "pattern p { layout grid(t = 3, y = 4, x = 4)\n neighborhood((2, 3, 3), causal = (true, false, false))"
        " | where(q.y == k.x) }",
        48,
        48,
        1,
        1,
        16,
        torch.float16,
    ),
]


def make_plan(pattern, lq, lk, heads, block=(16, 16), order="auto"):
    """The planner's plan when it exists, else the dense reference plan (same contract)."""
    if callable(getattr(analysis, "plan", None)):
        return pattern.plan(lq, lk, heads, block=block, order=order)
    nodes = [pattern.ir.node_for_head(h) for h in range(heads)]
    return plan_from_mask(pattern.mask(lq, lk, heads), block, pattern=pattern.ir, nodes=nodes)


def _poisoned_empty(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def poison() -> None:
    """Make every output buffer the backend allocates start as NaN, so a row a kernel forgets shows up.

    Called by the worker process only; importing this module changes nothing.
    """
    tb._empty = _poisoned_empty


def reference_grads(q, k, v, mask, dout, scale, score=None):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, _ = reference_attention(q64, k64, v64, mask, scale, score=score)
    (out * dout.double()).sum().backward()
    # A score that reads no logit leaves q and k without a gradient: it is zero.
    return tuple(torch.zeros_like(x) if x.grad is None else x.grad for x in (q64, k64, v64))


def check(pattern, plan, lq, lk, heads, kv_heads, d, dtype, batch=2, seed=None, score=None):
    seed = random.randrange(2**31) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, lk, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, lk, d, generator=gen).to(dtype)
    dout = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    scale = 0.7 * d**-0.5
    mask = pattern.mask(lq, lk, heads)
    fwd_tol, grad_tol = TOL[dtype]
    where = f"(seed {seed})"

    out, lse = tb.forward(q, k, v, plan, scale)
    ref_out, ref_lse = reference_attention(q, k, v, mask, scale, score=score)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any(), where
    torch.testing.assert_close(out.double(), ref_out, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"out {where}: {m}")
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()), f"empty rows differ {where}"
    torch.testing.assert_close(lse.double(), ref_lse, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"lse {where}: {m}")

    grads = tb.backward(q, k, v, out, lse, dout, plan, scale)
    want_grads = reference_grads(q, k, v, mask, dout, scale, score)
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert not got.isnan().any(), f"{name} has NaN {where}"
        torch.testing.assert_close(
            got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n} {where}: {m}"
        )


# Larger shapes and GPU-like tiles (32 x 32); run with the ``slow`` marker.
SLOW_CASES = [
    ("slow_grid_2d", "pattern p { layout grid(y = 16, x = 16)\n neighborhood(5) }", 256, 256, 2, 1, 64, torch.float16),
    (
        "slow_grid_3d_reordered",
        "pattern p { layout grid(t = 4, y = 8, x = 8)\n neighborhood((3, 3, 3), dilation = (1, 2, 2)) }",
        256,
        256,
        1,
        1,
        48,
        torch.float32,
    ),
    ("slow_streaming_gqa", "pattern p { causal & (window(40) | sink(4)) }", 200, 200, 8, 2, 40, torch.float16),
    ("slow_chunked_prefill", "pattern p { causal & window(64) }", 96, 300, 2, 2, 32, torch.float32),
    (
        "slow_bigbird",
        "pattern p { blocks(32) | window(16, 16) | global(8) | random(2, 32, seed = 5) }",
        224,
        224,
        2,
        2,
        32,
        torch.float16,
    ),
]


def pattern_case(source, lq, lk, heads, kv_heads, d, dtype, block=(16, 16)):
    pattern = patterndsl.compile(source)
    check(pattern, make_plan(pattern, lq, lk, heads, block), lq, lk, heads, kv_heads, d, dtype)


def case_reordered_plan_gathers_rows_in_kernel():
    """Random token permutations: tiles live in the new order, results come back in the original one."""
    pattern = patterndsl.compile("pattern p { causal & window(4, dilation = 3) | sink(2) }")
    lq = lk = 44
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q_order, kv_order = torch.randperm(lq, generator=gen), torch.randperm(lk, generator=gen)
    plan = plan_from_mask(pattern.mask(lq, lk), (16, 16), q_order, kv_order, pattern.ir, [pattern.ir.default])
    check(pattern, plan, lq, lk, 1, 1, 16, torch.float32)


def case_closed_form_bounds():
    """A RunForm drives the key-tile loops with in-kernel bounds (no lists are read)."""
    pattern = patterndsl.compile("pattern p { causal }")
    lq = lk = 40
    plan = make_plan(pattern, lq, lk, 1, order="identity")
    m = sympy.Symbol("m", integer=True)
    # Query tile m sees key tiles 0..m; tiles strictly below the diagonal are full.
    form = RunForm(m, sympy.Integer(0), m + 1, sympy.Integer(0), m)
    t = plan.groups[0].tiles
    # Emptied row lists prove forward and dQ take their bounds from the form (dK/dV still read the columns).
    rowless = TileList(torch.zeros_like(t.row_ptr), t.cols[:0], t.state[:0], t.col_ptr, t.rows, t.state_t)
    group = plan.groups[0]
    plan.groups = (HeadGroup(group.heads, group.node, rowless, group.runs, lambda: form),)
    check(pattern, plan, lq, lk, 1, 1, 16, torch.float32)
    source = tb.generator.render(tb.generator.make_spec(plan, target="interpret", head_dim=16))
    kernel = source.split("def fwd_g0")[1]
    assert "hi = (1 + m)" in kernel and "ROW_COLS + idx" not in kernel


def case_lse_gradient():
    """dL/dlse folds into delta: compare with autograd through the reference's lse."""
    pattern = patterndsl.compile("pattern p { causal & window(11) | sink(2) }")
    lq = lk = 40
    plan = make_plan(pattern, lq, lk, 2)
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q, k, v, dout = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(4))
    dlse = torch.randn(1, 2, 40, generator=gen)
    out, lse = tb.forward(q, k, v, plan, 0.3)
    grads = tb.backward(q, k, v, out, lse, dout, plan, 0.3, dlse=dlse)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, pattern.mask(lq, lk, 2), 0.3)
    ((ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum()).backward()
    for got, want in zip(grads, (q64.grad, k64.grad, v64.grad), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def case_value_head_size_of_its_own():
    """v with its own head size runs through the public call on the Triton backend (zero-padded there)."""
    pattern = patterndsl.compile("pattern p { causal & window(9) | sink(2) }")
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    q, k = (torch.randn(1, 2, 40, 16, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 40, 24, generator=gen, requires_grad=True)
    out, lse = pattern(q, k, v, return_lse=True, backend="triton")
    assert out.shape == (1, 2, 40, 24)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, pattern.mask(40, 40, 2))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=2e-4)
    dout = torch.randn(out.shape, generator=gen)
    (out * dout).sum().backward()
    (ref_out * dout.double()).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3)


def case_random_patterns():
    """Random patterns (the plan property generator): generated kernels against the reference."""
    from patterndsl.api import Pattern
    from tests.unit.test_plan_property import rand_case

    rng = random.Random(random.randrange(2**31))
    for _ in range(6):
        pir, lq, lk, heads, _ = rand_case(rng)
        kv_heads = rng.choice([h for h in (1, heads) if heads % h == 0])
        pattern = Pattern(pir)
        block = rng.choice([(16, 16), (16, 32), (32, 16)])
        plan = make_plan(pattern, lq, lk, heads, block, order=rng.choice(["identity", "auto"]))
        try:
            check(pattern, plan, lq, lk, heads, kv_heads, rng.choice([16, 24]), torch.float32)
        except Exception as err:
            raise AssertionError(f"{pir}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} block={block}: {err!r}") from None


def check_poisoned(pattern, plan, heads, kv_heads, d, dtype, rng):
    """NaN/Inf in some key and value rows (the keys also steer ``route``): the queries the pattern does not
    connect to a poisoned key get the float64 reference's out, lse and dQ computed with those keys zeroed
    (finite), the keys no such query attends get its dK/dV, and every value, poisoned rows included,
    equals what the CPU executor gives (NaN where it gives NaN)."""
    from patterndsl.runtime import cpu

    lq, lk = plan.q_len, plan.kv_len
    seed = rng.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    batch = rng.choice([1, 2])
    q = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    k, v = (torch.randn(batch, kv_heads, lk, d, generator=gen).to(dtype) for _ in range(2))
    dout = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    bad = torch.zeros(batch, kv_heads, lk, dtype=torch.bool)
    k_bad, v_bad = k.clone(), v.clone()
    for _ in range(rng.randint(1, 3)):
        b, kh, j, c = rng.randrange(batch), rng.randrange(kv_heads), rng.randrange(lk), rng.randrange(d)
        for t in rng.choice([(k_bad,), (v_bad,), (k_bad, v_bad)]):
            t[b, kh, j, c] = rng.choice([float("nan"), float("inf"), float("-inf")])
        bad[b, kh, j] = True
    where = f"(seed {seed}, batch {batch}, poisoned keys {bad.nonzero().tolist()})"
    if pattern.is_dynamic:
        mask = semantics.mask(pattern.ir, lq, lk, heads, q=q, k=k_bad)
    else:
        mask = pattern.mask(lq, lk, heads)[None].expand(batch, heads, lq, lk)
    group = heads // kv_heads
    poisoned = (mask & bad.repeat_interleave(group, dim=1)[:, :, None, :]).any(-1)
    clean_keys = (~(mask & poisoned[..., None]).any(2)).view(batch, kv_heads, group, lk).all(2)
    ok = ~poisoned
    scale = 0.7 * d**-0.5
    fwd_tol, grad_tol = TOL[dtype]

    out, lse = tb.forward(q, k_bad, v_bad, plan, scale)
    # A loss such as (out ** 2).sum() gives the poisoned rows a NaN output gradient.
    dout_bad = dout.masked_fill(poisoned[..., None], float("nan")) if rng.random() < 0.5 else dout
    dlse = torch.randn(batch, heads, lq, generator=gen) if rng.random() < 0.5 else None
    grads = tb.backward(q, k_bad, v_bad, out, lse, dout_bad, plan, scale, dlse=dlse)
    k64, v64 = (x.double().masked_fill(bad[..., None], 0.0).requires_grad_() for x in (k, v))
    q64 = q.double().requires_grad_()
    ref_out, ref_lse = reference_attention(q64, k64, v64, mask, scale)
    loss = (ref_out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (ref_lse.masked_fill(~torch.isfinite(ref_lse), 0.0) * dlse.double()).sum()
    loss.backward()
    for name, got, want, sel, tol in zip(
        ("out", "lse", "dq", "dk", "dv"),
        (out, lse, *grads),
        (ref_out.detach(), ref_lse.detach(), q64.grad, k64.grad, v64.grad),
        (ok, ok, ok, clean_keys, clean_keys),
        (fwd_tol, fwd_tol, grad_tol, grad_tol, grad_tol),
        strict=True,
    ):
        # lse is -inf on a row with no allowed key, which no poisoned key changes.
        finite = ~torch.isnan(got[sel]) if name == "lse" else torch.isfinite(got[sel])
        assert bool(finite.all()), f"{name} not finite where it must be {where}"
        torch.testing.assert_close(
            got.double()[sel], want[sel], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n} {where}: {m}"
        )
    cpu_out, cpu_lse = cpu.forward(q, k_bad, v_bad, plan, scale)
    cpu_grads = cpu.backward(q, k_bad, v_bad, cpu_out, cpu_lse, dout_bad, plan, scale, dlse=dlse)
    for name, got, want, tol in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (cpu_out, cpu_lse, *cpu_grads),
        (fwd_tol, fwd_tol, grad_tol, grad_tol, grad_tol), strict=True,
    ):  # fmt: skip
        # Where a weight reads an infinite value the CPU's gathered route blocks give the IEEE sum (inf) and
        # its selecting kernels NaN; both are "not finite", and nothing else is.
        fin = torch.isfinite(got)
        differ = fin != torch.isfinite(want)
        assert not bool(differ.any()), f"{name}: finite unlike the CPU path at {differ.nonzero().tolist()[:4]} {where}"
        torch.testing.assert_close(
            got.double()[fin], want.double()[fin], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n} vs cpu {where}: {m}"
        )


def _poisoned_cases(count: int, seed: int | None = None) -> None:
    """``count`` random poisoned cases from ``random.Random(seed)`` (a fresh seed when None); a failure names
    the seed and the case, and ``_poisoned_cases(i + 1, seed)`` replays it."""
    from patterndsl.api import Pattern
    from tests.unit.test_plan_property import _route, rand_case

    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    for i in range(count):
        pir, lq, lk, heads, _ = rand_case(rng)
        if i % 3 == 2:
            node = rng.choice([ir.union, ir.inter])(pir.default, _route(rng, pir.layout))
            pir = ir.PatternIR("r", (), pir.layout, pir.heads, node)
        if i % 4 == 1 and pir.layout is None:
            lk = lq + rng.randint(1, 9)  # Lq != Lk
        heads = rng.choice([heads, 2 * heads, 4]) if not pir.heads else heads
        kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
        pattern = Pattern(pir)
        block = rng.choice([(16, 16), (16, 32), (32, 16)])
        order = "identity" if pattern.is_dynamic else rng.choice(["identity", "auto"])
        dtype = rng.choice([torch.float32, torch.float16])
        plan = make_plan(pattern, lq, lk, heads, block, order=order)
        try:
            check_poisoned(pattern, plan, heads, kv_heads, rng.choice([16, 24]), dtype, rng)
        except Exception as err:
            where = f"{pir}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} block={block} order={plan.order} {dtype}"
            replay = f"case {i} of _poisoned_cases(count, seed={seed}); replay with _poisoned_cases({i + 1}, {seed})"
            raise AssertionError(f"{replay}\n{where}: {err!r}") from None


def case_masked_non_finite_keys_never_leak():
    """Random patterns (static, reordered and route; GQA; Lq != Lk) with NaN/Inf in masked keys and values."""
    _poisoned_cases(6, seed=6)


def case_infinite_key_component_gets_no_weight():
    """A key with a -inf component (every score it gets is -inf) under a static and a route pattern: the Triton
    launcher's exact rows equal the float64 reference with that key blocked and the CPU executor, finite
    everywhere (its backward used to score the cleaned key, a P the forward never had)."""
    from patterndsl.runtime import cpu
    from tests.unit.test_infinite_key_scores import CAUSAL, ROUTE, L, _inputs, _reference

    for src in (CAUSAL, ROUTE):
        pattern = patterndsl.compile(src)
        plan = make_plan(pattern, L, L, 2, (16, 16), order="identity")
        q, k, kb, v, w = (t.float() for t in _inputs())
        ref_out, _, ref_grads = _reference(pattern, *(t.double() for t in (q, k, kb, v, w)))
        for backend in (tb, cpu):
            out, lse = backend.forward(q, kb, v, plan, 0.5)
            grads = backend.backward(q, kb, v, out, lse, w, plan, 0.5)
            for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), strict=True):
                assert bool(torch.isfinite(got).all()), f"{src} {backend.__name__} {name} not finite"
                torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def case_slow_masked_non_finite_keys_never_leak_many():
    # Fixed seeds keep CI deterministic. _poisoned_cases(39, 1933961413) used to fail (a route block chosen
    # for a +inf score was dropped by the CPU's merge): tests/unit/test_infinite_route_score.py holds it, and
    # case_slow_route_plus_inf_score_rows_match_cpu checks the Triton launcher against the CPU on it.
    _poisoned_cases(40, seed=40)


def case_slow_route_plus_inf_score_rows_match_cpu():
    """The replay _poisoned_cases(39, 1933961413) reduced: rows whose route chose a block for a +inf score are
    not finite on the Triton launcher's path and on the CPU's (whose merge dropped the block), forward and
    backward, and every finite value agrees."""
    from patterndsl.runtime import cpu
    from tests.unit.test_infinite_route_score import SOURCE, L, inputs

    pattern = patterndsl.compile(SOURCE)
    plan = make_plan(pattern, L, L, 2, (16, 32), order="identity")
    q, k, v = inputs()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    got = tb.forward(q, k, v, plan, 0.5)
    got = (*got, *tb.backward(q, k, v, *got, dout, plan, 0.5))
    want = cpu.forward(q, k, v, plan, 0.5)
    want = (*want, *cpu.backward(q, k, v, *want, dout, plan, 0.5))
    assert not bool(torch.isfinite(got[1][0, 0]).any()), got[1][0, 0]
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        fin = torch.isfinite(a)
        assert torch.equal(fin, torch.isfinite(b)), f"{name}: finite unlike the CPU path"
        torch.testing.assert_close(a[fin], b[fin], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def case_zero_batch():
    """A zero batch gives empty outputs and gradients, static and route, through the launcher and the op
    (issue 11, cause 3: the launcher's run-time route lists failed to reshape)."""
    for source in ("pattern p { causal }", "pattern p { causal & (blocks(4) | route(1, block = 4, qblock = 1)) }"):
        pattern = patterndsl.compile(source)
        plan = make_plan(pattern, 8, 8, 2, order="identity")
        q = torch.randn(0, 2, 8, 16)
        out, lse = tb.forward(q, q, q, plan, 0.3)
        assert out.shape == q.shape and lse.shape == (0, 2, 8)
        assert [g.shape for g in tb.backward(q, q, q, out, lse, out, plan, 0.3)] == [q.shape] * 3
        x = q.clone().requires_grad_()
        pattern(x, x, x, backend="triton").sum().backward()
        assert x.grad.shape == q.shape


def case_wrong_shapes_raise_pattern_error():
    pattern = patterndsl.compile("pattern p { causal }")
    plan = make_plan(pattern, 32, 32, 2)
    q = torch.randn(1, 2, 32, 16)
    for kv, message in ((torch.randn(1, 3, 32, 16), "divide"), (torch.randn(1, 2, 30, 16), "plan is for")):
        try:
            tb.forward(q, kv, kv, plan, 0.25)
        except patterndsl.PatternError as err:
            assert message in str(err), err
        else:
            raise AssertionError(f"no PatternError for k/v {tuple(kv.shape)}")


# Score modifiers: (name, source, torch text of the score for tests/score_exprs.python_score, layout, sizes...).
SCORE_CASES = [
    (
        "score_softcap_window",
        "pattern p(cap = 2.0) { causal & (window(20) | sink(2))\n score cap * tanh(s / cap) }",
        "(2.0 * torch.tanh(s / 2.0))",
        None,
        70,
        70,
        4,
        2,
        16,
        torch.float32,
    ),
    (
        "score_alibi_fp16",
        "pattern p(n = 4) { causal\n score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k) }",
        "s - torch.pow(F(2.0), F(-8.0) * (h + 1) / 4) * (q - k)",
        None,
        40,
        72,
        4,
        4,
        32,
        torch.float16,
    ),
    (
        "score_grid_select",
        "pattern p { layout grid(y = 8, x = 8)\n neighborhood(5)\n"
        " score select(s > 0.0, s, 0.25 * s) + 0.1 * (q.x - k.x) - 0.01 * (Lq // 3) }",
        "torch.where(s > 0.0, s, 0.25 * s) + 0.1 * (C('q', 'x') - C('k', 'x')) - 0.01 * (64 // 3)",
        (("y", 8), ("x", 8)),
        64,
        64,
        2,
        1,
        16,
        torch.float32,
    ),
]


def score_case(source, py, layout, lq, lk, heads, kv_heads, d, dtype, block=(16, 16)):
    from tests.score_exprs import python_score

    pattern = patterndsl.compile(source)
    plan = make_plan(pattern, lq, lk, heads, block)
    check(pattern, plan, lq, lk, heads, kv_heads, d, dtype, score=python_score(py, layout))


def case_score_random():
    """Random score expressions (tests/score_exprs.py) on random patterns, float32."""
    from tests.score_exprs import float_expr, python_score
    from tests.unit.test_plan_property import rand_case

    rng = random.Random(random.randrange(2**31))
    for _ in range(3):
        pir, lq, lk, heads, _ = rand_case(rng)
        axes = () if pir.layout is None else pir.layout.names
        dsl, py = float_expr(rng, rng.randint(1, 3), axes)
        layout = "" if pir.layout is None else f"layout grid({', '.join(f'{n} = {e}' for n, e in pir.layout.axes)})"
        score = patterndsl.compile(f"pattern t {{ {layout}\n full\n score {dsl} }}").ir.score
        pattern = patterndsl.Pattern(dataclasses.replace(pir, score=score))
        plan = make_plan(pattern, lq, lk, heads, (16, 16))
        layout_axes = None if pir.layout is None else pir.layout.axes
        check(pattern, plan, lq, lk, heads, 1, 8, torch.float32, score=python_score(py, layout_axes))


CHECKS = {name: functools.partial(pattern_case, *spec) for name, *spec in CASES}
CHECKS.update({name: functools.partial(score_case, *spec) for name, *spec in SCORE_CASES})
CHECKS.update({name: functools.partial(pattern_case, *spec, block=(32, 32)) for name, *spec in SLOW_CASES})
CHECKS.update({name[len("case_") :]: fn for name, fn in list(globals().items()) if name.startswith("case_")})

# Patterns with run-time inputs (tests/interpreter/input_cases.py).
from tests.interpreter.input_cases import INPUT_CHECKS  # noqa: E402

CHECKS.update(INPUT_CHECKS)

# Scores that read learned tables (tests/interpreter/score_table_cases.py).
from tests.interpreter.score_table_cases import SCORE_TABLE_CHECKS  # noqa: E402

CHECKS.update(SCORE_TABLE_CHECKS)

# Plans that run as parts with their own orders (tests/interpreter/part_cases.py).
from tests.interpreter.part_cases import PART_CHECKS  # noqa: E402

CHECKS.update(PART_CHECKS)

# Decoding route patterns through a PagedKVCache (tests/interpreter/route_decode_cases.py).
from tests.interpreter.route_decode_cases import ROUTE_DECODE_CHECKS  # noqa: E402

CHECKS.update(ROUTE_DECODE_CHECKS)
