"""Ragged and paged calls with few query rows through the native decoding kernel (issue 14).

``runtime/cpu/native/decode.cpp`` reads the cache in place through the block table, the query heads of one
key-value head together, keys split over threads and merged by log-sum-exp. Checked against the float64
reference on the unpaged, unpadded problem (outputs, lse, and the gradients of the torch backward that follows
it): random patterns, ragged lengths, random block tables with shared pages, page sizes 1/16/64, grouped-query
heads, head sizes whose 16-wide blocks do not fill the kernel's register blocks, forced key splits, empty rows,
strided operands. The kernel's path is the one taken (spies count it, and the torch row loop not running); a
table entry outside the cache, a page not held that the pattern reads and a non-finite value at a blocked pair
hand the call back to the torch path, which raises or selects exactly; with the kernel off the torch path runs.
"""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError
from patterndsl.runtime import cpu, paged, ragged
from patterndsl.runtime.cpu.native import build, decoding
from tests.spies import count_calls
from tests.unit.test_ragged import SOURCES, _check, _tensors, shared_paged

pytestmark = pytest.mark.skipif(not decoding.serves(*(torch.zeros(1, 1, 1, 16),) * 3), reason="no native kernel")

#: The ragged tests' patterns with one head group (the kernel takes every query head in one group).
ONE_GROUP = [s for s in SOURCES if "heads" not in s]


class Runs:
    """Live counts of the kernel wrapper's calls (``native``) and of the torch row-tile paths' (``torch``)."""

    def __init__(self, monkeypatch):
        self._native = count_calls(monkeypatch, decoding, ("forward",))
        self._tile = count_calls(monkeypatch, ragged, ("_run_tile",))
        self._in_place = count_calls(monkeypatch, paged, ("in_place",))

    @property
    def native(self) -> int:
        return self._native["forward"]

    @property
    def torch(self) -> int:
        return self._tile["_run_tile"] + self._in_place["in_place"]


@pytest.fixture
def runs(monkeypatch):
    return Runs(monkeypatch)


def _case(seed, dim=16):
    rng = random.Random(1700 + seed)
    p = pd.compile(rng.choice(ONE_GROUP))
    batch = rng.randint(1, 4)
    kv_heads = rng.randint(1, 2)
    heads = rng.choice([1, 2, 4]) * kv_heads
    lk_max = rng.randint(1, 200)
    kvl = torch.tensor([rng.randint(0, lk_max) for _ in range(batch)])
    kvl[0] = lk_max
    lq_max = rng.choice([1, 1, 3, 16])
    ql = torch.tensor([rng.randint(0, min(lq_max, int(n))) for n in kvl])
    ql[0] = min(lq_max, lk_max)
    q, k, v = _tensors(batch, heads, kv_heads, lq_max, lk_max, dim, torch.float32, seed)
    return rng, p, q, k, v, kvl, ql


def _served(runs):
    assert runs.native >= 1 and runs.torch == 0


@pytest.mark.parametrize("seed", [*range(4), *(pytest.param(s, marks=pytest.mark.slow) for s in range(4, 12))])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_paged_calls_run_natively_and_match_float64_reference(seed, page_size, runs):
    rng, p, q, k, v, kvl, ql = _case(seed, dim=[16, 48, 80][seed % 3])
    kp, vp, table = shared_paged(k, v, kvl, page_size, rng)
    _check(p, q, k, v, kvl, ql, 1e-4, block_table=table, kp=kp, vp=vp)
    _served(runs)


@pytest.mark.parametrize("seed", range(4))
def test_unpaged_ragged_calls_run_natively_and_match_float64_reference(seed, runs):
    _, p, q, k, v, kvl, ql = _case(seed + 20)
    _check(p, q, k, v, kvl, ql, 1e-4)
    _served(runs)


