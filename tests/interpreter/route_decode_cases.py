"""Decoding ``route(...)`` patterns through a PagedKVCache on the Triton backend (issue 14), under the interpreter.

Each step's choice comes from the block summaries the cache keeps (the CPU path's selection code,
:mod:`patterndsl.runtime.route_decode`) and the ragged split-K kernels attend with it, reading the keys through the
block table: every call equals the float64 reference of that call and the CPU path's result, and pooling keys over
the whole cache (the general path's selection) fails the case.
"""

from __future__ import annotations

import contextlib

import torch

import patterndsl as pd
from patterndsl import runtime, semantics
from patterndsl.runtime import dynamic, route_decode, routing
from tests.reference import reference_attention
from tests.unit.test_route_decode import ROUTES, _decode

MOBA = "pattern moba { causal & route(topk = 2, block = 4) }"
SINK = ROUTES[1]  # causal & (sink(2) | route(topk = 1, block = 3, score = max, qblock = 2, among = causal))
WINDOW = ROUTES[2]  # a landmark route among a window's candidates: the cache frees what no step reads


def _fail(*args, **kwargs):
    raise AssertionError("a Triton decoding step chose blocks over the whole cache")


@contextlib.contextmanager
def _summaries_only():
    """Counts the Triton steps served from the summaries; any selection over the whole cache raises."""
    calls, real = [], route_decode.forward_triton
    saved = (semantics.route_scores, routing.select, dynamic.select_all, runtime.TRITON_BLOCK)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    route_decode.forward_triton = spy
    semantics.route_scores = routing.select = dynamic.select_all = _fail
    runtime.TRITON_BLOCK = (16, 16)
    try:
        yield calls
    finally:
        route_decode.forward_triton = real
        semantics.route_scores, routing.select, dynamic.select_all, runtime.TRITON_BLOCK = saved


def _run(source: str, dtype: torch.dtype, chunks: list[int], page_size: int, tol: float, cpu: bool = True):
    p = pd.compile(source)
    g = torch.Generator().manual_seed(len(source))
    n = sum(chunks)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(dtype) for h in (4, 2, 2))
    got = []

    def check(b, n, m, out, lse):
        got.append((b, n, m, out, lse))

    with _summaries_only() as calls:
        cache = _decode(p, q, k, v, chunks, page_size, check, backend="triton")
        on_cpu = []
        if cpu:
            _decode(p, q, k, v, chunks, page_size, lambda *got: on_cpu.append(got), backend="cpu")
    assert len(calls) == len(chunks), (len(calls), len(chunks))  # every Triton step was served from the summaries
    for i, (b, n, m, out, lse) in enumerate(got):
        if cpu:
            # The CPU path, served from the same summaries with the same selection code, agrees.
            *_, cpu_out, cpu_lse = on_cpu[i]
            torch.testing.assert_close(out, cpu_out, atol=tol, rtol=tol)
            torch.testing.assert_close(lse.float(), cpu_lse.float(), atol=tol, rtol=tol)
        qq, kk, vv = q[b : b + 1, :, n - m : n], k[b : b + 1, :, :n], v[b : b + 1, :, :n]
        mask = p.mask(m, n, 4, q=qq.double(), k=kk.double())
        ro, rl = reference_attention(qq.double(), kk.double(), vv.double(), mask[0])
        torch.testing.assert_close(out.double(), ro, atol=tol, rtol=tol)
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lse))
        torch.testing.assert_close(lse[fin].double(), rl[fin], atol=tol, rtol=tol)
    return cache


def case_route_decode_moba_fp32():
    _run(MOBA, torch.float32, [3, 1, 2, 4, 1], 4, 1e-4)


def case_route_decode_sink_fp16():
    _run(SINK, torch.float16, [2, 1, 3, 1, 1], 16, 2e-2)


def case_route_decode_negative_route_split_fp32():
    # A route that removes pairs (every tile masked by the element rule) over a longer cache, each row block's key
    # tiles split over several programs and merged by log-sum-exp (flash decoding).
    from patterndsl.runtime import triton_ragged

    saved = triton_ragged.OPTIONS
    triton_ragged.OPTIONS = triton_ragged.SplitOptions(programs=64, min_tiles=1)
    pieces = []
    real = triton_ragged.make_lists

    def spy(rows, want, device):
        got = real(rows, want, device)
        pieces.append(got)
        return got

    triton_ragged.make_lists = spy
    try:
        _run(ROUTES[4], torch.float32, [16, 16, 1, 2], 4, 1e-4)
    finally:
        triton_ragged.OPTIONS, triton_ragged.make_lists = saved, real
    assert any(lists.splits.shape[0] for lists in pieces)  # some row block was split
    assert all(bool((lists.pieces[:, 9] >= 0).all()) for lists in pieces)  # one key/value head's tiles per piece


def case_route_decode_per_head_groups_fp32():
    _run(ROUTES[3], torch.float32, [5, 1, 1, 2], 16, 1e-4)


def case_route_decode_builds_its_kernels_once():
    # Consecutive steps (new lengths, new choices, a wider block table) run one module: its key holds no length,
    # so neither the module nor, on a GPU, the kernels (no specialization on the table's width or Lq) are built
    # again; the keys are read through the table, never gathered into a buffer.
    from patterndsl import kernel_cache
    from patterndsl.codegen import ragged as codegen

    keys, real_load, real_gather = [], kernel_cache.load, route_decode._gather

    def load(spec, render, *args, **kwargs):
        if isinstance(spec, codegen.RaggedSpec):
            keys.append(spec.key)
        return real_load(spec, render, *args, **kwargs)

    def no_gather(*args, **kwargs):
        raise AssertionError("a Triton decoding step gathered keys")

    kernel_cache.load, route_decode._gather = load, no_gather
    built = kernel_cache.stats["built"] + kernel_cache.stats["disk"]
    try:
        _run(MOBA, torch.float32, [5, 1, 1, 1, 1], 2, 1e-4, cpu=False)
    finally:
        kernel_cache.load, route_decode._gather = real_load, real_gather
    assert len(keys) == 5 and len(set(keys)) == 1, keys
    assert kernel_cache.stats["built"] + kernel_cache.stats["disk"] - built <= 1
    source = codegen.render(next(iter(_specs(MOBA))))
    assert source.count('do_not_specialize=["stride_bt", "lq"]') == 1 and "LK = tl.constexpr(1073741824)" in source


def _specs(source: str):
    from patterndsl.codegen import ragged as codegen
    from patterndsl.runtime import triton_ragged_route

    p = pd.compile(source)
    yield codegen.make_spec(
        p.ir, triton_ragged_route.groups(p.ir, 4), "forward", 4, 2, 16, torch.float32, 2, "interpret"
    )


def case_slow_route_decode_window_frees_pages():
    cache = _run(WINDOW, torch.float32, [3] * 9, 1, 1e-4)
    assert cache.pages_in_use() < sum(cache.lengths())  # freed pages no step read


ROUTE_DECODE_CHECKS = {name[len("case_") :]: fn for name, fn in list(globals().items()) if name.startswith("case_")}
