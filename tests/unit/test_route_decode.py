"""Decoding ``route(...)`` patterns through a PagedKVCache (issue 14): each step selects blocks for its new queries
from the block summaries the cache keeps (no pooling over the whole cache), equal to the float64 reference of
that call, and, for per-token groups, to one full prefill's last rows."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl import semantics
from patterndsl.runtime import route_decode
from tests.reference import reference_attention

ROUTES = [
    "pattern r { causal & (window(5) | route(topk = 2, block = 4, qblock = 1, among = causal - window(5))) }",
    "pattern r { causal & (sink(2) | route(topk = 1, block = 3, score = max, qblock = 2, among = causal)) }",
    "pattern r { causal & (window(3) | route(2, block = 4, score = landmark, qblock = 1, among = causal & window(9)))}",
    "pattern r { heads 0..2: causal & route(1, block = 5, qblock = 1)\n causal & window(4) }",
    "pattern r { causal - route(1, block = 4, qblock = 1, among = causal) | sink(1) }",
]


@pytest.fixture
def steps(monkeypatch):
    """Counts the decoding steps served from the summaries; pooling keys over the cache is an error there."""
    calls = []
    real = route_decode.forward

    def spy(*args, **kwargs):
        calls.append(1)
        monkeypatch.setattr(semantics, "route_scores", _no_full_pooling)
        try:
            return real(*args, **kwargs)
        finally:
            monkeypatch.undo()
            monkeypatch.setattr(route_decode, "forward", spy)

    monkeypatch.setattr(route_decode, "forward", spy)
    return calls


def _no_full_pooling(*args, **kwargs):
    raise AssertionError("a decoding step pooled the whole cache")


def _tensors(heads, kv_heads, n, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, n, dim, generator=g, dtype=dtype) for h in (heads, kv_heads, kv_heads))


def _decode(p, q, k, v, chunks, page_size, check, **call):
    """Append ``chunks`` (sizes per step, element 1 a step behind) and call attention on each step's queries
    (with the keyword arguments ``call`` too)."""
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
    cache = pd.PagedKVCache(p, 64, page_size, kv_heads, dim, dtype=k.dtype, batch=2)
    done = [0, 0]
    for step, n in enumerate(chunks):
        rows = [0] if step == 0 else [0, 1]
        ns = [n if b == 0 else chunks[step - 1] for b in rows]
        for b, m in zip(rows, ns, strict=True):
            cache.append(k[b : b + 1, :, done[b] : done[b] + m], v[b : b + 1, :, done[b] : done[b] + m], rows=[b])
            done[b] += m
        kp, vp, table, lens = cache.view()
        lq = max(ns)
        qs = torch.zeros(2, heads, lq, dim, dtype=q.dtype)
        ql = torch.zeros(2, dtype=torch.int64)
        for b, m in zip(rows, ns, strict=True):
            qs[b, :, :m] = q[b, :, done[b] - m : done[b]]
            ql[b] = m
        out, lse = p(qs, kp, vp, block_table=table, kv_lengths=lens, q_lengths=ql, return_lse=True, **call)
        for b in rows:
            check(b, done[b], int(ql[b]), out[b : b + 1, :, : ql[b]], lse[b : b + 1, :, : ql[b]])
    return cache


@pytest.mark.parametrize("index", range(len(ROUTES)))
def test_decoding_steps_equal_the_float64_reference_of_each_call(index, steps):
    p = pd.compile(ROUTES[index])
    rng = random.Random(index)
    q, k, v = _tensors(4, 2, 30, 8, torch.float64, index)
    chunks = [rng.choice([1, 1, 2, 3]) for _ in range(8)]
    if "window(9)" in ROUTES[index]:
        chunks = [3] * 9  # long enough for the window's candidates to leave pages behind

    def check(b, n, m, out, lse):
        qq = q[b : b + 1, :, n - m : n]
        mask = p.mask(m, n, 4, q=qq, k=k[b : b + 1, :, :n])
        ro, rl = reference_attention(qq, k[b : b + 1, :, :n], v[b : b + 1, :, :n], mask[0])
        assert torch.allclose(out, ro, atol=1e-10)
        fin = torch.isfinite(rl)
        assert torch.equal(fin, torch.isfinite(lse)) and torch.allclose(lse[fin], rl[fin], atol=1e-10)

    cache = _decode(p, q, k, v, chunks, 1 if "window(9)" in ROUTES[index] else rng.choice([1, 4, 16]), check)
    assert len(steps) == len(chunks)
    if "window(9)" in ROUTES[index]:
        # A route over a window's candidates lets the cache free the rest; no step read a freed page.
        assert cache.pages_in_use() < sum(cache.lengths())


def test_token_steps_equal_one_prefill_last_rows(steps):
    p = pd.compile(ROUTES[0])
    q, k, v = _tensors(4, 2, 24, 8, torch.float32, 9)
    full, full_lse = p(q, k, v, return_lse=True)

    def check(b, n, m, out, lse):
        assert torch.allclose(out[0], full[b, :, n - m : n], atol=1e-5)
        assert torch.allclose(lse[0], full_lse[b, :, n - m : n], atol=1e-5)

    _decode(p, q, k, v, [1] * 15, 4, check)
    assert len(steps) == 15


def test_summaries_are_the_pooled_blocks_and_change_only_while_filling():
    p = pd.compile(ROUTES[1].replace("score = max", "score = mean"))
    _, k, v = _tensors(2, 2, 11, 8, torch.float64, 3)
    cache = pd.PagedKVCache(p, 16, 4, 2, 8, dtype=torch.float64)
    (prim,) = cache.summaries.prims
    before = None
    for t in range(11):
        cache.append(k[:1, :, t : t + 1], v[:1, :, t : t + 1])
        pooled = cache.summaries.pooled(prim, 0, t // 3 + 1)
        want = torch.stack([k[0, :, 3 * j : min(3 * j + 3, t + 1)].mean(1) for j in range(t // 3 + 1)], 1)
        assert torch.allclose(pooled, want, atol=1e-12)
        if before is not None:
            assert torch.equal(pooled[:, : t // 3], before[:, : t // 3])  # finished blocks never change
        before = pooled


def test_pages_written_outside_append_fall_back_to_the_general_path(steps):
    p = pd.compile(ROUTES[0])
    q, k, v = _tensors(4, 2, 12, 8, torch.float64, 5)
    cache = pd.PagedKVCache(p, 16, 4, 2, 8, dtype=torch.float64)
    cache.append(k[:1], v[:1])
    kp, vp, table, lens = cache.view()
    kp[table[0, 0], :, 0] += 1.0  # the summaries no longer describe the pages
    out = p(q[:1, :, -1:], kp, vp, block_table=table, kv_lengths=lens)
    assert not steps
    kk = k[:1].clone()
    kk[:, :, 0] += 1.0
    assert torch.allclose(out, p(q[:1, :, -1:], kk, v[:1]), atol=1e-12)


def test_caches_made_under_inference_mode_work_without_trusting_summaries(steps):
    p = pd.compile(ROUTES[0])
    q, k, v = _tensors(4, 2, 12, 8, torch.float64, 6)
    with torch.inference_mode():
        cache = pd.PagedKVCache(p, 16, 4, 2, 8, dtype=torch.float64)
        cache.append(k[:1], v[:1])
        kp, vp, table, lens = cache.view()
        out = p(q[:1, :, -1:], kp, vp, block_table=table, kv_lengths=lens)
    assert not steps  # inference tensors keep no version counter: a write outside append could not be seen
    assert torch.allclose(out, p(q[:1, :, -1:], k[:1], v[:1]), atol=1e-12)


def test_triton_step_names_a_missing_page_a_query_attends():
    # The Triton step evaluates the pattern at its listed tiles' keys only where a page is missing; it names it.
    from patterndsl.errors import InputError

    p = pd.compile(ROUTES[0])
    q, k, v = _tensors(4, 2, 12, 8, torch.float32, 7)
    cache = pd.PagedKVCache(p, 16, 4, 2, 8)
    cache.append(k[:1], v[:1])
    kp, vp, table, lens = cache.view()
    table = table.clone()
    table[0, 2] = -1  # positions 8..11: the window(5) of the query at 11
    data = [lens, torch.tensor([1]), table]
    with pytest.raises(InputError, match="key position 8 of batch element 0"):
        route_decode.forward_triton(q[:1, :, -1:], kp, vp, p.ir, data, 8**-0.5, cache.summaries, cache_finite=True)


def test_steps_with_gradients_recompute_the_choice_and_give_the_reference_gradients(steps):
    # A step that needs gradients runs element by element through the op (the choice recomputed from the keys,
    # the backward recomputing P from lse); it equals the summaries' step and the float64 reference, and the
    # pages' gradients sum through the table.
    p = pd.compile(ROUTES[1])
    q, k, v = _tensors(4, 2, 14, 8, torch.float64, 8)
    cache = pd.PagedKVCache(p, 16, 4, 2, 8, dtype=torch.float64)
    cache.append(k[:1], v[:1])
    kp, vp, table, lens = cache.view()
    qq = q[:1, :, -2:]
    served = p(qq, kp, vp, block_table=table, kv_lengths=lens)
    assert len(steps) == 1
    qg = qq.clone().requires_grad_(True)
    kg, vg = kp.clone().requires_grad_(True), vp.clone().requires_grad_(True)
    out = p(qg, kg, vg, block_table=table, kv_lengths=lens)
    assert len(steps) == 1  # not from the summaries: they take no gradient
    assert torch.allclose(out, served, atol=1e-12)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), g)
    q64, k64, v64 = (x.detach().clone().requires_grad_(True) for x in (qq, k[:1], v[:1]))
    mask = p.mask(2, 14, 4, q=q64.detach(), k=k64.detach())
    ref, _ = reference_attention(q64, k64, v64, mask[0])
    rq, rk, rv = torch.autograd.grad(ref, (q64, k64, v64), g)
    assert torch.allclose(out, ref, atol=1e-10) and torch.allclose(dq, rq, atol=1e-10)
    pos = torch.arange(14)
    page, slot = table[0, pos // 4], pos % 4
    assert torch.allclose(dk[page, :, slot].transpose(0, 1), rk[0], atol=1e-10)
    assert torch.allclose(dv[page, :, slot].transpose(0, 1), rv[0], atol=1e-10)
    unused = torch.ones(kp.shape[0], dtype=torch.bool)
    unused[table[0, :4]] = False
    assert not dk[unused].any() and not dv[unused].any()


def test_triton_step_leaves_elements_with_more_queries_than_keys_to_the_general_path():
    # The split-K kernels read plan rows as positions, which holds only while an element has no more queries than
    # keys; such a call (and one over a cache that was given a non-finite value) is not served from the summaries.
    p = pd.compile(ROUTES[0])
    q, k, v = _tensors(4, 2, 12, 8, torch.float32, 9)
    cache = pd.PagedKVCache(p, 16, 4, 2, 8)
    cache.append(k[:1, :, :3], v[:1, :, :3])
    kp, vp, table, lens = cache.view()
    data = [lens, torch.tensor([4]), table]
    assert (
        route_decode.forward_triton(q[:1, :, :4], kp, vp, p.ir, data, 0.3, cache.summaries, cache_finite=True) is None
    )
    data = [lens, torch.tensor([1]), table]
    assert (
        route_decode.forward_triton(q[:1, :, :1], kp, vp, p.ir, data, 0.3, cache.summaries, cache_finite=False) is None
    )