def test_keys_split_over_threads_merge_exactly(monkeypatch, runs):
    # Many short splits per (tile, kv head), merged by log-sum-exp; a window leaves some splits without keys.
    monkeypatch.setattr(decoding, "MIN_SPLIT", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for source in ("pattern c { causal }", "pattern s { causal & (window(40) | sink(3)) }"):
            p = pd.compile(source)
            q, k, v = _tensors(2, 4, 2, 2, 300, 32, torch.float32, 3)
            kvl, ql = torch.tensor([300, 170]), torch.tensor([2, 1])
            kp, vp, table = shared_paged(k, v, kvl, 16, random.Random(5))
            _check(p, q, k, v, kvl, ql, 1e-4, block_table=table, kp=kp, vp=vp)
    finally:
        torch.set_num_threads(threads)
    _served(runs)


def test_rows_without_keys_are_zero_with_minus_infinite_lse(runs):
    p = pd.compile("pattern e { causal & where(k > 2) }")
    q, k, v = _tensors(2, 2, 1, 3, 9, 16, torch.float32, 4)
    kvl, ql = torch.tensor([3, 9]), torch.tensor([3, 2])
    kp, vp, table = shared_paged(k, v, kvl, 1, random.Random(0))
    out, lse = p(q, kp, vp, kv_lengths=kvl, q_lengths=ql, block_table=table, return_lse=True)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
    _check(p, q, k, v, kvl, ql, 1e-4, block_table=table, kp=kp, vp=vp)
    _served(runs)


def test_strided_queries_and_cache_are_read_as_they_are(runs):
    p = pd.compile("pattern s { causal & window(50) }")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 4, 16, generator=g).transpose(1, 2)  # [B, H, Lq, D] from [B, Lq, H, D]
    big = torch.randn(2, 2, 2, 120, 16, generator=g)
    k, v = big[0, :, :, :100], big[1, :, :, :100]  # a slice of a longer cache: strided pages
    kvl = torch.tensor([100, 61])
    want, want_lse = p(q.double(), k.double(), v.double(), kv_lengths=kvl, return_lse=True)  # the torch path
    before = runs.torch
    out, lse = p(q, k, v, kv_lengths=kvl, return_lse=True)
    assert torch.allclose(out.double(), want, atol=1e-5) and torch.allclose(lse.double(), want_lse, atol=1e-5)
    assert runs.native == 1 and runs.torch == before


def test_tables_outside_the_cache_and_missing_pages_are_located_errors(runs):
    p = pd.compile("pattern c { causal }")
    q = torch.randn(2, 2, 1, 16)
    kp = vp = torch.randn(4, 1, 16, 16)
    with pytest.raises(InputError, match=r"block_table\[1, 1\] = 4 is not a page"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 20]), block_table=torch.tensor([[0, -1], [1, 4]]))
    with pytest.raises(InputError, match=r"no page .* key position 16 of batch element 1"):
        p(q, kp, vp, kv_lengths=torch.tensor([3, 20]), block_table=torch.tensor([[0, -1], [1, -1]]))
    sw = pd.compile("pattern s { causal & (window(3) | sink(2)) }")
    kvl = torch.tensor([3, 40])
    # A page the pattern cannot read may be -1 (the kernel never reaches it), but never outside the cache.
    table = torch.tensor([[0, -1, -1], [1, -1, 2]])
    out = sw(q, kp, vp, kv_lengths=kvl, block_table=table)
    assert torch.isfinite(out).all()
    table[1, 1] = 7  # written in place: checked again at the next call
    with pytest.raises(InputError, match=r"block_table\[1, 1\] = 7 is not a page"):
        sw(q, kp, vp, kv_lengths=kvl, block_table=table)
    assert runs.native >= 3


def test_the_torch_path_runs_with_the_kernel_off(monkeypatch, runs):
    p = pd.compile(SOURCES[0])
    rng, _, q, k, v, kvl, ql = _case(2)
    kp, vp, table = shared_paged(k, v, kvl, 16, rng)
    with cpu.options(native=False):
        _check(p, q, k, v, kvl, ql, 1e-4, block_table=table, kp=kp, vp=vp)
    assert runs.native == 0 and runs.torch >= 1
    monkeypatch.setenv("PATTERNDSL_NATIVE", "0")
    build.reset()
    try:
        assert not decoding.serves(q, kp, vp)
        _check(p, q, k, v, kvl, ql, 1e-4, block_table=table, kp=kp, vp=vp)
    finally:
        monkeypatch.undo()
        build.reset()
    assert decoding.serves(q, kp, vp)


def test_tiles_of_more_than_sixteen_queries_keep_the_torch_path(runs):
    # A prefill tile's products are matrices, which torch's fused kernel runs faster than the decoding kernel.
    p = pd.compile("pattern c { causal }")
    q, k, v = _tensors(1, 2, 2, 20, 40, 16, torch.float32, 1)
    out = p(q, k, v, kv_lengths=torch.tensor([40]))
    assert runs.native == 0 and runs.torch >= 1
    assert torch.allclose(out.double(), p(q.double(), k.double(), v.double(), kv_lengths=torch.tensor([40])), atol=1e-5)
