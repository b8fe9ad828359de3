"""Paged caches read without copies on the CPU (issue 14): a tile over consecutive physical pages is computed in
place (:func:`patterndsl.runtime.paged.in_place`), other tiles gather only their rows; both equal the float64
reference, forward and backward, and a non-finite value in another head's rows stays out of a row."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError
from patterndsl.runtime import paged, ragged
from tests.unit.test_ragged import SOURCES, _check, _tensors, shared_paged


def consecutive(k, v, kvl, page_size, gap=1):
    """Element ``b``'s pages laid out in order, each element's run after a ``gap`` of unused pages."""
    batch, hkv, _, d = k.shape
    counts = [max(-(-int(n) // page_size), 1) for n in kvl]
    table = torch.full((batch, max(counts) + 1), -1, dtype=torch.int64)
    kp = torch.randn(sum(counts) + gap * batch + 1, hkv, page_size, d, dtype=k.dtype)
    vp = torch.randn_like(kp)
    nxt = gap
    for b in range(batch):
        for p in range(counts[b]):
            table[b, p] = nxt
            lo, hi = p * page_size, min((p + 1) * page_size, int(kvl[b]))
            kp[nxt, :, : hi - lo] = k[b, :, lo:hi]
            vp[nxt, :, : hi - lo] = v[b, :, lo:hi]
            nxt += 1
        nxt += gap
    return kp, vp, table


@pytest.fixture
def in_place_calls(monkeypatch):
    used = []
    real = paged.in_place

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        used.append(got is not None)
        return got

    monkeypatch.setattr(paged, "in_place", spy)
    return used


@pytest.mark.parametrize("seed", [0, 1, *(pytest.param(s, marks=pytest.mark.slow) for s in (2, 3))])
def test_consecutive_pages_are_read_in_place_and_match_the_reference(seed, in_place_calls):
    rng = random.Random(77 + seed)
    # Runs that start past key 0 with pages that do not divide the tiles: the run starts inside a page.
    p = pd.compile(["pattern a { causal & window(7) }", SOURCES[0], SOURCES[2], SOURCES[4]][seed])
    batch, kv_heads = 2, rng.randint(1, 2)
    lq = rng.choice([1, 3, 9])
    kvl = torch.tensor([rng.randint(130, 200), rng.randint(lq, 90)])
    ql = torch.tensor([rng.randint(0, lq) for _ in range(batch)])
    ql[0] = lq
    dtype = torch.float32 if seed % 2 else torch.float64
    q, k, v = _tensors(batch, 2 * kv_heads, kv_heads, lq, int(kvl.max()), 8, dtype, seed)
    kp, vp, table = consecutive(k, v, kvl, [5, 100, 16, 1][seed])
    with torch.no_grad():
        out = p(q, kp, vp, kv_lengths=kvl, q_lengths=ql, block_table=table)
        want = p(q, k, v, kv_lengths=kvl, q_lengths=ql)
    assert any(in_place_calls)
    assert torch.allclose(out, want, atol=1e-5 if dtype == torch.float32 else 1e-12)
    _check(p, q, k, v, kvl, ql, 1e-4 if dtype == torch.float32 else 1e-9, table, kp, vp)


@pytest.mark.parametrize("page_size", [11, 16])
def test_scattered_and_shared_pages_are_read_in_place_piece_by_piece(page_size, in_place_calls):
    # Sinks and a window: two runs of keys per row tile; a shared prompt's pages, then each element's own,
    # shuffled: every run of consecutive physical pages is one piece.
    p = pd.compile(SOURCES[0])
    q, k, v = _tensors(2, 4, 2, 2, 150, 8, torch.float64, page_size)
    kvl, ql = torch.tensor([150, 131]), torch.tensor([2, 1])
    kp, vp, table = shared_paged(k, v, kvl, page_size, random.Random(page_size))
    _check(p, q, k, v, kvl, ql, 1e-9, table, kp, vp)
    assert any(in_place_calls)


def test_a_non_finite_value_of_another_head_stays_out(in_place_calls):
    p = pd.compile("pattern c { causal & window(6) }")
    q, k, v = _tensors(1, 4, 2, 1, 40, 8, torch.float32, 1)
    kvl = torch.tensor([40])
    kp, vp, table = consecutive(k, v, kvl, 4)
    vp[table[0, 9], 1, 2] = float("inf")  # key 38 of kv head 1 only
    kp[table[0, 0], 0, 0] = float("nan")  # key 0: outside the window
    out = p(q, kp, vp, kv_lengths=kvl, block_table=table)
    assert bool(torch.isfinite(out[:, :2]).all()) and not bool(torch.isfinite(out[:, 2:]).all())
    clean = vp.clone()
    clean[table[0, 9], 1, 2] = 0.0
    kp[table[0, 0], 0, 0] = 0.0
    want = p(q, kp, clean, kv_lengths=kvl, block_table=table)
    assert torch.allclose(out[:, :2], want[:, :2], atol=1e-6)


def test_scattered_pages_gather_only_the_rows_of_the_run():
    k = torch.randn(6, 2, 4, 8)
    rows = paged.flat_rows(k, torch.tensor([5, 5, 2]), torch.tensor([1, 3, 0]))
    assert torch.equal(rows, torch.stack([k[5, :, 1], k[5, :, 3], k[2, :, 0]], 1))
    assert paged.flat_rows(k.transpose(2, 3).contiguous().transpose(2, 3), torch.tensor([0]), torch.tensor([0])) is None


def _runs_of(row):
    held = [p for p in row if p >= 0]
    return 1 + sum(1 for a, b in itertools.pairwise(held) if b != a + 1)


def test_the_cache_keeps_each_element_on_runs_of_consecutive_pages():
    # Elements appended in step grow in runs of their own; a window's freed pages come back in order.
    cache = pd.PagedKVCache(pd.compile("pattern c { causal }"), 64, 4, 1, 8, batch=4)
    for _ in range(30):
        cache.append(torch.randn(4, 1, 1, 8), torch.randn(4, 1, 1, 8))
    assert all(_runs_of(row) == 1 for row in cache.view()[2].tolist())
    cache = pd.PagedKVCache(pd.compile("pattern s { causal & (window(16) | sink(2)) }"), 9, 4, 1, 8)
    for _ in range(120):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        assert _runs_of(cache.view()[2][0].tolist()) <= 3  # the sinks' page, then the window wrapping once


@pytest.mark.parametrize(
    ("source", "kept"),
    [("pattern c { causal }", 1 << 20), ("pattern w { causal & window(9) }", 1 << 20), ("pattern c { causal }", 0)],
)
def test_a_decoding_step_on_one_run_of_pages_uses_the_fused_kernel(source, kept, monkeypatch):
    # float32, one query row, the keys on consecutive pages that start inside a page (the window) and end
    # inside the last page: one piece, computed by torch's flash kernel under a mask kept on the tile.
    fused = []
    real = paged._fused

    def spy(*args):
        got = real(*args)
        fused.append(got is not None)
        return got

    monkeypatch.setattr(paged, "_fused", spy)
    monkeypatch.setattr(paged, "MAX_KEPT_MASK", kept)  # 0: the mask is built per call, not kept on the tile
    ragged.clear()
    p = pd.compile(source)
    q, k, v = _tensors(1, 4, 2, 1, 37, 8, torch.float32, 5)
    kvl = torch.tensor([37])
    kp, vp, table = consecutive(k, v, kvl, 5)
    for _ in range(2):  # the second call reuses the tile's mask
        out, lse = p(q, kp, vp, kv_lengths=kvl, block_table=table, return_lse=True)
        want, want_lse = p(q.double(), k.double(), v.double(), kv_lengths=kvl, return_lse=True)
        assert torch.allclose(out.double(), want, atol=1e-5) and torch.allclose(lse.double(), want_lse, atol=1e-5)
    assert fused == [True, True]
    masks = [
        key
        for work in ragged._WORK.values()
        for _, groups in work
        for _, tiles in groups
        for t in tiles
        for key in t._biases
    ]
    assert any(isinstance(key, tuple) and key[0] == "paged" for key in masks) == bool(kept)


def test_a_table_checked_once_is_checked_again_after_a_write():
    # The pages' check is skipped for the same unchanged table tensor only: an in-place write or a smaller cache
    # are checked again, and other lengths too unless every entry of the table was a page or -1.
    p = pd.compile("pattern c { causal }")
    q, k, v = _tensors(1, 2, 1, 1, 20, 8, torch.float32, 3)
    kvl = torch.tensor([20])
    kp, vp, table = consecutive(k, v, kvl, 4)
    p(q, kp, vp, kv_lengths=kvl, block_table=table)
    assert paged.checked(table, kp.shape[0], 4, [20]) and paged.checked(table, kp.shape[0], 4, [19])
    loose = torch.cat([table, torch.full((1, 2), 10**6)], 1)  # out of the cache past the element's pages
    p(q, kp, vp, kv_lengths=kvl, block_table=loose)
    assert paged.checked(loose, kp.shape[0], 4, [20]) and not paged.checked(loose, kp.shape[0], 4, [19])
    with pytest.raises(InputError, match="is not a page of the cache"):
        p(q, kp[:3], vp[:3], kv_lengths=kvl, block_table=table)
    table[0, 2] = kp.shape[0]
    with pytest.raises(InputError, match=r"block_table\[0, 2\]"):
        p(q, kp, vp, kv_lengths=kvl, block_table=table)


def test_a_table_written_through_numpy_is_checked_again():
    # A write through memory the table shares bumps no version counter: the kept check compares values too, so
    # a page outside the cache is never read.
    p = pd.compile("pattern c { causal }")
    q, k, v = _tensors(1, 2, 1, 1, 20, 8, torch.float32, 4)
    kvl = torch.tensor([20])
    kp, vp, table = consecutive(k, v, kvl, 4)
    p(q, kp, vp, kv_lengths=kvl, block_table=table)
    version = table._version
    table.numpy()[0, 2] = kp.shape[0] + 7
    assert table._version == version
    assert not paged.checked(table, kp.shape[0], 4, [20])
    with pytest.raises(InputError, match=rf"block_table\[0, 2\] = {kp.shape[0] + 7} is not a page of the cache"):
        p(q, kp, vp, kv_lengths=kvl, block_table=table)


def test_runs_of_pages_split_where_pages_stop_being_consecutive():
    table = torch.tensor([4, 5, 6, 7, 9, 10, 2, -1])
    assert paged._pieces(table, ((3, 16),), 4) == [(4, 4, 3, 13)]  # one run: the fast path
    assert paged._pieces(table, ((3, 26),), 4) == [(4, 4, 3, 13), (9, 2, 0, 8), (2, 1, 0, 2)]
    assert paged._pieces(table, ((0, 4), (20, 22)), 4) == [(4, 1, 0, 4), (10, 1, 0, 2)]
    assert paged._pieces(table, ((24, 30),), 4) is None  # a page not held


def test_finite_is_one_sum():
    x = torch.ones(3, 4)
    assert paged.finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2] = bad
        assert not paged.finite(y)
    assert not paged.finite(torch.full((4,), 3e38))  # an overflowing sum only sends the caller down its exact path
