"""Context parallelism (LANGUAGE.md section 11, issue 16): layouts, cost and the distributed attention.

The planning tests compare :func:`patterndsl.distributed.cost` and the layouts with a brute force
over the dense mask. The process tests fork 2 and 4 gloo ranks (tcp on 127.0.0.1, a free port),
run several random patterns per launch and compare every rank's output, log-sum-exp and
gradients with single-process attention over the whole sequence (float64), and the bytes each
rank received with what ``cost`` predicts.
"""

from __future__ import annotations

import random
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import patterndsl as pd
from patterndsl import distributed as D
from patterndsl.analysis.plan import tile_reduce
from patterndsl.distributed import closed, traffic
from patterndsl.errors import PatternError

# --------------------------------------------------------------------------- patterns


def random_source(rng: random.Random, length: int) -> str:
    """A random static pattern body over ``length`` tokens (windows, dilation, sinks, globals, blocks)."""
    w = rng.randint(1, max(2, length // 4))
    choices = [
        f"causal & window({w})",
        f"causal & (window({w}) | sink({rng.randint(1, 9)}))",
        f"window({w}, {rng.randint(0, w)}, dilation = {rng.randint(1, 3)})",
        f"window({w}, {w}) | global({rng.randint(1, 20)})",
        f"blocks({rng.randint(5, 60)}) | (causal & strided({rng.randint(2, 9)}))",
        f"causal & (window({w}) | landmarks({rng.randint(3, 30)}))",
        "causal",
        f"causal - window({w})",
    ]
    return rng.choice(choices)


def brute_costs(mask: torch.Tensor, layout, token_bytes: int) -> list[tuple[int, int, int]]:
    """(tiles, bytes forward, bytes backward) per rank, from the dense mask ``[heads, L, L]``."""
    visited = (tile_reduce(mask, layout.block, layout.block) > 0).any(0).numpy()
    n = visited.shape[0]
    size = np.minimum(layout.seq_len - np.arange(n) * layout.block, layout.block)
    owned = np.zeros((layout.world_size, n), dtype=bool)
    for r in range(layout.world_size):
        owned[r, layout.tiles(r)] = True
    needed = np.stack([visited[layout.tiles(r)].any(0) for r in range(layout.world_size)])
    out = []
    for r in range(layout.world_size):
        fwd = int(size[needed[r] & ~owned[r]].sum()) * token_bytes
        bwd = sum(int(size[needed[s] & owned[r]].sum()) for s in range(layout.world_size) if s != r) * token_bytes
        out.append((int(visited[layout.tiles(r)].sum()), fwd, bwd))
    return out


# --------------------------------------------------------------------------- planning


@pytest.mark.parametrize("strategy", ["contiguous", "balanced", "auto"])
@pytest.mark.parametrize("seq_len,world", [(1000, 3), (64, 4), (77, 8), (4096, 4)])
def test_layout_covers_every_token_once(strategy, seq_len, world):
    p = pd.compile("pattern p { causal & window(50) }")
    lay = D.shard(p, seq_len, world, strategy, block=16)
    assert lay.seq_len == seq_len and lay.world_size == world
    allpos = torch.cat([lay.indices(r) for r in range(world)])
    assert allpos.dtype == torch.int64
    assert torch.equal(torch.sort(allpos).values, torch.arange(seq_len))
    assert all(lay.indices(r).numel() == lay.indices_count(r) for r in range(world))
    for key in ("max_tiles", "mean_tiles", "max_received_tokens", "tiles", "received_tokens"):
        assert key in lay.report


def test_balanced_causal_work_and_auto_choice():
    p = pd.compile("pattern p { causal }")
    lay = D.shard(p, 1 << 20, 8, "balanced")
    assert lay.report["max_tiles"] / lay.report["mean_tiles"] <= 1.05
    contiguous = D.shard(p, 1 << 20, 8, "contiguous")
    assert contiguous.report["max_tiles"] / contiguous.report["mean_tiles"] > 1.5
    assert D.shard(p, 1 << 20, 8).strategy == "balanced"
    # A sliding window is balanced already: contiguous moves less.
    w = pd.compile("pattern p { window(300, 300) }")
    assert D.shard(w, 1 << 16, 8, block=64).strategy == "contiguous"


def test_documents_layout_keeps_documents_whole():
    p = pd.compile("pattern p { input doc: int[token]\n within(doc, causal) }")
    doc = pd.segments([256] * 8)
    lay = D.shard(p, 2048, 4, "documents", block=64, doc=doc)
    assert lay.strategy == "documents"
    assert lay.report["max_received_tokens"] == 0  # every document fits a rank's share: nothing moves
    assert lay.report["max_tiles"] == lay.report["mean_tiles"]
    # A document heavier than a share is zigzagged over several ranks; auto takes the least work.
    doc = pd.segments([256, 512, 256, 1024])
    lay = D.shard(p, 2048, 4, "documents", block=64, doc=doc)
    contiguous = D.shard(p, 2048, 4, "contiguous", block=64, doc=doc)
    assert lay.report["max_tiles"] < contiguous.report["max_tiles"]
    auto = D.shard(p, 2048, 4, block=64, doc=doc)
    assert auto.report["max_tiles"] <= lay.report["max_tiles"]
    with pytest.raises(PatternError, match="documents"):
        D.shard(pd.compile("pattern p { causal }"), 2048, 4, "documents")


@pytest.mark.parametrize("seed", range(12))
def test_cost_equals_brute_force(seed):
    rng = random.Random(seed)
    seq_len = rng.randint(40, 400)
    world = rng.choice([2, 3, 4, 8])
    block = rng.choice([8, 16, 32])
    p = pd.compile(f"pattern p {{ {random_source(rng, seq_len)} }}")
    strategy = rng.choice(["contiguous", "balanced"])
    lay = D.shard(p, seq_len, world, strategy, block=block)
    got = D.cost(p, seq_len, world, lay, batch=2, kv_heads=3, head_dim=8, dtype=torch.float16, block=block)
    want = brute_costs(p.mask(seq_len), lay, 2 * 2 * 3 * 8 * 2)
    assert [(c.tiles, c.bytes_received, c.bytes_received_backward) for c in got] == want, str(p)


def test_cost_per_head_patterns_and_grids():
    p = pd.compile("pattern p { heads 0..1: causal & window(9)\n heads 1..2: window(3, 3) | sink(2) }")
    lay = D.shard(p, 100, 3, "contiguous", block=8)
    got = D.cost(p, 100, 3, lay, block=8)
    assert [(c.tiles, c.bytes_received, c.bytes_received_backward) for c in got] == brute_costs(
        p.mask(100, heads=2), lay, 2 * 64 * 2
    )
    g = pd.compile("pattern g { layout grid(t = 4, y = 6, x = 6)\n neighborhood((3, 3, 3)) }")
    lay = D.shard(g, 144, 4, "contiguous", block=8)
    got = D.cost(g, 144, 4, lay, block=8)
    assert [(c.tiles, c.bytes_received, c.bytes_received_backward) for c in got] == brute_costs(
        g.mask(144), lay, 2 * 64 * 2
    )


@pytest.mark.parametrize("src", ["causal", "causal & window(300)", "window(100, 100) | global(70)", "blocks(256)"])
def test_two_level_runs_equal_the_plan(src):
    p = pd.compile(f"pattern p {{ {src} }}")
    direct = traffic.visits(p.plan(5000, 5000, 1, block=(64, 64), order="identity"))
    for factor in (2, 8):
        two = traffic.static_visits(p, 5000, 1, 64, factor)
        assert all(
            np.array_equal(a, b)
            for a, b in zip((direct.row, direct.lo, direct.hi), (two.row, two.lo, two.hi), strict=True)
        )


CLOSED_SOURCES = [
    "causal",
    "causal & window(37)",
    "window(5, 9) | global(3)",
    "causal & (window(40) | sink(4))",
    "causal & blocks(50)",
    "blocks(7) | sink(3)",
    "blocks(300) & window(20, 20)",
    "full",
    "global(9) & causal",
    "causal - window(9)",
    "~blocks(5) & causal",
    "window(9, 9) - (sink(3) | blocks(40))",
    "~(global(4) | window(3))",
    "causal - (window(20) - window(5))",
]


@pytest.mark.parametrize("seed", range(48))
def test_closed_form_runs_equal_the_plan(seed):
    rng = random.Random(seed)
    seq_len = rng.randint(1, 700)
    block = rng.choice([1, 4, 8, 16, 32])
    src = CLOSED_SOURCES[seed % len(CLOSED_SOURCES)] if seed % 2 else random_source(rng, seq_len)
    p = pd.compile(f"pattern p {{ {src} }}")
    got = closed.closed_visits(p, seq_len, 1, block)
    if seed % 2:
        assert got is not None, src  # every form above has a closed form
    if got is None:
        return
    want = traffic.visits(p.plan(seq_len, seq_len, 1, block=(block, block), order="identity"))
    assert all(
        np.array_equal(a, b) for a, b in zip((got.row, got.lo, got.hi), (want.row, want.lo, want.hi), strict=True)
    ), (src, seq_len, block)


def test_closed_form_per_head_and_refusals():
    p = pd.compile("pattern p { heads 0..1: causal & window(9)\n heads 1..2: window(3, 3) | sink(2) }")
    got = closed.closed_visits(p, 300, 2, 16)
    want = traffic.visits(p.plan(300, 300, 2, block=(16, 16), order="identity"))
    assert all(
        np.array_equal(a, b) for a, b in zip((got.row, got.lo, got.hi), (want.row, want.lo, want.hi), strict=True)
    )
    for src in ("causal - strided(4)", "window(4, dilation = 2)", "causal & strided(3)"):
        assert closed.closed_visits(pd.compile(f"pattern p {{ {src} }}"), 300, 1, 16) is None, src


@pytest.mark.parametrize("seed", range(16))
def test_closed_form_grid_neighborhoods_equal_the_plan(seed, monkeypatch):
    rng = random.Random(seed)
    shape = [rng.randint(2, 9) for _ in range(rng.randint(1, 3))]
    size = [rng.randint(1, e) for e in shape]
    stride = [rng.randint(1, s) for s in size]
    causal = rng.choice(["true", "false"])
    axes = ", ".join(f"{a} = {e}" for a, e in zip("tyx"[-len(shape) :], shape, strict=True))
    body = f"neighborhood(({', '.join(map(str, size))},), stride = ({', '.join(map(str, stride))},), causal = {causal})"
    if seed % 4 == 0:
        body += " | neighborhood(1)"
    p = pd.compile(f"pattern g {{ layout grid({axes})\n {body} }}")
    seq_len, block = int(np.prod(shape)), rng.choice([1, 2, 3, 8, 16])
    monkeypatch.setattr(closed, "ROW_CHUNK", rng.choice([1, 3, 1 << 14]))  # chunks of tile rows join exactly
    got = closed.closed_visits(p, seq_len, 1, block)
    want = traffic.visits(p.plan(seq_len, seq_len, 1, block=(block, block), order="identity"))
    assert all(
        np.array_equal(a, b) for a, b in zip((got.row, got.lo, got.hi), (want.row, want.lo, want.hi), strict=True)
    ), (str(p), block)
    dilated = pd.compile("pattern g { layout grid(y = 8, x = 8)\n neighborhood(3, dilation = 2) }")
    assert closed.closed_visits(dilated, 64, 1, 4) is None


def test_cost_at_scale_is_cheap_and_window_moves_little():
    p = pd.compile("pattern p { causal & window(4096) }")
    seq_len = 1 << 20
    got = D.cost(p, seq_len, 8)
    all_gather = (seq_len - seq_len // 8) * 2 * 64 * 2
    assert all_gather / max(c.bytes_received for c in got) >= 50


SCALE_SOURCES = [
    "causal",
    "causal & window(4096)",
    "causal & (window(4096) | sink(4))",
    "window(512, 512) | global(256)",
    "layout grid(t = 256, y = 256, x = 256)\n neighborhood((3, 7, 7))",
    "causal & blocks(8192)",
]


@pytest.mark.parametrize("src", SCALE_SOURCES)
def test_cost_at_16m_tokens_on_1024_ranks(src):
    """The benchmark's patterns at 16M tokens on 1,024 ranks: closed forms, seconds of CPU at most."""
    p = pd.compile(f"pattern p {{ {src} }}")
    assert closed.closed_visits(p, 1 << 24, 1, 128) is not None
    start = time.process_time()
    big = D.cost(p, 1 << 24, 1024)
    assert time.process_time() - start < 20  # about 0.1-0.3 s; the two-level plan took 2-400 s
    assert len(big) == 1024
    if src == "causal & window(4096)":
        assert max(c.bytes_received for c in big) == 4096 * 2 * 64 * 2
    if src == "causal":  # contiguous: rank r reads every earlier key
        assert [c.bytes_received for c in big[:3]] == [0, 16384 * 256, 2 * 16384 * 256]
        assert sum(c.tiles for c in big) == 131072 * 131073 // 2


def test_errors_name_what_is_not_distributed():
    routed = pd.compile("pattern r { causal & route(topk = 2, block = 16) }")
    with pytest.raises(PatternError, match="route"):
        D.cost(routed, 256, 2, block=16)
    with pytest.raises(PatternError, match="route"):
        D.attention(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), routed)
    p = pd.compile("pattern p { causal }")
    with pytest.raises(PatternError, match="Lq != Lk"):
        D.attention(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 6, 4), torch.zeros(1, 1, 6, 4), p)
    with pytest.raises(PatternError, match="strategy"):
        D.shard(p, 100, 2, "zigzag")
    lay = D.shard(p, 100, 2)
    with pytest.raises(PatternError, match="seq_len"):
        D.cost(p, 200, 2, lay)


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_rank(rank, world, case):
    src, seq_len, strategy, block, heads, kv_heads, inputs = case
    p = pd.compile(src)
    gen = torch.Generator().manual_seed(len(src) + seq_len)
    batch, dim = 2, 8
    q = torch.randn(batch, heads, seq_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq_len, dim, dtype=torch.float64, generator=gen, requires_grad=True)
    dout = torch.randn(batch, heads, seq_len, dim, dtype=torch.float64, generator=gen)
    dlse = torch.randn(batch, heads, seq_len, dtype=torch.float64, generator=gen)
    if strategy is None:  # layout=None: contiguous in tiles of 128, the length from the shards
        lay, given = D.shard(p, seq_len, world, "contiguous", heads=heads, **inputs), None
        block = 128
    else:
        lay = given = D.shard(p, seq_len, world, strategy, block=block, heads=heads, **inputs)
    idx = lay.indices(rank)
    ql, kl, vl = (t.detach()[:, :, idx].clone().requires_grad_() for t in (q, k, v))
    out, lse = D.attention(ql, kl, vl, p, layout=given, return_lse=True, **inputs)
    torch.autograd.backward((out, lse), (dout[:, :, idx], dlse[:, :, idx]))
    ref, rlse = pd.attention(q, k, v, p, return_lse=True, backend="cpu", **inputs)
    torch.autograd.backward((ref, rlse), (dout, dlse))
    tol = {"atol": 1e-9, "rtol": 1e-9}
    torch.testing.assert_close(out, ref[:, :, idx].detach(), **tol, msg=lambda m: f"{src}: out {m}")
    torch.testing.assert_close(lse, rlse[:, :, idx].detach(), **tol, msg=lambda m: f"{src}: lse {m}")
    torch.testing.assert_close(ql.grad, q.grad[:, :, idx], **tol, msg=lambda m: f"{src}: dq {m}")
    torch.testing.assert_close(kl.grad, k.grad[:, :, idx], **tol, msg=lambda m: f"{src}: dk {m}")
    torch.testing.assert_close(vl.grad, v.grad[:, :, idx], **tol, msg=lambda m: f"{src}: dv {m}")
    predicted = D.cost(p, seq_len, world, lay, batch, kv_heads, dim, torch.float64, block, heads=heads, **inputs)[rank]
    measured = D.last_traffic()
    assert measured["bytes_received"] == predicted.bytes_received, src
    assert measured["bytes_received_backward"] == predicted.bytes_received_backward, src


def _worker(rank, world, port, cases):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for case in cases:
            _check_rank(rank, world, case)
    finally:
        dist.destroy_process_group()


def _launch(world, cases):
    mp.start_processes(_worker, args=(world, _free_port(), cases), nprocs=world, start_method="fork")


def _random_cases(seed: int, count: int, world: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        block = rng.choice([8, 16])
        seq_len = rng.randint(world * block + 1, 12 * block * world // 2)
        if seq_len % (world * block) == 0:
            seq_len += 3
        kv_heads = rng.choice([1, 2])
        heads = kv_heads * rng.choice([1, 2])
        src = f"pattern p {{ {random_source(rng, seq_len)} }}"
        out.append((src, seq_len, rng.choice(["contiguous", "balanced"]), block, heads, kv_heads, {}))
    return out


def test_two_ranks_random_patterns():
    default_layout = ("pattern p { causal & (window(150) | sink(3)) }", 300, None, 128, 2, 1, {})
    _launch(2, [*_random_cases(1, 4, 2), default_layout])


def test_one_rank_and_shard_size_errors(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        _check_rank(0, 1, ("pattern p { causal & window(7) }", 50, "contiguous", 16, 2, 2, {}))
        p = pd.compile("pattern p { causal }")
        lay = D.shard(p, 64, 1, block=16)
        x = torch.zeros(1, 1, 60, 4)
        with pytest.raises(PatternError, match="holds 64 tokens"):
            D.attention(x, x, x, p, layout=lay)
        with pytest.raises(PatternError, match="scale"):
            D.attention(y64 := torch.zeros(1, 1, 64, 4), y64, y64, p, layout=lay, scale="big")
        with pytest.raises(PatternError, match="2 ranks"):
            D.attention(x, x, x, p, layout=D.shard(p, 64, 2, block=16))
        doc = pd.compile("pattern d { input doc: int[token]\n within(doc, causal) }")
        y = torch.zeros(1, 1, 64, 4)
        with pytest.raises(PatternError, match="doc"):
            D.attention(y, y, y, doc, layout=lay)
    finally:
        dist.destroy_process_group()


GRID = "pattern g { layout grid(t = 3, y = 6, x = 7)\n neighborhood((3, 3, 5), causal = (true, false, false)) }"
DOCS = "pattern d { input doc: int[token]\n within(doc, causal & (window(20) | sink(2))) }"
BATCHED_DOCS = "pattern d { input doc: int[batch, token]\n within(doc, causal) }"


def test_four_ranks_random_patterns_grid_and_documents():
    doc = pd.segments([37, 90, 11, 60])
    cases = [
        *_random_cases(2, 2, 4),
        (GRID, 126, "contiguous", 8, 2, 1, {}),
        (DOCS, 198, "documents", 8, 2, 2, {"doc": doc}),
    ]
    _launch(4, cases)


@pytest.mark.slow
def test_four_ranks_many_random_patterns_and_batched_documents():
    batched = torch.stack([pd.segments([37, 90, 11, 60]), pd.segments([100, 98])])
    _launch(4, [*_random_cases(3, 16, 4), (BATCHED_DOCS, 198, "balanced", 16, 2, 1, {"doc": batched})])
