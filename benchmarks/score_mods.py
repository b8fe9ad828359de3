"""Score modifiers on the CPU: patterndsl against compiled FlexAttention's ``score_mod``, and against itself.

For B=1, H=8, D=64, float32 at each length (default 4K and 16K) and each case (Gemma 2's softcap
on ``causal & window(1024)``, ALiBi on ``causal``) it prints: patterndsl forward and forward+backward
with the score, patterndsl forward of the same pattern without it, and compiled FlexAttention's
forward with the same ``score_mod`` and block mask (steady state, after its compile), the runs of
one case interleaved round by round. It checks the outputs agree, then prints the ratios the
targets are about and whether each is met: softcap forward / Flex forward (target <= 1.0) and an
additive bias's forward / the unmodified forward (target <= 1.3; ALiBi's bias is g(q) + u(k): on
``causal`` it runs as the fused kernel with one more head column, :mod:`patterndsl.runtime.cpu.augmented`),
and every case's forward against both peers and forward+backward against the unmodified one.

Usage: ``python benchmarks/score_mods.py [--lengths 4096 16384] [--reps N] [--threads N] [--cases ...]
[--forward-only]``.
Timings are medians; on a shared machine read them with the printed load average in mind.
"""

from __future__ import annotations

import argparse
import functools
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


def paired_times(fns: dict, reps: int) -> dict:
    """Per callable, its times over ``reps`` rounds, the callables interleaved within each round (after one
    warm-up call each), so that a change of load on a shared machine hits every one alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def fwd_bwd(p, q, k, v) -> None:
    p(q, k, v).sum().backward()


def ratio(times: dict, a: str, b: str) -> float:
    """The median over rounds of ``a``'s time / ``b``'s time in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--forward-only", action="store_true", help="skip forward+backward (a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    print(f"B={B} H={H} D={D} float32, threads={torch.get_num_threads()}, load average {os.getloadavg()}")
    print("times: medians over rounds; ratios: medians of per-round ratios (the runs interleaved)")
    ratios = []
    for length in args.lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, length, D, generator=gen) for _ in range(3))
        for name in args.cases:
            source, plain_source, score_mod, mask_mod = CASES[name]
            pattern, plain = patterndsl.compile(source), patterndsl.compile(plain_source)
            block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")
            ours = pattern(q, k, v)
            want = flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
            error = (ours - want).abs().max().item()
            del ours, want
            qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
            run = functools.partial
            flex_mod = run(flex, score_mod=score_mod, block_mask=block_mask)
            fns = {"fwd": run(pattern, q, k, v), "plain": run(plain, q, k, v), "flex": run(flex_mod, q, k, v)}
            times = paired_times(fns, args.reps)
            if not args.forward_only:
                fns = {"fb": run(fwd_bwd, pattern, qg, kg, vg), "plain_fb": run(fwd_bwd, plain, qg, kg, vg)}
                times.update(paired_times(fns, args.reps))
            ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
            ms.setdefault("fb", float("nan"))
            ms.setdefault("plain_fb", float("nan"))
            print(
                f"L={length:6d} {name:28s} ours fwd {ms['fwd']:9.1f} ms  fwd+bwd {ms['fb']:9.1f} ms  "
                f"unmodified fwd {ms['plain']:9.1f} ms  fwd+bwd {ms['plain_fb']:9.1f} ms  "
                f"flex fwd {ms['flex']:9.1f} ms  max|ours - flex| {error:.1e}",
                flush=True,
            )
            short = name.split()[0]
            target_flex = 1.0 if short == "softcap" else None
            target_plain = 1.3 if short == "alibi" else None
            ratios.append((length, f"{short} fwd / flex fwd", ratio(times, "fwd", "flex"), target_flex))
            ratios.append((length, f"{short} fwd / unmodified fwd", ratio(times, "fwd", "plain"), target_plain))
            if not args.forward_only:
                ratios.append((length, f"{short} fwd+bwd / unmodified fwd+bwd", ratio(times, "fb", "plain_fb"), None))
    print("\nratios (provisional on a shared machine):")
    for length, what, value, target in ratios:
        verdict = "" if target is None else f"  target <= {target}: {'met' if value <= target else 'NOT met'}"
        print(f"  L={length:6d} {what:50s} {value:6.2f}x{verdict}")


if __name__ == "__main__":
    main()
