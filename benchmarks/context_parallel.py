"""Context parallelism: bytes per rank and work balance from the plan, and a measured run on 4 gloo ranks.

Part 1 (computed, ``patterndsl.distributed.cost`` on the plan alone, no tensors): for each
pattern, sequence length (1M-16M tokens) and rank count (8-1,024), the layout ``shard`` picks
(contiguous vs balanced zigzag by the largest per-rank work, then traffic), the largest and
mean key/value bytes a rank receives in the forward against an all-gather (torch's Flex CP,
``flex_cp_allgather``: every rank receives every other rank's keys and values) and a ring
(ring attention moves the same volume in ``world - 1`` steps), and max/mean visited tiles.
"x fewer" compares the all-gather with our largest per-rank bytes (causal: the rank holding the
last tokens reads every earlier key, so its bytes equal the all-gather's; the mean is lower).
B=1, 8 KV heads, D=128, bfloat16, tiles of 128. Patterns: causal; causal & window(4096);
StreamingLLM (window 4096 + 4 sinks); Longformer-style window(512, 512) | global(256); a 3-D
video neighborhood (frames of 256x256, neighborhood (3, 7, 7)); packed causal documents of
8K tokens (``causal & blocks(8192)``, the static twin of ``within(doc, causal)`` for equal
documents) and, at 256K tokens only, packed causal documents of random lengths through the
run-time input (``within(doc, causal)``: the call-time plan is dense in tiles, so it is not run
at 1M+).

Part 2 (measured): 4 local gloo processes, ``causal & window(4096)`` at L tokens (64K by
default), B=1, H=4, D=64, float32: ``patterndsl.distributed.attention`` forward (and forward +
backward) against all-gather of K/V followed by the same local attention over the gathered keys
(the Flex CP recipe), slowest rank, median of the repeats.

Targets (issue 16): causal & window(4096) at 1M tokens on 8 ranks >= 50x fewer bytes per rank
than the all-gather; causal max/mean visited tiles <= 1.05 with the balanced layout; the 4-rank
run at 64K faster than all-gather + local attention. Timings on a loaded machine are
provisional.

Run: ``python benchmarks/context_parallel.py [--lengths 1M,4M,16M] [--ranks 8,64,1024]
[--measure 65536] [--repeat 3] [--no-measure]``
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import patterndsl as pd
from patterndsl import distributed
from patterndsl.distributed import layout as layouts
from patterndsl.distributed import parallel as cp
from patterndsl.distributed import traffic

B, KV_HEADS, DIM, ITEM = 1, 8, 128, 2
TOKEN_BYTES = 2 * B * KV_HEADS * DIM * ITEM


def patterns(seq_len: int) -> list[tuple[str, pd.Pattern]]:
    frames = seq_len // (256 * 256)
    return [
        ("causal", pd.compile("pattern p { causal }")),
        ("causal & window(4096)", pd.compile("pattern p { causal & window(4096) }")),
        ("StreamingLLM", pd.compile("pattern p { causal & (window(4096) | sink(4)) }")),
        ("Longformer", pd.compile("pattern p { window(512, 512) | global(256) }")),
        (
            "video 3-D",
            pd.compile(f"pattern v {{ layout grid(t = {frames}, y = 256, x = 256)\n neighborhood((3, 7, 7)) }}"),
        ),
        ("packed docs 8K", pd.compile("pattern p { causal & blocks(8192) }")),
    ]


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * scale


def computed(lengths: list[int], ranks: list[int]) -> None:
    print("== computed by cost() from the plan (B=1, 8 KV heads, D=128, bf16, tiles of 128) ==")
    head = f"{'pattern':<22}{'tokens':>7}{'ranks':>6} {'layout':<11}{'max MiB':>9}{'mean MiB':>9}"
    print(head + f"{'all-gather':>11}{'ring':>9}{'x fewer':>9}{'max/mean tiles':>15}{'plan s':>8}")
    for seq_len in lengths:
        for name, pattern in patterns(seq_len):
            t0 = time.perf_counter()
            vis = traffic.plan_visits(pattern, seq_len, 1, 128, {})
            plan_s = time.perf_counter() - t0
            for world in ranks:
                _row(name, seq_len, world, vis, plan_s)
    _documents_row(1 << 18, 8)


def _row(name, seq_len, world, vis, plan_s, starts=None) -> None:
    best = None
    makers = [layouts.contiguous(seq_len, world, 128), layouts.balanced(seq_len, world, 128)]
    if starts is not None:
        makers.append(layouts.documents(seq_len, world, 128, starts, vis.work()))
    for layout in makers:
        costs = traffic.rank_costs(vis, layout, TOKEN_BYTES)
        tiles = np.array([c.tiles for c in costs])
        key = (tiles.max(), max(c.bytes_received for c in costs))
        if best is None or key < best[0]:
            best = (key, layout, costs, tiles)
    _, layout, costs, tiles = best
    most = max(c.bytes_received for c in costs)
    mean = sum(c.bytes_received for c in costs) / world
    fewest = min(layout.indices_count(r) for r in range(world))
    gather = (seq_len - fewest) * TOKEN_BYTES  # the rank holding the fewest tokens receives the most
    ring = gather  # ring attention: world - 1 steps, each the neighbour's shard
    ratio = f"{gather / most:8.1f}x" if most else "   (none)"
    print(
        f"{name:<22}{_size(seq_len):>7}{world:>6} {layout.strategy:<11}{most / 2**20:>9.1f}{mean / 2**20:>9.1f}"
        f"{gather / 2**20:>11.0f}"
        f"{ring / 2**20:>9.0f}{ratio:>9}{tiles.max() / tiles.mean():>15.3f}{plan_s:>8.2f}"
    )


def _documents_row(seq_len: int, world: int) -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(1024, 32768, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - seq_len
    doc = pd.segments(lengths)
    pattern = pd.compile("pattern p { input doc: int[token]\n within(doc, causal) }")
    t0 = time.perf_counter()
    vis = traffic.plan_visits(pattern, seq_len, 1, 128, {"doc": doc})
    plan_s = time.perf_counter() - t0
    starts = layouts.within_starts(pattern, seq_len, {"doc": doc})
    _row(f"packed docs ({len(lengths)})", seq_len, world, vis, plan_s, starts)


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


# --------------------------------------------------------------------------- measured


def _allgather_attention(q, k, v, ex, masks, scale, world, layout):
    """Flex CP's recipe: all-gather K and V, then the local queries against the keys they read."""
    ks = [torch.empty(k.shape[0], k.shape[1], layout.indices_count(r), k.shape[3]) for r in range(world)]
    vs = [torch.empty_like(x) for x in ks]
    dist.all_gather(ks, k)
    dist.all_gather(vs, v)
    order = torch.cat([layout.indices(r) for r in range(world)])
    kf = torch.empty(k.shape[0], k.shape[1], layout.seq_len, k.shape[3])
    vf = torch.empty_like(kf)
    kf[:, :, order] = torch.cat(ks, 2)
    vf[:, :, order] = torch.cat(vs, 2)
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    lpos = ex.positions[ex.local_keys]
    for c in ex.chunks:
        keys = torch.sort(torch.cat([lpos[c.local], ex.remote_positions[c.remote]])).values
        mask = masks(ex.positions[c.a : c.b], keys)
        out[:, :, c.a : c.b] = cp._part(q[:, :, c.a : c.b], kf[:, :, keys], vf[:, :, keys], mask, scale)[0]
    return out


