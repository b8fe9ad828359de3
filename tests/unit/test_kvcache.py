"""PagedKVCache: decoding through the cache equals attention over the whole history, eviction is safe and complete."""

from __future__ import annotations

import random

import pytest
import torch

import patterndsl as pd
from patterndsl.errors import InputError, PatternError
from patterndsl.kvcache import live_keys

STREAMING = "pattern s(w = 20, n = 4) { causal & (window(w) | sink(n)) }"
PATTERNS = [
    STREAMING,
    "pattern a { causal }",
    "pattern a(w = 9) { causal & window(w) }",
    "pattern a(w = 6, s = 10) { causal & (window(w) | strided(s)) }",
    "pattern a(w = 5) { heads 0..1: causal & window(w)\n causal & (window(13) | sink(3)) }",
    "pattern a(c = 16) { causal & blocks(c) }",
    "pattern a { causal & (where(q - k <= 7) | global(2)) }",
]


def _generate(p, rng, steps, page_size, batch, heads=2, kv_heads=1, d=8, num_pages=400):
    """Random appends (1..4 positions, random rows) through the cache; each step attends the new queries.

    Returns the history per element (q, k, v lists), and per step what was held.
    """
    cache = pd.PagedKVCache(p, num_pages, page_size, kv_heads, d, dtype=torch.float64, batch=batch, heads=heads)
    hist = [([], [], []) for _ in range(batch)]
    snapshots = []
    first = [0] * batch  # per element: the first position of its latest append (later queries start there)
    for _ in range(steps):
        rows = sorted(rng.sample(range(batch), rng.randint(1, batch)))
        n = rng.randint(1, 4)
        kn = torch.randn(len(rows), kv_heads, n, d, dtype=torch.float64)
        vn = torch.randn(len(rows), kv_heads, n, d, dtype=torch.float64)
        qn = torch.randn(batch, heads, n, d, dtype=torch.float64)
        cache.append(kn, vn, rows=rows)
        k, v, table, lengths = cache.view()
        ql = torch.zeros(batch, dtype=torch.int64)
        ql[rows] = n
        out = p(qn, k, v, kv_lengths=lengths, q_lengths=ql, block_table=table)
        for i, b in enumerate(rows):
            first[b] = int(lengths[b]) - n
            hist[b][0].append(qn[b])
            hist[b][1].append(kn[i])
            hist[b][2].append(vn[i])
            # The new queries equal the same rows of attention over the element's whole history.
            kk, vv = torch.cat(hist[b][1], 1)[None], torch.cat(hist[b][2], 1)[None]
            full = p(torch.cat(hist[b][0], 1)[None], kk, vv)
            assert torch.allclose(out[b, :, :n], full[0, :, -n:], atol=1e-10)
        snapshots.append((list(first), table.clone()))
    return cache, snapshots


@pytest.mark.parametrize(
    "seed", [*range(3), *(pytest.param(i, marks=pytest.mark.slow) for i in range(3, len(PATTERNS)))]
)
def test_eviction_never_frees_what_a_later_step_reads_and_frees_the_rest(seed):
    rng = random.Random(seed)
    source = PATTERNS[seed % len(PATTERNS)]
    p = pd.compile(source)
    page_size = rng.choice([1, 4, 16])
    cache, snapshots = _generate(p, rng, 40, page_size, batch=2)
    total = max(cache.lengths())
    horizon = total + 64
    mask = p.mask(horizon, horizon, 2)  # [heads, q, k]: position-only patterns, so any square size serves
    for lengths, table in snapshots:
        for b in range(2):
            qlo = lengths[b]
            for page in range(table.shape[1]):
                lo, hi = page * page_size, min((page + 1) * page_size, qlo)
                if lo >= qlo:
                    continue
                reached = bool(mask[:, qlo:, lo:hi].any())
                if int(table[b, page]) < 0:
                    # Freed: no query from here on attends any of its positions.
                    assert not reached, (source, b, page)
                elif hi <= qlo and (page + 1) * page_size <= qlo and "blocks" not in source:
                    # Held and wholly in the past: some later query (within the horizon) attends it.
                    assert reached, (source, b, page)


def test_streaming_memory_stays_bounded():
    w, ps = 64, 16
    p = pd.compile(STREAMING, w=w)
    cache = pd.PagedKVCache(p, 12, ps, 1, 8)
    held = []
    for _ in range(2000):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        held.append(cache.pages_in_use())
    bound = 1 + -(-(w + 1) // ps) + 1  # the sink page, the window's pages, the page being filled
    assert max(held) <= bound
    assert held[-1] == max(held[1000:])  # constant in generated length
    with pytest.raises(PatternError, match="out of pages"):
        cache.append(torch.randn(1, 1, 200, 8), torch.randn(1, 1, 200, 8))


def test_causal_keeps_everything():
    assert live_keys(pd.compile("pattern c { causal }").ir, 1, 1000) == [(-(1 << 50), 1 << 50)]
    p = pd.compile("pattern c { causal }")
    cache = pd.PagedKVCache(p, 8, 4, 1, 8)
    cache.append(torch.randn(1, 1, 30, 8), torch.randn(1, 1, 30, 8))
    cache.append(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8))
    assert cache.pages_in_use() == 8
    with pytest.raises(PatternError, match="out of pages"):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    assert cache.lengths() == [32]  # a refused append changes nothing


