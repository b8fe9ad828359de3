"""Ahead-of-time builds of the ragged/paged kernels (:mod:`patterndsl.codegen.ragged`) for sm_80 and sm_90.

Every kernel (the forward over pieces, the log-sum-exp ``combine`` of split decoding blocks, the
backward with atomic dK/dV) must build with zero register spills, within the target's shared
memory, on tensor cores, for decoding blocks (16 rows) and prefill blocks, unpaged and paged (a page
smaller than a key tile: one table entry per key; a page of whole tiles: one per tile), and the forward of
decoding steps of route patterns. One case of each pass runs by default; a covering part of the dtype x head
dim x page x rows x target matrix, and the routed builds, are ``slow``.
"""

from __future__ import annotations

import os

import pytest
import torch

import patterndsl
from patterndsl import analysis
from patterndsl.codegen import inspect as aot
from patterndsl.codegen import ragged
from tests.unit.test_aot import SHARED_LIMIT

pytestmark = pytest.mark.aot

SOURCE = "pattern streaming(w = 256, n = 4) { causal & (window(w) | sink(n)) }"


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aot-kernel-cache"))


@pytest.fixture(scope="module", autouse=True)
def _compiled_mode(compiled_triton):
    """Every test here builds ahead of time."""


def build(kind, dtype, d, page_size, rows, target):
    p = patterndsl.compile(SOURCE)
    groups = analysis.plan(p.ir, 256, 256, 8, block=(64, 64), order="identity").groups
    spec = ragged.make_spec(p.ir, groups, kind, 8, 2, d, dtype, page_size, target, rows)
    return spec, aot.compile_ragged(spec, target)


def check(kind, dtype, d, page_size, rows, target):
    spec, kernels = build(kind, dtype, d, page_size, rows, target)
    assert [k.name for k in kernels] == ragged.kernel_names(spec)
    for k in kernels:
        r = k.resources
        where = f"{k.name} ({kind}, {dtype}, D={d}, page {page_size}, {rows} rows) on {target}"
        assert r["spills"] == 0, f"{where} spills {r['spills']} bytes: {r}"
        assert max(k.shared, r["shared"]) <= SHARED_LIMIT[target], f"{where}: shared memory {k.shared}"
        if k.name != "combine":
            assert r["mma"] > 0, f"{where} has no MMA instruction"


@pytest.mark.parametrize(("kind", "target"), [("forward", "sm_90"), ("backward", "sm_80")])
def test_ragged_kernels_build_without_spills(kind, target):
    check(kind, torch.float16, 128, 16, 16, target)


#: Every (dtype, page) pair for each pass and target, head dims and row blocks alternating through
#: them so each of their values meets every dtype and page kind: 36 builds, not the 144 of the full
#: product, to keep the whole suite in its budget (the full product built with zero spills when the
#: kernels were written; ``PATTERNDSL_AOT_FULL=1`` runs it again).
_CONFIGS = [
    (dtype, (64, 128)[i % 2], page_size, (16, 64)[(i // 2) % 2])
    for i, (dtype, page_size) in enumerate(
        (dtype, page_size) for dtype in (torch.float16, torch.bfloat16, torch.float32) for page_size in (0, 16, 64)
    )
]
if os.environ.get("PATTERNDSL_AOT_FULL") == "1":
    _CONFIGS = [
        (dtype, d, page_size, rows)
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
        for d in (64, 128)
        for page_size in (0, 16, 64)
        for rows in (16, 64)
    ]
MATRIX = [
    (kind, *config, target) for kind in ("forward", "backward") for config in _CONFIGS for target in ("sm_80", "sm_90")
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "dtype", "d", "page_size", "rows", "target"), MATRIX)
def test_ragged_kernel_matrix_builds(kind, dtype, d, page_size, rows, target):
    check(kind, dtype, d, page_size, rows, target)


#: Decoding steps of route patterns (runtime/triton_ragged_route.py): two routes of either polarity and two
#: groups, the element rule reading the chosen blocks from SEL.
ROUTED = (
    "pattern moba { heads 0..3: causal & (window(64) | route(4, block = 64, among = causal - window(64)))\n"
    " causal - route(2, block = 32, score = max, qblock = 4) | sink(4) }"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dtype", "d", "page_size"),
    [(torch.float16, 128, 16), (torch.bfloat16, 64, 64), (torch.float32, 128, 1)],
)
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_routed_decoding_kernels_build_without_spills(dtype, d, page_size, target):
    from patterndsl.runtime import triton_ragged_route

    p = patterndsl.compile(ROUTED)
    groups = triton_ragged_route.groups(p.ir, 8)
    spec = ragged.make_spec(p.ir, groups, "forward", 8, 2, d, dtype, page_size, target, ragged.DECODE_ROWS)
    kernels = aot.compile_ragged(spec, target)
    assert [k.name for k in kernels] == ["fwd_g0", "fwd_g1", "combine"]
    for k in kernels:
        r = k.resources
        where = f"{k.name} (routed, {dtype}, D={d}, page {page_size}) on {target}"
        assert r["spills"] == 0, f"{where} spills {r['spills']} bytes: {r}"
        assert max(k.shared, r["shared"]) <= SHARED_LIMIT[target], f"{where}: shared memory {k.shared}"
        if k.name != "combine":
            assert r["mma"] > 0, f"{where} has no MMA instruction"