def _measure_worker(rank, world, port, seq_len, repeat, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pattern = pd.compile("pattern p { causal & window(4096) }")
    layout = distributed.shard(pattern, seq_len, world)
    n = layout.indices_count(rank)
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, 4, n, 64, generator=gen)
    k = torch.randn(1, 4, n, 64, generator=gen)
    v = torch.randn(1, 4, n, 64, generator=gen)
    ex, masks = cp._exchange(pattern, layout, rank, 4, 1, {}, None)
    times = {"ours forward": [], "all-gather + local forward": [], "ours forward + backward": []}

    def timed(key, fn):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        took = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times[key].append(float(took))

    def fwd_bwd():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        distributed.attention(qq, kk, vv, pattern, layout=layout).sum().backward()

    with torch.no_grad():
        distributed.attention(q, k, v, pattern, layout=layout)  # warm the exchange cache
    for _ in range(repeat):
        with torch.no_grad():
            timed("ours forward", lambda: distributed.attention(q, k, v, pattern, layout=layout))
            timed("all-gather + local forward", lambda: _allgather_attention(q, k, v, ex, masks, 0.125, world, layout))
        timed("ours forward + backward", fwd_bwd)
    if rank == 0:
        results.put({key: statistics.median(val) for key, val in times.items()})
        results.put(distributed.last_traffic())
    dist.destroy_process_group()


def measured(seq_len: int, repeat: int) -> None:
    world = 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    mp.start_processes(_measure_worker, args=(world, port, seq_len, repeat, results), nprocs=world, start_method="fork")
    times, moved = results.get(), results.get()
    print(f"\n== measured: 4 gloo processes, causal & window(4096), L={_size(seq_len)}, B=1 H=4 D=64 fp32 ==")
    for key, value in times.items():
        print(f"{key:<30}{value * 1e3:>10.0f} ms (slowest rank, median of {repeat})")
    ratio = times["all-gather + local forward"] / times["ours forward"]
    print(f"forward speed-up over all-gather + local attention: {ratio:.2f}x")
    token = 2 * 4 * 64 * 4
    print(
        f"rank 0 received {moved['bytes_received'] / 2**20:.2f} MiB forward, "
        f"{moved['bytes_received_backward'] / 2**20:.2f} MiB dK/dV; an all-gather moves "
        f"{(seq_len - seq_len // world) * token / 2**20:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1M,4M,16M")
    parser.add_argument("--ranks", default="8,64,1024")
    parser.add_argument("--measure", default="64K", help="tokens of the measured 4-rank run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-measure", action="store_true")
    args = parser.parse_args()
    computed([_parse_size(x) for x in args.lengths.split(",")], [int(x) for x in args.ranks.split(",")])
    print("\n== cost() at 16M tokens on 1,024 ranks (CPU seconds, time.process_time) ==")
    for name, pattern in patterns(1 << 24):
        t0 = time.process_time()
        big = distributed.cost(pattern, 1 << 24, 1024, batch=B, kv_heads=KV_HEADS, head_dim=DIM, block=128)
        print(f"{name:<22}{time.process_time() - t0:>8.2f} s CPU, {len(big)} records")
    if not args.no_measure:
        measured(_parse_size(args.measure), args.repeat)


if __name__ == "__main__":
    main()
