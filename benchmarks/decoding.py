"""Decoding on CPU: one step (Lq = 1) of patterndsl against SDPA over the whole (padded) cache.

Cases (H = 8 query heads over 2 key/value heads, D = 64, float32), as issue 14 asks:
causal at Lk = 1K, 8K, 32K; ``causal & window(4096)`` at 32K and 128K; StreamingLLM
(``causal & (window(4096) | sink(4))``) at 128K; a batch of 8 with lengths from 1K to 32K
(``kv_lengths=``) against SDPA over the padded cache with a key-padding mask; the same steps
through a paged cache (``block_table=``, page size 16, pages in order: read in place; float32 steps run the
native decoding kernel where it is built, which the first line says); a MoBA
``route`` step through a ``PagedKVCache`` (blocks chosen from the summaries the cache keeps); compiled
FlexAttention where it runs (``--flex``). It checks each patterndsl result against SDPA restricted
to the same keys, prints medians and the ratios (patterndsl time / SDPA time: below 1 is faster), the first call (which
builds the plan family's member at the next power of two) and a call at a new length of the same
member (tile lists only, no planning; steady-state times reuse the tile lists of the same
lengths, as every layer of a model's decoding step does), and the memory a
``PagedKVCache`` holds for StreamingLLM as the generation grows.

Usage: ``python benchmarks/decoding.py [--quick] [--reps N] [--threads N] [--flex]``. Timings on a
shared machine are provisional.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patterndsl as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing import timed

H, HKV, D = 8, 2, 64
CAUSAL = "pattern causal_ { causal }"
WINDOW = "pattern window_(w = 4096) { causal & window(w) }"
STREAMING = "pattern streaming(w = 4096, n = 4) { causal & (window(w) | sink(n)) }"
MOBA = """pattern moba(c = 512) {
    causal & (blocks(c) | route(topk = 2, block = c, qblock = 1, among = causal - blocks(c)))
}"""


def median_us(fn, reps: int) -> float:
    """Median microseconds of ``reps`` calls after a warm-up (``benchmarks/routing.py``'s timer)."""
    return timed(fn, reps) * 1e6


def sdpa_keys(q, k, v, keep):
    """SDPA of one query row over the keys ``keep`` selects (bool ``[Lk]``): the reference."""
    return F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep], enable_gqa=True)


def allowed_keys(p, kv_len):
    """The keys the last query attends (``Pattern.mask`` on one row would build Lk entries: cheap)."""
    from patterndsl import semantics

    node = p.ir.node_for_head(0)
    ctx = semantics.Context(1, kv_len, None)
    return semantics.evaluate(node, torch.zeros(1, 1, dtype=torch.int64), torch.arange(kv_len)[None], 0, ctx)[0]


