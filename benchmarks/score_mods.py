"""Score modifiers on the CPU: patterndsl against compiled FlexAttention's ``score_mod``, and against itself.

For B=1, H=8, D=64, float32 at each length (default 4K and 16K) and each case (Gemma 2's softcap
on ``causal & window(1024)``, ALiBi on ``causal``) it prints: patterndsl forward and forward+backward
with the score, patterndsl forward of the same pattern without it, and compiled FlexAttention's
forward with the same ``score_mod`` and block mask (steady state, after its compile). It checks
the outputs agree, then prints the ratios the targets are about and whether each is met: softcap
forward / Flex forward (target <= 1.0) and an additive bias's forward / the unmodified forward
(target <= 1.3; ALiBi's bias is g(q) + u(k), applied as one row per query tile).

Usage: ``python benchmarks/score_mods.py [--lengths 4096 16384] [--reps N] [--threads N]``.
Timings are medians; on a shared machine read them with the printed load average in mind.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patterndsl

B, H, D = 1, 8, 64
CAP, WINDOW = 50.0, 1024


def _alibi_slope(h):
    return torch.exp2(-8.0 * (h + 1) / H)


CASES = {
    "softcap causal&window(1024)": (
        f"pattern p(cap = {CAP}) {{ causal & window({WINDOW - 1})\n score cap * tanh(s / cap) }}",
        f"pattern p {{ causal & window({WINDOW - 1}) }}",
        lambda score, b, h, q, k: CAP * torch.tanh(score / CAP),
        lambda b, h, q, k: (k <= q) & (q - k < WINDOW),
    ),
    "alibi causal": (
        f"pattern p(n = {H}) {{ causal\n score s - 2.0 ** (-8.0 * (h + 1) / n) * (q - k) }}",
        "pattern p { causal }",
        lambda score, b, h, q, k: score - _alibi_slope(h) * (q - k),
        lambda b, h, q, k: k <= q,
    ),
}


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    print(f"B={B} H={H} D={D} float32, threads={torch.get_num_threads()}, load average {os.getloadavg()}")
    ratios = []
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, length, D, generator=gen) for _ in range(3))
        for name, (source, plain_source, score_mod, mask_mod) in CASES.items():
            pattern, plain = patterndsl.compile(source), patterndsl.compile(plain_source)
            block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
            ours = pattern(q, k, v)
            want = flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
            error = (ours - want).abs().max().item()
            t_fwd = median_time(lambda p=pattern, x=(q, k, v): p(*x), args.reps)
            t_plain = median_time(lambda p=plain, x=(q, k, v): p(*x), args.reps)
            t_flex = median_time(
                lambda m=score_mod, bm=block_mask, x=(q, k, v): flex(*x, score_mod=m, block_mask=bm), args.reps
            )
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

            def fwd_bwd(p=pattern, qg=qg, kg=kg, vg=vg):
                p(qg, kg, vg).sum().backward()

            t_fb = median_time(fwd_bwd, max(1, args.reps - 1))
            print(
                f"L={length:6d} {name:28s} ours fwd {t_fwd * 1e3:9.1f} ms  fwd+bwd {t_fb * 1e3:9.1f} ms  "
                f"unmodified fwd {t_plain * 1e3:9.1f} ms  flex fwd {t_flex * 1e3:9.1f} ms  max|ours - flex| {error:.1e}"
            )
            if name.startswith("softcap"):
                ratios.append((length, "softcap fwd / flex fwd", t_fwd / t_flex, 1.0))
            else:
                ratios.append((length, "alibi fwd / unmodified fwd", t_fwd / t_plain, 1.3))
            ratios.append((length, f"{name} fwd / flex fwd", t_fwd / t_flex, None))
    print("\nratios (provisional on a shared machine):")
    for length, what, ratio, target in ratios:
        verdict = "" if target is None else f"  target <= {target}: {'met' if ratio <= target else 'NOT met'}"
        print(f"  L={length:6d} {what:50s} {ratio:6.2f}x{verdict}")


if __name__ == "__main__":
    main()
