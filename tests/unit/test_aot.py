"""Ahead-of-time builds of the generated kernels for sm_80 and sm_90 on this CPU machine.

Every kernel must compile with zero register spills, fit the target's shared
memory, and use tensor cores: ``HMMA`` on sm_80 and warpgroup MMA (``wgmma``
in PTX, ``HGMMA`` in SASS) on sm_90. The full sweep over the interpreter
suite's patterns and the dtype/head-dim matrix is ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl.codegen import inspect as aot
from patterndsl.codegen import spec_for
from tests.interpreter.cases import CASES

pytestmark = pytest.mark.aot

# Largest dynamic shared memory per block (bytes).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aot-kernel-cache"))


@pytest.fixture(scope="module", autouse=True)
def _compiled_mode(compiled_triton):
    """Every test here builds ahead of time."""


def build(source, q_len, kv_len=None, heads=2, target="sm_90", **options):
    spec = spec_for(patterndsl.compile(source), q_len, kv_len, heads, target=target, **options)
    return aot.compile_spec(spec, target)


def assert_sound(kernels, target):
    for k in kernels:
        r = k.resources
        assert r["spills"] == 0, f"{k.name} on {target} spills {r['spills']} bytes: {r}"
        assert max(k.shared, r["shared"]) <= SHARED_LIMIT[target], f"{k.name} shared memory {k.shared}"
        if k.name == "bwd_preprocess":
            continue
        assert r["mma"] > 0, f"{k.name} on {target} has no MMA instruction"
        if target == "sm_90":
            assert r["wgmma"] > 0 and "wgmma" in k.asm["ptx"], f"{k.name} on sm_90 does not use wgmma"
        else:
            assert r["wgmma"] == 0 and "wgmma" not in k.asm["ptx"]


def test_sm90_forward_uses_wgmma_without_spills():
    kernels = build("pattern p { causal & window(100) | sink(4) }", 1024, head_dim=64, dtype=torch.float16)
    assert [k.name for k in kernels] == ["fwd_g0"]
    assert_sound(kernels, "sm_90")
    for stage in ("ttir", "ttgir", "llir", "ptx"):
        assert isinstance(kernels[0].asm[stage], str) and kernels[0].asm[stage]
    assert ".target sm_90a" in kernels[0].asm["ptx"]
    table = aot.render_resources(kernels)
    assert "fwd_g0" in table and "wgmma" in table
    assert "// ===== fwd_g0 (sm_90" in aot.render_ptx(kernels)


def test_sm80_forward_bf16_uses_mma_without_spills():
    kernels = build("pattern p { layout grid(y = 32, x = 32)\n neighborhood(7) }", 1024, dtype=torch.bfloat16,
                    head_dim=96, target="sm_80")  # fmt: skip
    assert_sound(kernels, "sm_80")
    assert ".target sm_80" in kernels[0].asm["ptx"]


def test_bad_target_is_a_pattern_error():
    with pytest.raises(patterndsl.PatternError, match="sm_80"):
        aot.compile_aot(None, {}, target="gfx942")


#: Each suite pattern on one target, alternating (both targets build every template in the matrices
#: below; building every pattern on both doubled the whole suite's longest test for no new kernel text).
SUITE_BUILDS = [(case, ("sm_80", "sm_90")[i % 2]) for i, case in enumerate(CASES)]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "target"), SUITE_BUILDS, ids=[f"{c[0]}-{t}" for c, t in SUITE_BUILDS])
def test_every_suite_pattern_builds(case, target):
    """The interpreter suite's patterns at their own lengths, with GPU tiles (64 x 64) and head dim 64."""
    _, source, lq, lk, heads, kv_heads, _, _ = case
    for kind in ("forward", "backward"):
        kernels = build(source, lq, lk, heads, target, kind=kind, kv_heads=kv_heads, head_dim=64,
                        dtype=torch.float16)  # fmt: skip
        assert_sound(kernels, target)


DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
MATRIX = [
    (dtype, d, kind, target)
    for target in ("sm_80", "sm_90")
    for kind in ("forward", "backward")
    for dtype in DTYPES
    for d in (16, 24, 64, 96, 128, 256)
]
# float32 at head dim 256 backward cannot hold 64-row tiles (wgmma's minimum) without spilling or passing
# shared memory; launch_tiles gives it 32 x 16 tiles, which run on mma.sync (HMMA) on sm_90 too.
NO_WGMMA = {(torch.float32, 256, "backward")}


def _matrix_build(entry):
    dtype, d, kind, target = entry
    kernels = build("pattern p { causal & window(200) }", 2048, heads=4, target=target, kind=kind, head_dim=d,
                    dtype=dtype, kv_heads=2)  # fmt: skip
    return [(k.name, k.shared, k.resources, "wgmma" in k.asm["ptx"], k.num_warps, k.num_stages) for k in kernels]