def paged_copy(k, v, lengths, page_size):
    b, hkv, _, d = k.shape
    counts = [-(-int(n) // page_size) for n in lengths]
    table = torch.full((b, max(counts)), -1, dtype=torch.int64)
    kp = torch.empty(sum(counts), hkv, page_size, d)
    vp = torch.empty_like(kp)
    nxt = 0
    for i, n in enumerate(counts):
        for p in range(n):
            table[i, p] = nxt
            seg = slice(p * page_size, min((p + 1) * page_size, int(lengths[i])))
            width = seg.stop - seg.start
            kp[nxt, :, :width] = k[i, :, seg]
            vp[nxt, :, :width] = v[i, :, seg]
            nxt += 1
    return kp, vp, table


def flex_step(q, k, v, pattern_mod, kv_len):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lk = k.shape[2]

    def mask_mod(b, h, qi, kj):
        return pattern_mod(qi + kv_len - 1, kj) & (kj < kv_len)

    bm = create_block_mask(mask_mod, None, None, 1, lk, device="cpu")
    fn = torch.compile(flex_attention)
    return lambda: fn(q, k, v, block_mask=bm, enable_gqa=True)


def case(name, source, kv_len, batch, reps, flex, lengths=None):
    p = pd.compile(source)
    g = torch.Generator().manual_seed(0)
    lk = kv_len
    q = torch.randn(batch, H, 1, D, generator=g)
    k = torch.randn(batch, HKV, lk, D, generator=g)
    v = torch.randn(batch, HKV, lk, D, generator=g)
    lengths = torch.full((batch,), lk) if lengths is None else lengths
    t0 = time.perf_counter()
    p(q, k, v, kv_lengths=lengths)  # the first call builds the plan family's member for these lengths
    first = (time.perf_counter() - t0) * 1e3
    p(q, k, v, kv_lengths=lengths - 1)  # a new length in the same family: tile lists only
    t0 = time.perf_counter()
    p(q, k, v, kv_lengths=lengths - 2)
    new_len = (time.perf_counter() - t0) * 1e6
    ours = median_us(lambda: p(q, k, v, kv_lengths=lengths), reps)
    out = p(q, k, v, kv_lengths=lengths)
    if batch == 1:
        sdpa = median_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    else:
        pad = (torch.arange(lk)[None] < lengths[:, None])[:, None, None]
        sdpa = median_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=pad, enable_gqa=True), reps)
    err = 0.0
    for b in range(batch):
        n = int(lengths[b])
        keep = allowed_keys(p, n)
        ref = sdpa_keys(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], keep)
        err = max(err, float((out[b : b + 1] - ref).abs().max()))
    kp, vp, table = paged_copy(k, v, lengths, 16)
    paged = median_us(lambda: p(q, kp, vp, kv_lengths=lengths, block_table=table), reps)
    line = (
        f"{name:<34} ours {ours:>9.0f} us  paged {paged:>9.0f} us  sdpa {sdpa:>9.0f} us  "
        f"ratio {ours / sdpa:>5.2f}  paged ratio {paged / sdpa:>5.2f}  max err {err:.1e}  "
        f"first call {first:.0f} ms, new length {new_len:.0f} us"
    )
    if flex and batch == 1:
        try:
            mods = {
                CAUSAL: lambda qi, kj: qi >= kj,
                WINDOW: lambda qi, kj: (qi >= kj) & (qi - kj <= 4096),
                STREAMING: lambda qi, kj: (qi >= kj) & ((qi - kj <= 4096) | (kj < 4)),
            }
            fn = flex_step(q, k, v, mods[source], kv_len)
            fl = median_us(fn, reps)
            line += f"  flex {fl:>9.0f} us (ratio vs flex {ours / fl:.2f})"
        except Exception as exc:
            line += f"  flex: did not run ({type(exc).__name__})"
    print(line, flush=True)
    return ours / sdpa, paged / sdpa


def route_case(kv_len, reps):
    """A MoBA decoding step through a ``PagedKVCache``: the blocks are chosen for the new query from the block
    summaries the cache keeps; against SDPA over the whole cache and the same step with the summaries unused
    (the element-by-element path, which pools every key block again)."""
    from patterndsl import kvcache

    p = pd.compile(MOBA)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, HKV, kv_len, D, generator=g)
    v = torch.randn(1, HKV, kv_len, D, generator=g)
    q = torch.randn(1, H, 1, D, generator=g)
    cache = pd.PagedKVCache(p, kv_len // 16 + 1, 16, HKV, D)
    cache.append(k, v)
    kp, vp, table, lengths = cache.view()
    ours = median_us(lambda: p(q, kp, vp, block_table=table, kv_lengths=lengths), reps)
    out = p(q, kp, vp, block_table=table, kv_lengths=lengths)
    sdpa = median_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), reps)
    want = p(q, k, v)  # the ordinary call over the unpaged cache
    cache.k = cache.k.clone()  # the cache no longer owns kp: the call takes the general path
    general = median_us(lambda: p(q, kp, vp, block_table=table, kv_lengths=lengths), 3)
    del kvcache
    print(
        f"{'MoBA (route) step, Lk=' + str(kv_len // 1024) + 'K':<34} ours {ours:>9.0f} us  sdpa {sdpa:>9.0f} us  "
        f"ratio {ours / sdpa:>5.2f}  without summaries {general:>9.0f} us  max err "
        f"{float((out - want).abs().max()):.1e}",
        flush=True,
    )
    return ours / sdpa