def test_live_keys_of_streaming_are_sinks_and_window():
    p = pd.compile(STREAMING, w=100)
    lo_big = -(1 << 50)
    assert live_keys(p.ir, 1, 1000) == [(lo_big, 3), (900, 1 << 50)]


def test_append_checks_its_arguments():
    cache = pd.PagedKVCache(pd.compile(STREAMING), 8, 4, 2, 8, batch=2)
    with pytest.raises(InputError, match=r"k_new must have shape \[2, 2, n, 8\]"):
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(InputError, match="rows must be distinct batch indices"):
        cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), rows=[5])
    with pytest.raises(PatternError, match="num_pages must be"):
        pd.PagedKVCache(pd.compile(STREAMING), 0, 4, 2, 8)


def test_generate_example_holds_constant_memory(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tokens", "60", "--span", "8", "--page-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    held = [int(line.split()[1]) for line in lines if line.strip() and line.split()[0].isdigit()]
    assert len(held) == 10 and held[-1] == held[4] and held[-1] <= 2 * (1 + 9 // 4 + 2)


ROUTES = [
    "pattern r { causal & route(1, block = 4, qblock = 1, among = causal & window(12)) }",
    "pattern r { causal & (window(5) | route(2, block = 4, qblock = 1, among = causal & window(30) - window(5))) }",
]


@pytest.mark.parametrize("source", [ROUTES[0], pytest.param(ROUTES[1], marks=pytest.mark.slow)])
def test_route_caches_free_what_no_candidate_block_reaches(source):
    # Decoding through the evicting cache equals attention over the whole history (_generate checks every
    # step), so no page a choice could take was freed; and memory stays bounded by the candidates.
    p = pd.compile(source)
    cache, _ = _generate(p, random.Random(7), 16, 4, batch=1, num_pages=40)
    n = cache.lengths()[0]
    first = live_keys(p.ir, 1, n - 4)[0][0]  # the latest append started at n - 4 or later
    assert bool((cache.view()[2][0, : max(first, 0) // 4] == -1).all())  # no candidate reaches them
    assert source != ROUTES[0] or first > 0  # (the other one frees nothing this early)
    assert cache.pages_in_use() <= -(-(n - first) // 4) + 1


def test_a_freed_page_a_route_may_choose_is_an_error():
    p = pd.compile(ROUTES[0])
    q, k, v = torch.randn(1, 1, 1, 8), torch.randn(10, 1, 4, 8), torch.randn(10, 1, 4, 8)
    table = torch.arange(10)[None].clone()
    table[0, 6] = -1  # positions 24..27: a candidate block of the query at 39 (window(12) reaches 27)
    with pytest.raises(InputError, match="may attend"):
        p(q, k, v, kv_lengths=torch.tensor([40]), block_table=table)
    table = torch.arange(10)[None].clone()
    table[0, :6] = -1  # positions 0..23: no candidate (the block of 27 starts at 24)
    out = p(q, k, v, kv_lengths=torch.tensor([40]), block_table=table)
    full = p(q, k.transpose(0, 1).reshape(1, 1, 40, 8), v.transpose(0, 1).reshape(1, 1, 40, 8))
    assert torch.allclose(out, full, atol=1e-6)


def test_the_cache_knows_whether_a_non_finite_value_was_appended():
    # The Triton kernels read that instead of a pass over every page at every call (their products would turn a
    # non-finite value beside an attended key into NaN; such calls run element by element).
    from patterndsl.runtime import triton_ragged

    p = pd.compile("pattern c { causal }")
    cache = pd.PagedKVCache(p, 8, 4, 2, 8)
    x = torch.randn(1, 2, 5, 8)
    cache.append(x, x)
    assert cache.finite
    kp, vp, table, lens = cache.view()
    data = [lens, torch.tensor([1]), table]
    q = torch.randn(1, 2, 1, 8)
    assert not triton_ragged._needs_elementwise(q, kp, vp, data, [1], lens.tolist())
    kp[table[0, 0], 0, 0, 0] = float("inf")  # a write outside append: not the cache's state, so the pages are read
    assert triton_ragged._needs_elementwise(q, kp, vp, data, [1], lens.tolist())
    y = x[:, :, :1].clone()
    y[0, 1, 0, 3] = float("nan")
    cache.append(x[:, :, :1], y)
    kp, vp, table, lens = cache.view()
    assert not cache.finite
    assert triton_ragged._needs_elementwise(q, kp, vp, [lens, torch.tensor([1]), table], [1], lens.tolist())