@pytest.fixture(scope="module")
def matrix_results():
    """Every matrix entry built once, two at a time in fresh processes (Triton's on-disk cache is shared)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fresh interpreter imports Triton in compiled mode, whatever this process did.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(MATRIX, pool.map(_matrix_build, MATRIX), strict=True))


class _Built:
    def __init__(self, name, shared, resources, ptx_wgmma, num_warps, num_stages):
        self.name, self.shared, self.resources = name, shared, resources
        self.asm = {"ptx": "wgmma" if ptx_wgmma else ""}
        self.num_warps, self.num_stages = num_warps, num_stages


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "d", "kind", "target"), MATRIX)
def test_dtype_and_head_dim_matrix_builds(matrix_results, dtype, d, kind, target):
    """Every dtype x head dim x pass x target: zero spills, shared memory within the limit, tensor cores."""
    kernels = [_Built(*row) for row in matrix_results[dtype, d, kind, target]]
    assert len(kernels) == (1 if kind == "forward" else 3)
    if (dtype, d, kind) in NO_WGMMA and target == "sm_90":
        for k in kernels[1:]:
            assert k.resources["spills"] == 0 and k.resources["mma"] > 0 and k.resources["wgmma"] == 0
            assert max(k.shared, k.resources["shared"]) <= SHARED_LIMIT[target]
        return
    assert_sound(kernels, target)


@pytest.mark.parametrize(
    ("dtype", "d", "target"),
    [(torch.float16, 256, "sm_90"), (torch.float32, 64, "sm_80")],
    ids=["fp16-256-sm90", "fp32-64-sm80"],
)
def test_backward_that_used_to_spill_builds_clean(dtype, d, target):
    """The two backward builds that spilled with 64 x 64 tiles, with the tiles launch_tiles picks now."""
    kernels = build("pattern p { causal }", 1024, kind="backward", head_dim=d, dtype=dtype, target=target)
    assert_sound(kernels, target)


MOBA = (
    "pattern moba { causal & (blocks(512) | route(topk = 2, block = 512, qblock = 1, among = causal - blocks(512))) }"
)
ROUTE_RANDOM = "pattern p { causal & (random(1, 512, 3) | route(topk = 2, block = 512, qblock = 1, among = causal)) }"


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_route_pattern_builds_without_spills(kind, target):
    """route(...) runs the same kernels on run-time lists: the launch table's tiles, no spills, wgmma on sm_90."""
    kernels = build(MOBA, 4096, heads=8, target=target, kind=kind, kv_heads=2, head_dim=64, dtype=torch.float16)
    assert [k.name for k in kernels] == (
        ["fwd_g0"] if kind == "forward" else ["bwd_preprocess", "bwd_dq_g0", "bwd_dkdv_g0"]
    )
    assert_sound(kernels, target)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize(("source", "dtype", "d"), [(MOBA, torch.bfloat16, 128), (MOBA, torch.float32, 64),
                                                    (ROUTE_RANDOM, torch.float16, 64)], ids=["moba-bf16-128",
                                                    "moba-fp32-64", "random-fp16-64"])  # fmt: skip
def test_route_pattern_matrix_builds(source, dtype, d, kind, target):
    kernels = build(source, 4096, heads=8, target=target, kind=kind, kv_heads=2, head_dim=d, dtype=dtype)
    assert_sound(kernels, target)


PACKED = (
    "pattern packed(w = 1024) {\n input doc: int[batch, token]\n input tag: int[batch, token]\n"
    " within(doc, causal & (window(w) | sink(4))) | where(tag[q] == 1 and tag[k] == 1) }"
)
TABLES = (
    "pattern t {\n input lag: int[batch, head]\n input tab: int[16]\n input big: int[batch, token]\n"
    " input doc: int[token]\n causal & where(k >= q - lag[h] * 64 or k % 16 == tab[q % 19])"
    " | where((q * 100003 * big[q]) % 7 == 3) | within(doc, where(k >= Lk - 8)) }"
)


@pytest.mark.parametrize(
    ("kind", "target"), [pytest.param("forward", "sm_90", marks=pytest.mark.slow), ("backward", "sm_80")]
)
def test_input_pattern_builds_without_spills(kind, target):
    """Run-time inputs: the element rule loads segment starts and tags from RT; no spills, tensor cores."""
    kernels = build(PACKED, 4096, heads=8, target=target, kind=kind, kv_heads=2, head_dim=64, dtype=torch.float16)
    assert_sound(kernels, target)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize(("source", "dtype", "d"), [(PACKED, torch.bfloat16, 128), (PACKED, torch.float32, 64),
                                                    (TABLES, torch.float16, 64)], ids=["packed-bf16-128",
                                                    "packed-fp32-64", "tables-fp16-64"])  # fmt: skip
def test_input_pattern_matrix_builds(source, dtype, d, kind, target):
    kernels = build(source, 4096, heads=8, target=target, kind=kind, kv_heads=2, head_dim=d, dtype=dtype)
    assert_sound(kernels, target)


