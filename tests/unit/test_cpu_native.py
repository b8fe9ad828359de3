"""CPU executor: the native C++ kernel (runtime/cpu/native): numerics, dispatch, fallback and build cache.

Float32 outputs, log-sum-exp and gradients are checked against the float64 reference on random
patterns (bands, dilations, blocks, globals, random blocks, reordered plans, empty rows, several
tile shapes, grouped-query heads), with an error no worse than the torch fp32 path's on the same
inputs. The dispatch is explicit (which calls run natively, counted by a spy), a missing compiler
or ``PATTERNDSL_NATIVE=0`` falls back to the torch path with a logged reason, and a built library
is found again on disk without compiling.
"""

from __future__ import annotations

import logging
import random
import sys

import pytest
import torch

import patterndsl
from patterndsl import analysis, semantics
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import native, views
from patterndsl.runtime.cpu.native import build
from patterndsl.runtime.cpu.views import from_tiles, inverses, to_tiles
from tests.reference import reference_attention
from tests.spies import count_calls
from tests.unit.test_plan_property import rand_case

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {build.last_reason[0]}")


def _compile(body: str):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


@pytest.fixture
def runs(monkeypatch):
    """Counts the native forward and backward calls."""
    return count_calls(monkeypatch, native)


def _inputs(b, h, hkv, lq, lk, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k, v = (torch.randn(b, hkv, lk, d, generator=g) for _ in range(2))
    return q, k, v, torch.randn(b, h, lq, d, generator=g)


def _run(pattern, q, k, v, dout, block, **options):
    """Output, lse and gradients of ``pattern`` through the executor with ``options``."""
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    with cpu.options(dense=False, **options):
        out, lse = pattern(qg, kg, vg, return_lse=True) if block is None else _call(pattern, qg, kg, vg, block)
        out.backward(dout)
    return out.detach(), lse.detach(), qg.grad, kg.grad, vg.grad


def _call(pattern, q, k, v, block):
    plan = pattern.plan(q.shape[2], k.shape[2], q.shape[1], block=block)
    out, lse = cpu.forward(q.detach(), k.detach(), v.detach(), plan, q.shape[-1] ** -0.5)
    return _Attached.apply(q, k, v, out, lse, plan)


class _Attached(torch.autograd.Function):
    """The executor's forward and backward on one plan (a block shape ``Pattern.__call__`` does not take)."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, plan):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan = plan
        return out.clone(), lse.clone()

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cpu.backward(q, k, v, out, lse, dout, ctx.plan, q.shape[-1] ** -0.5)
        return dq, dk, dv, None, None, None


def _reference(pattern, q, k, v, dout):
    qg, kg, vg = (x.double().requires_grad_() for x in (q, k, v))
    mask = pattern.mask(q.shape[2], k.shape[2], q.shape[1])
    out, lse = reference_attention(qg, kg, vg, mask)
    out.backward(dout.double())
    return out.detach(), lse.detach(), qg.grad, kg.grad, vg.grad


CASES = [
    # (body, b, h, hkv, lq, lk, d, block)
    ("causal & window(37)", 1, 2, 2, 200, 200, 64, None),
    ("causal & window(20, 0, 3)", 2, 2, 1, 150, 150, 32, None),
    ("window(9, 9) | global(5) | random(2, 16, 1)", 1, 2, 2, 140, 140, 16, (32, 16)),
    ("blocks(48) | sink(3)", 1, 1, 1, 96, 96, 64, (16, 32)),
    ("causal & where(q >= 40)", 1, 2, 1, 90, 90, 48, (32, 32)),
    ("causal", 1, 3, 3, 70, 100, 64, (64, 64)),
    ("strided(5) & causal", 1, 2, 2, 128, 128, 32, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference_like_the_torch_path(case, runs):
    body, b, h, hkv, lq, lk, d, block = case
    pattern = _compile(body)
    q, k, v, dout = _inputs(b, h, hkv, lq, lk, d, seed=len(body))
    ref = _reference(pattern, q, k, v, dout)
    ours = _run(pattern, q, k, v, dout, block, native=True)
    assert runs == {"forward": 1, "backward": 1}
    torch_path = _run(pattern, q, k, v, dout, block, native=False)
    for name, x, y, z in zip(("out", "lse", "dq", "dk", "dv"), ours, torch_path, ref, strict=True):
        assert x.dtype == torch.float32
        finite = torch.isfinite(z)
        # Rows with no allowed key: zeros and lse = -inf, exactly.
        assert torch.equal(torch.isfinite(x), finite), name
        assert torch.equal(x[~finite], z[~finite].float()), name
        err, err_torch = (float((w.double()[finite] - z[finite]).abs().max()) for w in (x, y))
        assert err <= 2 * err_torch + 2e-6, (name, err, err_torch)


@pytest.mark.slow
@pytest.mark.parametrize(
    "body,inputs",
    [
        ("causal & (window(15) | route(topk = 1, block = 16, among = causal - window(15)))", False),
        ("input doc: int[batch, token]\nwithin(doc, causal & (window(8) | sink(4)))", True),
    ],
    ids=["route", "within"],
)
def test_route_and_input_units_match_the_torch_path(body, inputs, runs):
    pattern = _compile(body)
    q, k, v, dout = _inputs(2, 2, 1, 64, 64, 16, seed=8)
    data = {"doc": torch.tensor([[0] * 20 + [1] * 44, [0] * 40 + [1] * 24])} if inputs else {}
    got = []
    for on in (True, False):
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        with cpu.options(native=on):
            out = pattern(qg, kg, vg, **data)
            out.backward(dout)
        got.append((out.detach(), qg.grad, kg.grad, vg.grad))
    assert runs["forward"] >= 1 and runs["backward"] >= 1
    for x, y in zip(*got, strict=True):
        assert float((x - y).abs().max()) < 2e-5


def _max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.detach()).abs().max()) if x.numel() else 0.0


def _random_case(rng: random.Random) -> None:
    """A random pattern of the plan property generator (query tiles of 16 or 32 rows, any key tiles), in
    float32 through the native kernel, against the float64 reference: out, lse and gradients (with one on lse)."""
    pir, lq, lk, heads, block = rand_case(rng)
    block = (rng.choice([16, 32]), block[1])
    plan = analysis.plan(pir, lq, lk, heads, block=block, order=rng.choice(["identity", "auto"]))
    kv_heads = rng.choice([h for h in (1, heads) if heads % h == 0])
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q = torch.randn(rng.choice([1, 2]), heads, lq, 16, generator=gen)
    k, v = (torch.randn(q.shape[0], kv_heads, lk, 16, generator=gen) for _ in range(2))
    dout, dlse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:3], generator=gen)
    where = f"{pir}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} block={block}"
    opts = cpu.CpuOptions(dense=False)
    assert native.supports(plan, q, v, opts)
    out, lse = cpu.forward(q, k, v, plan, 0.25, options=opts)
    use_dlse = rng.random() < 0.5
    grads = cpu.backward(q, k, v, out, lse, dout, plan, 0.25, dlse=dlse if use_dlse else None, options=opts)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference_attention(qr, kr, vr, semantics.mask(pir, lq, lk, heads), 0.25)
    finite = torch.isfinite(ref_lse)
    loss = (ref * dout.double()).sum() + ((ref_lse.masked_fill(~finite, 0.0) * dlse.double()).sum() if use_dlse else 0)
    want = torch.autograd.grad(loss, (qr, kr, vr), allow_unused=True)
    assert torch.equal(torch.isfinite(lse), finite), where
    assert torch.equal(lse[~finite], ref_lse[~finite].float()) and bool((out[~finite] == 0).all()), where
    for name, x, y in (("out", out, ref), ("lse", lse[finite], ref_lse[finite])):
        assert _max_diff(x, y) < 1e-5, f"{name}\n{where}"
    for name, g, w in zip("qkv", grads, want, strict=True):
        w = torch.zeros_like(g, dtype=torch.float64) if w is None else w
        assert _max_diff(g, w) < 5e-5, f"d{name}\n{where}"


@pytest.mark.parametrize("seed", range(2))
def test_random_patterns_match_float64_reference(seed, runs):
    rng = random.Random(9100 + seed)
    for _ in range(5):
        _random_case(rng)
    assert runs["forward"] >= 1 and runs["backward"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_many_random_patterns_match_float64_reference(seed):
    rng = random.Random(9200 + seed)
    for _ in range(16):
        _random_case(rng)


def test_empty_rows_are_zero_with_minus_infinite_lse():
    pattern = _compile("causal & where(q >= 40 and k >= 10)")
    q, k, v, dout = _inputs(1, 1, 1, 64, 64, 32, seed=3)
    out, lse, dq, dk, dv = _run(pattern, q, k, v, dout, (16, 16), native=True)
    assert torch.equal(out[0, 0, :40], torch.zeros(40, 32))
    assert bool((lse[0, 0, :40] == float("-inf")).all()) and bool(torch.isfinite(lse[0, 0, 40:]).all())
    assert torch.equal(dq[0, 0, :40], torch.zeros(40, 32))
    assert torch.equal(dk[0, 0, :10], torch.zeros(10, 32)) and torch.equal(dv[0, 0, :10], torch.zeros(10, 32))


def test_blocked_non_finite_keys_do_not_reach_outputs():
    pattern = _compile("causal & window(7)")
    q, k, v, dout = _inputs(1, 2, 2, 48, 48, 16, seed=4)
    k[0, 0, 30], v[0, 1, 40] = float("nan"), float("inf")
    ours = _run(pattern, q, k, v, dout, (16, 16), native=True)
    # The torch path's selecting rerun is the oracle (a dense reference's 0 * inf on blocked pairs is NaN).
    theirs = _run(pattern, q, k, v, dout, (16, 16), native=False)
    assert not bool(torch.isfinite(ours[0]).all())
    for x, y in zip(ours, theirs, strict=True):
        # Rows that attend the bad keys are not finite, all others are exact.
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
        fine = torch.isfinite(y)
        assert float((x[fine] - y[fine]).abs().max()) < 1e-5


@pytest.mark.parametrize(
    "body,h,hkv,length,direct",
    [
        ("causal & window(37)", 2, 2, 203, True),  # a padded last tile
        ("causal & window(64, 0, 4)", 1, 1, 257, True),  # reordered and padded; one head: query tiles in parts
        ("causal & window(64, 0, 4)", 4, 2, 257, False),  # grouped-query heads: the tiled layout
    ],
)
def test_backward_on_the_call_tensors_matches_float64_reference(monkeypatch, body, h, hkv, length, direct):
    layouts = []
    original = native.backward

    def spy(prog, t, scale):
        layouts.append("out" in t)
        return original(prog, t, scale)

    monkeypatch.setattr(native, "backward", spy)
    pattern = _compile(body)
    if "0, 4" in body:
        plan = pattern.plan(length, length, h)
        assert not torch.equal(plan.q_order, torch.arange(length))
        assert not torch.equal(plan.kv_order, torch.arange(length))
    q, k, v, dout = _inputs(1, h, hkv, length, length, 32, seed=length)
    dlse = torch.randn(1, h, length, generator=torch.Generator().manual_seed(1))

    def grads(dtype, **options):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        if dtype == torch.float64:
            out, lse = reference_attention(*leaves, pattern.mask(length, length, h))
        else:
            with cpu.options(**options):
                out, lse = pattern(*leaves, return_lse=True)
        ((out * dout.to(dtype)).sum() + (lse * dlse.to(dtype))[torch.isfinite(lse)].sum()).backward()
        return [x.grad for x in leaves]

    ref = grads(torch.float64)
    ours = grads(torch.float32, native=True)
    assert layouts == [direct]
    torch_path = grads(torch.float32, native=False)
    for name, x, y, z in zip(("dq", "dk", "dv"), ours, torch_path, ref, strict=True):
        err, err_torch = (float((w.double() - z).abs().max()) for w in (x, y))
        assert err <= 2 * err_torch + 2e-6, (name, err, err_torch)


def test_dispatch_is_explicit():
    q = torch.zeros(1, 2, 64, 64)
    plan = _compile("causal & window(7)").plan(64, 64, 2)
    on = cpu.CpuOptions()
    assert native.supports(plan, q, q, on)
    assert not native.supports(plan, q, q, cpu.CpuOptions(native=False))
    assert not native.supports(plan, q, q, cpu.CpuOptions(kernel="math"))
    assert not native.supports(plan, q.double(), q.double(), on)
    assert not native.supports(plan, q[..., :40], q[..., :40], on)  # head size not a multiple of 16
    assert not native.supports(plan, q, q[..., :32], on)  # values of another head size
    scored = _compile("causal & window(7)\nscore s * 0.5").plan(64, 64, 2)
    assert not native.supports(scored, q, q, on)
    odd = _compile("causal & window(7)").plan(64, 64, 2, block=(24, 16))
    assert not native.supports(odd, q, q, on)


def test_square_causal_runs_natively_and_other_plain_calls_keep_the_fused_kernel(runs):
    pattern = _compile("causal")
    q, k, v, dout = _inputs(1, 6, 2, 100, 100, 16, seed=7)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = pattern(qg, kg, vg, scale=0.3)
    out.backward(dout)
    assert runs == {"forward": 1, "backward": 1}
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, pattern.mask(100, 100, 6), 0.3)[0]
    ref.backward(dout.double())
    for got, want in zip((out, qg.grad, kg.grad, vg.grad), (ref, *(x.grad for x in leaves)), strict=True):
        assert float((got.detach().double() - want.detach()).abs().max()) < 2e-5
    with cpu.options(native_dense=False):
        pattern(q, k, v)
    pattern(q[:, :, :60], k, v)  # Lq != Lk
    _compile("full")(q, k, v)
    assert runs == {"forward": 1, "backward": 1}
    plan = pattern.plan(100, 100, 6)
    assert native.takes_dense(plan, q, v, cpu.CpuOptions())
    assert not native.takes_dense(plan, q, v, cpu.CpuOptions(native_dense=False))


def test_score_modifiers_and_float64_stay_on_the_torch_path(runs):
    q, k, v, dout = _inputs(1, 2, 2, 48, 48, 16, seed=5)
    _run(_compile("causal & window(7)\nscore s * 0.5"), q, k, v, dout, None, native=True)
    _run(_compile("causal & window(7)"), q.double(), k.double(), v.double(), dout.double(), None, native=True)
    assert runs == {"forward": 0, "backward": 0}


def test_fallback_without_compiler(monkeypatch, tmp_path, caplog, runs):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATTERNDSL_CXX", "no-such-compiler-pdsl")
    build.reset()
    try:
        with caplog.at_level(logging.WARNING, logger=build.__name__):
            assert not native.available()
        assert "no C++ compiler" in build.last_reason[0]
        assert "no C++ compiler" in caplog.text and "torch path" in caplog.text
        pattern = _compile("causal & window(9)")
        q, k, v, dout = _inputs(1, 2, 2, 64, 64, 16, seed=6)
        out = _run(pattern, q, k, v, dout, None, native=True)[0]
        ref_out = _reference(pattern, q, k, v, dout)[0]
        assert runs == {"forward": 0, "backward": 0}
        assert float((out.double() - ref_out).abs().max()) < 1e-5
    finally:
        monkeypatch.undo()
        build.reset()
    assert native.available()


def test_fallback_when_disabled(monkeypatch):
    monkeypatch.setenv("PATTERNDSL_NATIVE", "0")
    build.reset()
    try:
        assert not native.available()
        assert "PATTERNDSL_NATIVE=0" in build.last_reason[0]
    finally:
        monkeypatch.undo()
        build.reset()


def test_fallback_when_the_build_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATTERNDSL_CXX", "false")  # exits 1 on every call
    build.reset()
    try:
        assert not native.available()
        assert build.last_reason[0]
        assert not list((tmp_path / "native").glob("*.so"))
    finally:
        monkeypatch.undo()
        build.reset()


def test_built_library_is_loaded_from_the_cache_without_compiling(monkeypatch):
    assert native.available()
    (entry,) = [p for p in build.library_dir().glob("attention-*.so") if build.library()._name == str(p)]

    def refuse(*args):
        raise AssertionError("compiled although the cache holds the library")

    monkeypatch.setattr(build, "_compile", refuse)
    build.reset()
    try:
        assert build.library() is not None and build.library()._name == str(entry)
    finally:
        build.reset()


def test_cache_key_changes_with_source_compiler_and_cpu():
    base = build.cache_key("src", "g++ 12", frozenset({"avx512f"}))
    assert base == build.cache_key("src", "g++ 12", frozenset({"avx512f"}))
    assert len({base, build.cache_key("src2", "g++ 12", frozenset({"avx512f"}))}) == 2
    assert len({base, build.cache_key("src", "g++ 13", frozenset({"avx512f"}))}) == 2
    assert len({base, build.cache_key("src", "g++ 12", frozenset({"avx512f", "amx_tile"}))}) == 2


def test_program_lists_every_non_padding_tile_once():
    plan = _compile("window(9, 9) | global(5) | random(2, 16, 1)").plan(140, 140, 1, block=(32, 16))
    sched = cpu.schedules(plan)[0]
    prog = native.program(sched, plan.n_q_tiles, plan.block)
    tiles = plan.tiles()[0]
    want = sorted((int(m), int(n)) for m, n in torch.nonzero(tiles > 0))
    got = sorted(
        (m, int(prog.ent_k[e])) for m in range(prog.n_q_tiles) for e in range(prog.row_ptr[m], prog.row_ptr[m + 1])
    )
    assert got == want
    partial = {(int(m), int(n)) for m, n in torch.nonzero(tiles == 1)}
    for m in range(prog.n_q_tiles):
        for e in range(int(prog.row_ptr[m]), int(prog.row_ptr[m + 1])):
            assert (int(prog.ent_mask[e]) >= 0) == ((m, int(prog.ent_k[e])) in partial or int(prog.ent_k[e]) == 8)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_larger_random_patterns(seed):
    rng = torch.Generator().manual_seed(seed)
    bodies = [
        "causal & window(255)",
        "causal & window(64, 0, 4)",
        "window(96, 96) | global(64) | random(3, 64, 0)",
        "causal",
        "layout grid(y = 32, x = 32)\nneighborhood(7)",
    ]
    body = bodies[int(torch.randint(len(bodies), (1,), generator=rng))]
    pattern = _compile(body)
    q, k, v, dout = _inputs(1, 4, 2, 1024, 1024, 64, seed=seed)
    ref = _reference(pattern, q, k, v, dout)
    ours = _run(pattern, q, k, v, dout, None, native=True)
    for x, z in zip(ours, ref, strict=True):
        fine = torch.isfinite(z)
        assert float((x.double()[fine] - z[fine]).abs().max()) < 2e-5


@pytest.mark.slow
def test_fresh_build_in_an_empty_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    build.reset()
    try:
        assert native.available()
        assert len(list((tmp_path / "native").glob("attention-*.so"))) == 1
        assert not list((tmp_path / "native").glob("*.tmp"))
    finally:
        monkeypatch.undo()
        build.reset()


def _forward_rows_case(rng: random.Random, rows: int) -> None:
    """A random band (window, after-window, dilation, causal or not, odd lengths) through the native forward
    with register blocks of ``rows`` rows on query tiles of 64 or 128 rows, against the float64 reference."""
    before, after, dilation = rng.randint(0, 70), rng.choice([0, 0, rng.randint(1, 20)]), rng.choice([1, 1, 2, 3])
    body = f"window({before}, {after}, {dilation})" + rng.choice(["", " & causal", " | sink(3)"])
    lq = rng.randint(60, 300)
    lk = lq if "causal" in body else rng.randint(60, 300)
    block = (rng.choice([64, 128]), rng.choice([16, 32, 64]))
    pattern = _compile(body)
    plan = pattern.plan(lq, lk, 2, block=block)
    d = rng.choice([16, 32, 48, 64])  # the forward's O^T update runs blocks of 24/12/8/6 dims, then of 4
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    q, k, v = (
        torch.randn(1, 2, lq, d, generator=gen),
        torch.randn(1, 2, lk, d, generator=gen),
        torch.randn(1, 2, lk, d, generator=gen),
    )
    (sched,) = cpu.schedules(plan)
    prog = native.program(sched, plan.n_q_tiles, plan.block)
    lq_pad, lk_pad = plan.n_q_tiles * block[0], plan.n_kv_tiles * block[1]
    q_inv, k_inv = inverses(plan)  # dilated bands may be planned in another token order
    qp = to_tiles(q, None, plan.q_order, q_inv is None, lq_pad, torch.float32)
    kp, vp = (to_tiles(x, None, plan.kv_order, k_inv is None, lk_pad, torch.float32) for x in (k, v))
    op, lp = torch.empty(1, 2, lq_pad, d), torch.empty(1, 2, lq_pad)
    native.forward(prog, qp, kp, vp, op, lp, 0.3, rows=rows)
    out, lse = from_tiles(op, lq, q_inv), from_tiles(lp, lq, q_inv)
    ref, ref_lse = reference_attention(q, k, v, pattern.mask(lq, lk, 2), 0.3)
    where = f"{body} Lq={lq} Lk={lk} block={block} rows={rows}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), where
    assert bool((out[~finite] == 0).all()), where
    assert _max_diff(out, ref) < 1e-5 and _max_diff(lse[finite], ref_lse[finite]) < 1e-5, where


@pytest.mark.parametrize("rows", [16, 32, 64])
def test_forward_register_blocks_of_every_height_match_float64_on_random_bands(rows):
    # 64-row blocks run a band's edge tiles as pieces over 1, 2, 3 or 4 of their 16-row groups.
    rng = random.Random(9300 + rows)
    for _ in range(6):
        _forward_rows_case(rng, rows)


def test_native_lse_vouches_for_the_output_and_non_finite_values_still_rerun_selecting(monkeypatch):
    forward_module = sys.modules[cpu.forward.__module__]
    checks, nan_checks, isnan = [], [], torch.isnan
    monkeypatch.setattr(forward_module, "finite", lambda *t: checks.append(len(t)) or views.finite(*t))
    monkeypatch.setattr(forward_module.torch, "isnan", lambda x: nan_checks.append(x.shape) or isnan(x))
    pattern = _compile("causal & window(7)")
    plan = pattern.plan(64, 64, 2, block=(32, 16))
    q, k, v, _ = _inputs(1, 2, 2, 64, 64, 16, seed=11)
    cpu.forward(q, k, v, plan, 0.25)
    assert checks == [] and nan_checks == []  # the kernel said finite: no pass over the output, no sum of lse
    # Rows 20..27 of head 1 read value 20 (allowed pairs only: their lse stays finite), head 0's key 40
    # is Inf (rows 40..47), and a NaN value at key 50 of head 0 only meets blocked pairs of rows 32..49.
    v[0, 1, 20, 3], k[0, 0, 40, 0], v[0, 0, 50, 5] = float("nan"), float("inf"), float("nan")
    (sched,) = cpu.schedules(plan)
    op, lp = torch.empty(1, 2, 64, 16), torch.empty(1, 2, 64)
    prog = native.program(sched, plan.n_q_tiles, plan.block)
    assert native.forward(prog, q, k, v, op, lp, 0.25) is False
    bad = ~torch.isfinite(op).all(-1)
    assert torch.equal(torch.isnan(lp), bad) and bool(bad[0, 1, 20:28].all()) and int(bad.sum()) > 8
    ours = cpu.forward(q, k, v, plan, 0.25)
    with cpu.options(native=False):
        theirs = cpu.forward(q, k, v, plan, 0.25)
    for x, y in zip(ours, theirs, strict=True):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y))
        assert float((x[torch.isfinite(y)] - y[torch.isfinite(y)]).abs().max()) < 1e-5
    assert not bool(torch.isfinite(ours[0][0, 1, 20:28, 3]).any()) and bool(torch.isfinite(ours[0][0, 1, 28:]).all())


def test_forward_runs_of_many_query_tiles_per_thread_cover_every_row_once():
    # 12 (batch, head) pairs x 25 query tiles: runs of several consecutive tiles, some across heads.
    pattern = _compile("causal & window(40) | sink(2)")
    q, k, v, _ = _inputs(2, 6, 3, 400, 400, 16, seed=12)
    plan = pattern.plan(400, 400, 6, block=(16, 16))
    out, lse = cpu.forward(q, k, v, plan, 0.25)
    ref, ref_lse = reference_attention(q, k, v, pattern.mask(400, 400, 6), 0.25)
    assert _max_diff(out, ref) < 1e-5 and _max_diff(lse, ref_lse) < 1e-5