def streaming_memory(tokens_list, page_size=16, w=4096):
    p = pd.compile(STREAMING, w=w)
    pages = 1 + (w + 256) // page_size + 3  # sinks, the window and one append of 256
    cache = pd.PagedKVCache(p, pages, page_size, HKV, D)
    kn = torch.randn(1, HKV, 256, D)
    pages = []
    done = 0
    for target in tokens_list:
        while done < target:
            n = min(256, target - done)
            cache.append(kn[:, :, :n], kn[:, :, :n])
            done += n
        held = cache.pages_in_use() * 2 * HKV * page_size * D * 4
        print(
            f"  StreamingLLM cache after {target:>7} tokens: {cache.pages_in_use():>4} pages, {held / 2**20:6.2f} MiB"
        )
        pages.append(cache.pages_in_use())
    return pages


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--flex", action="store_true", help="also time compiled FlexAttention (slow to compile)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; H={H}, Hkv={HKV}, D={D}, fp32")
    from patterndsl.runtime.cpu.native import build, decoding

    probe = torch.zeros(1, H, 1, D)
    served = decoding.serves(probe, probe[:, :HKV], probe[:, :HKV])
    print(f"native decoding kernel: {'used' if served else 'not used (' + str(build.last_reason[0]) + ')'}")
    scale = 16 if args.quick else 1
    ratios = {}
    ratios["causal 1K"], ratios["paged 1K"] = case("causal, Lk=1K", CAUSAL, 1024 // scale, 1, args.reps, args.flex)
    ratios["causal 8K"], ratios["paged 8K"] = case("causal, Lk=8K", CAUSAL, 8192 // scale, 1, args.reps, args.flex)
    ratios["causal 32K"], _ = case("causal, Lk=32K", CAUSAL, 32768 // scale, 1, args.reps, args.flex)
    ratios["window 32K"], _ = case("causal & window(4096), Lk=32K", WINDOW, 32768 // scale, 1, args.reps, args.flex)
    ratios["window 128K"], _ = case("causal & window(4096), Lk=128K", WINDOW, 131072 // scale, 1, args.reps, args.flex)
    ratios["streaming 128K"], _ = case("StreamingLLM, Lk=128K", STREAMING, 131072 // scale, 1, args.reps, args.flex)
    lengths = torch.linspace(1024 // scale, 32768 // scale, 8).long()
    ratios["ragged B=8"], _ = case("causal, B=8, Lk 1K..32K", CAUSAL, 32768 // scale, 8, args.reps, False, lengths)
    ratios["moba 32K"] = route_case(32768 // scale, args.reps)
    held = streaming_memory([1024, 8192, 32768] if args.quick else [8192, 32768, 131072])
    print("targets (ratio = patterndsl / SDPA):")
    for name, want, ok in (
        ("causal 1K", "<= 2", ratios["causal 1K"] <= 2),
        ("paged 1K", "<= 2", ratios["paged 1K"] <= 2),
        ("paged 1K", "<= 1.5 (aim)", ratios["paged 1K"] <= 1.5),
        ("causal 32K", "<= 1.1", ratios["causal 32K"] <= 1.1),
        ("window 128K", "<= 0.1", ratios["window 128K"] <= 0.1),
        ("ragged B=8", "<= 0.5", ratios["ragged B=8"] <= 0.5),
    ):
        print(f"  {name:<12} {ratios[name]:6.2f} (want {want}): {'met' if ok else 'MISSED'}")
    steady = held[-1] == held[-2]
    print(f"  StreamingLLM cache pages {held} (want constant once past the window): {'met' if steady else 'MISSED'}")


if __name__ == "__main__":
    main()
