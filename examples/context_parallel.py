"""Context parallelism on CPU: one sequence sharded over 4 gloo processes, traffic from the plan.

Launches 4 processes (torch.multiprocessing, gloo on 127.0.0.1), shards an 8K-token sequence
under a StreamingLLM pattern (``causal & (window(1024) | sink(4))``) with
``patterndsl.distributed.shard`` (the layout with the least largest per-rank work), runs
``patterndsl.distributed.attention`` forward and backward on every rank, and checks each
rank's output, log-sum-exp and gradients against single-process attention over the whole
sequence. Then it prints, per rank, the key/value bytes it received (forward) and the dK/dV
bytes it got back (backward), what ``patterndsl.distributed.cost`` predicted from the plan
alone, and what torch's Flex CP all-gather would have moved (every other rank's keys and
values).

Run: ``python examples/context_parallel.py`` (about ten seconds on a quiet machine).
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import patterndsl
from patterndsl import distributed

SOURCE = "pattern streaming(span = 1024, sinks = 4) { causal & (window(span) | sink(sinks)) }"
WORLD, SEQ, BATCH, HEADS, KV_HEADS, DIM = 4, 8192, 1, 4, 2, 64


def worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    pattern = patterndsl.compile(SOURCE)
    gen = torch.Generator().manual_seed(0)  # the same whole tensors on every rank, for the check
    q = torch.randn(BATCH, HEADS, SEQ, DIM, generator=gen, requires_grad=True)
    k = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=gen, requires_grad=True)
    v = torch.randn(BATCH, KV_HEADS, SEQ, DIM, generator=gen, requires_grad=True)
    layout = distributed.shard(pattern, SEQ, WORLD, heads=HEADS)
    idx = layout.indices(rank)
    ql, kl, vl = (t.detach()[:, :, idx].clone().requires_grad_() for t in (q, k, v))

    out, lse = distributed.attention(ql, kl, vl, pattern, layout=layout, return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    measured = distributed.last_traffic()

    ref, ref_lse = patterndsl.attention(q, k, v, pattern, return_lse=True)
    (ref[:, :, idx].square().sum() + ref_lse[:, :, idx].sum()).backward()
    grads = [t.grad.clone() for t in (k, v)]
    for g in grads:  # every rank's loss reaches every key: sum the reference gradients
        dist.all_reduce(g)
    errors = torch.tensor(
        [
            (out - ref[:, :, idx]).abs().max().item(),
            (lse - ref_lse[:, :, idx]).abs().max().item(),
            (ql.grad - q.grad[:, :, idx]).abs().max().item(),
            (kl.grad - grads[0][:, :, idx]).abs().max().item(),
            (vl.grad - grads[1][:, :, idx]).abs().max().item(),
        ]
    )
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)

    predicted = distributed.cost(
        pattern, SEQ, WORLD, layout, BATCH, KV_HEADS, DIM, torch.float32, layout.block, heads=HEADS
    )[rank]
    token_bytes = 2 * BATCH * KV_HEADS * DIM * 4
    all_gather = (SEQ - idx.numel()) * token_bytes
    got = measured["bytes_received"]
    ratio = f"{all_gather / got:.1f}x more" if got else "nothing needed"
    line = (
        f"rank {rank}: {idx.numel()} tokens, {predicted.tiles} tiles; received {got / 2**20:.2f} MiB"
        f" (cost() said {predicted.bytes_received / 2**20:.2f}), dK/dV back "
        f"{measured['bytes_received_backward'] / 2**20:.2f} MiB (said {predicted.bytes_received_backward / 2**20:.2f});"
        f" all-gather {all_gather / 2**20:.2f} MiB ({ratio})"
    )
    lines = [None] * WORLD
    dist.all_gather_object(lines, line)
    if rank == 0:
        balance = layout.report["max_tiles"] / layout.report["mean_tiles"]
        print(f"layout: {layout.strategy}, max/mean visited tiles {balance:.3f}")
        print("\n".join(lines))
        names = ("out", "lse", "dq", "dk", "dv")
        print(
            "max |distributed - single process|: "
            + ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errors.tolist(), strict=True))
        )
        assert errors.max() < 1e-3, "the distributed result differs from single-process attention"
        assert measured["bytes_received"] == predicted.bytes_received
        print("OK: equal to single-process attention; bytes as cost() predicted")
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port,), nprocs=WORLD)


if __name__ == "__main__":
    main()