def test_show_ptx_and_sass_cover_input_patterns(capsys):
    from patterndsl import cli

    packed = str(Path(__file__).resolve().parents[2] / "examples" / "packed_documents.pdsl")
    assert cli.main(["show", packed, "--stage", "triton", "--seq", "1024"]) == 0
    assert "def _allowed_g0_w0(q, k, h, n):" in capsys.readouterr().out
    assert cli.main(["show", packed, "--stage", "sass", "--seq", "1024", "--target", "sm_80"]) == 0
    out = capsys.readouterr().out
    assert "fwd_g0" in out.split("\n\n")[0] and "HMMA" in out


def test_show_ptx_and_sass_cover_route_patterns(capsys):
    from patterndsl import cli

    moba = str(Path(__file__).resolve().parents[2] / "examples" / "moba.pdsl")
    assert cli.main(["show", moba, "--stage", "ptx", "--seq", "1024"]) == 0
    out = capsys.readouterr().out
    assert "// ===== fwd_g0 (sm_90" in out and "wgmma" in out
    assert cli.main(["show", moba, "--stage", "sass", "--seq", "1024", "--target", "sm_80", "--kind", "backward"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0]
    for name in ("bwd_preprocess", "bwd_dq_g0", "bwd_dkdv_g0"):
        assert name in table


def test_gpu_launch_replans_with_the_chosen_tiles():
    """The Triton launcher runs a plan with launch_tiles' tiles on GPU targets and the given plan elsewhere."""
    from patterndsl.codegen import launch_tiles
    from patterndsl.runtime import triton_backend

    pattern = patterndsl.compile("pattern p { causal & window(30) }")
    plan = pattern.plan(300, 300, 2, block=(64, 64))
    assert triton_backend._tiled(plan, launch_tiles(64, "interpret", "backward", "float32")) is plan
    tiles = launch_tiles(256, "sm_90", "backward", "float16")
    assert tiles != (64, 64)
    tiled = triton_backend._tiled(plan, tiles)
    assert (tiled.block_m, tiled.block_n) == tiles and tiled.pattern == plan.pattern
    assert triton_backend._tiled(plan, tiles) is tiled  # re-planned once
    assert triton_backend._tiled(plan, (64, 64)) is plan


# Score modifiers run on every visited tile (full ones too), their derivative in the backward.
SOFTCAP = "pattern gemma2_local(w = 1024, cap = 50.0) { causal & window(w)\n score cap * tanh(s / cap) }"
ALIBI = "pattern alibi(n = 8) { causal\n score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k) }"
# Learned tables: read from RT as float32 bits; the dQ kernel adds their gradients with atomics.
REL_TABLE = "pattern rel(w = 1024) { input rel: float[head, 2049]\n causal & window(w)\n score s + rel[h, k - q + w] }"
SWIN_SOFTCAP = (
    "pattern swin(win = 8, cap = 30.0) {\n layout grid(y = 64, x = 64)\n input rel: float[head, 15, 15]\n"
    " where(q.y // win == k.y // win and q.x // win == k.x // win)\n"
    " score cap * tanh((s + rel[h, q.y - k.y + win - 1, q.x - k.x + win - 1]) / cap) }"
)


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_softcap_builds_without_spills_on_sm80(kind):
    """The tightest build of the matrix below (168 registers at fp16, head dim 64, forward)."""
    kernels = build(SOFTCAP, 4096, heads=8, target="sm_80", kind=kind, kv_heads=2, head_dim=64, dtype=torch.float16)
    assert_sound(kernels, "sm_80")


SCORE_MATRIX = [
    (source, dtype, d, kind, target)
    for target in ("sm_80", "sm_90")
    for kind in ("forward", "backward")
    for source, dtype, d in [
        (SOFTCAP, torch.float16, 64),
        (SOFTCAP, torch.float16, 256),
        (SOFTCAP, torch.float32, 64),
        (SOFTCAP, torch.float32, 256),
        (SOFTCAP, torch.bfloat16, 128),
        (ALIBI, torch.bfloat16, 64),
        (REL_TABLE, torch.float16, 64),
        (SWIN_SOFTCAP, torch.bfloat16, 128),
    ]
]


def _score_build(entry):
    source, dtype, d, kind, target = entry
    kernels = build(source, 4096, heads=8, target=target, kind=kind, kv_heads=2, head_dim=d, dtype=dtype)
    return [(k.name, k.shared, k.resources, "wgmma" in k.asm["ptx"], k.num_warps, k.num_stages) for k in kernels]


@pytest.fixture(scope="module")
def score_matrix_results():
    """Every score matrix entry built once, two at a time in fresh processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(SCORE_MATRIX, pool.map(_score_build, SCORE_MATRIX), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("entry", SCORE_MATRIX, ids=lambda e: f"{e[0][8:14]}-{e[1]}-{e[2]}-{e[3]}-{e[4]}")
def test_score_matrix_builds(score_matrix_results, entry):
    """Softcap (a derivative in the backward) and ALiBi (additive): zero spills, shared memory, tensor cores."""
    target = entry[4]
    kernels = [_Built(*k) for k in score_matrix_results[entry]]
    if entry[1] == torch.float32 and entry[2] == 256 and entry[3] == "backward":
        for k in kernels:
            assert k.resources["spills"] == 0 and k.shared <= SHARED_LIMIT[target]
        return
    assert_sound(kernels, target)
