"""Ahead-of-time builds of the generated kernels for sm_80 and sm_90 on this CPU machine.

Every kernel must compile with zero register spills, fit the target's shared
memory, and use tensor cores: ``HMMA`` on sm_80 and warpgroup MMA (``wgmma``
in PTX, ``HGMMA`` in SASS) on sm_90. The full sweep over the interpreter
suite's patterns and the dtype/head-dim matrix is ``slow``.
"""

from __future__ import annotations

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
def _compiled_mode():
    import triton

    if not isinstance(triton.language.zeros, triton.runtime.JITFunction):
        pytest.skip("Triton was imported with TRITON_INTERPRET=1 in this process; AOT builds need compiled mode")


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


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_suite_pattern_builds(case, target):
    """The interpreter suite's patterns at their own lengths, with GPU tiles (64 x 64) and head dim 64."""
    _, source, lq, lk, heads, kv_heads, _, _ = case
    for kind in ("forward", "backward"):
        kernels = build(source, lq, lk, heads, target, kind=kind, kv_heads=kv_heads, head_dim=64,
                        dtype=torch.float16)  # fmt: skip
        assert_sound(kernels, target)


MATRIX = [
    (dtype, d, kind, target)
    for target in ("sm_80", "sm_90")
    for kind in ("forward", "backward")
    for dtype, dims in ((torch.float16, (16, 24, 128)), (torch.bfloat16, (64, 80, 128)), (torch.float32, (32, 64)))
    for d in dims
]
# Known limits (see the strict xfails below): float32 backward at head dim 64 on sm_80 and head dim 256
# backward on sm_90 run out of registers with 64 x 64 tiles.
MATRIX.remove((torch.float32, 64, "backward", "sm_80"))
MATRIX += [(torch.float16, 256, "forward", t) for t in ("sm_80", "sm_90")] + [
    (torch.bfloat16, 256, "backward", "sm_80")
]


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "d", "kind", "target"), MATRIX)
def test_dtype_and_head_dim_matrix_builds(dtype, d, kind, target):
    kernels = build("pattern p { causal & window(200) }", 2048, heads=4, target=target, kind=kind, head_dim=d,
                    dtype=dtype, kv_heads=2)  # fmt: skip
    assert_sound(kernels, target)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known register spills with 64 x 64 tiles")
@pytest.mark.parametrize(("dtype", "d", "target"), [(torch.float16, 256, "sm_90"), (torch.float32, 64, "sm_80")])
def test_known_backward_spills(dtype, d, target):
    kernels = build("pattern p { causal }", 1024, kind="backward", head_dim=d, dtype=dtype, target=target)
    assert_sound(kernels, target)
