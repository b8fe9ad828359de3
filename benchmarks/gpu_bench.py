"""Benchmark: patterndsl's generated Triton kernels vs FlexAttention and SDPA on a CUDA GPU.

For each pattern, times forward and forward+backward of
``patterndsl.attention`` (generated kernels), of FlexAttention given the same
pattern as a ``mask_mod`` (its dense mask indexed inside the mask_mod, with a
block mask built once outside the timing), and of SDPA (dense: causal when the
pattern is causal-shaped, else full attention). Prints milliseconds, TFLOP/s
of useful work (``4 * D`` FLOPs per allowed (query, key) pair per batch and
head for the forward, 2.5x that for the backward, the usual convention) and
the ratios patterndsl / FlexAttention and patterndsl / SDPA (below 1 is faster).
On a machine without CUDA it says so and exits 0.

Usage: python benchmarks/gpu_bench.py [--seq 4096] [--heads 16] [--dim 64] [--batch 2]
       [--dtype float16|bfloat16] [--only causal,streaming] [--iters 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

PATTERNS = {
    "causal": ("pattern causal_lm { causal }", True),
    "sliding_window": ("pattern swa(span = 512) { causal & window(span) }", True),
    "streaming": ("pattern streaming(span = 1024, sinks = 4) { causal & (window(span) | sink(sinks)) }", True),
    "dilated": ("pattern dil { causal & window(256, dilation = 4) }", True),
    "bigbird": ("pattern bigbird { blocks(64) | window(64, 64) | global(64) | random(3, 64, seed = 7) }", False),
    "neighborhood_2d": ("pattern natten(side = 64) { layout grid(y = side, x = side)\n neighborhood(13) }", False),
}


def _time(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs after warm-up, with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _flex(mask: torch.Tensor, seq: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[0, q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device="cuda")
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _case(name: str, source: str, causal: bool, args) -> dict:
    import patterndsl

    dtype = getattr(torch, args.dtype)
    seq = args.seq
    if name == "neighborhood_2d":
        side = int(seq**0.5)
        seq = side * side
        pattern = patterndsl.compile(source, side=side)
    else:
        pattern = patterndsl.compile(source)
    # Every pattern here treats all heads alike, so one head's mask serves them all.
    mask = pattern.mask(seq, seq, 1).cuda()
    allowed = int(mask.sum()) * args.heads
    fwd_flops = 4 * args.dim * allowed * args.batch
    shape = (args.batch, args.heads, seq, args.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=dtype)

    flex = _flex(mask, seq)
    impls = {
        "patterndsl": lambda: pattern(q, k, v),
        "flex": lambda: flex(q, k, v),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    row = {"pattern": name, "seq": seq, "density": allowed / (args.heads * seq * seq)}
    for impl, fn in impls.items():
        row[f"{impl}_fwd"] = _time(lambda fn=fn: fn(), args.iters)
        row[f"{impl}_fwdbwd"] = _time(lambda fn=fn: fn().backward(dout), args.iters)
    row["tflops_fwd"] = fwd_flops / row["patterndsl_fwd"] / 1e9
    row["tflops_fwdbwd"] = 3.5 * fwd_flops / row["patterndsl_fwdbwd"] / 1e9
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--only", default="", help="comma-separated pattern names: " + ", ".join(PATTERNS))
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device on this machine; nothing to time (the kernels are checked by the AOT tests).")
        return 0
    names = [n for n in args.only.split(",") if n] or list(PATTERNS)
    unknown = [n for n in names if n not in PATTERNS]
    if unknown:
        parser.error(f"unknown pattern(s) {unknown}; choose from {list(PATTERNS)}")
    print(f"device: {torch.cuda.get_device_name()}  batch={args.batch} heads={args.heads} dim={args.dim} {args.dtype}")
    head = (
        f"{'pattern':<16} {'seq':>6} {'dens':>6} | {'fwd ms':>7} {'TF/s':>6} {'/flex':>6} {'/sdpa':>6} |"
        f" {'f+b ms':>7} {'TF/s':>6} {'/flex':>6} {'/sdpa':>6}"
    )
    print(head)
    print("-" * len(head))
    for name in names:
        source, causal = PATTERNS[name]
        r = _case(name, source, causal, args)
        print(
            f"{name:<16} {r['seq']:>6} {r['density']:>6.3f} | {r['patterndsl_fwd']:>7.3f} {r['tflops_fwd']:>6.1f}"
            f" {r['patterndsl_fwd'] / r['flex_fwd']:>6.2f} {r['patterndsl_fwd'] / r['sdpa_fwd']:>6.2f} |"
            f" {r['patterndsl_fwdbwd']:>7.3f} {r['tflops_fwdbwd']:>6.1f}"
            f" {r['patterndsl_fwdbwd'] / r['flex_fwdbwd']:>6.2f} {r['patterndsl_fwdbwd'] / r['sdpa_fwdbwd']:>6.2f}"
        )
    print("ratios: patterndsl time / other time (below 1 = patterndsl faster); TF/s counts allowed pairs only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
