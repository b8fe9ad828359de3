"""Plan time and peak memory of a causal sliding window vs FlexAttention's ``create_block_mask``.

For L = 16K, 128K and 1M tokens (128x128 tiles) this times ``Pattern.plan`` for
``causal & window(1023)`` and FlexAttention's ``create_block_mask`` with the
same mask_mod on the CPU (only where its L x L evaluation fits in memory), each
in a fresh subprocess so the memory numbers start from the interpreter's
baseline (after imports and a small warm-up), and prints them side by side
with their ratios. Targets for the plan: 1M tokens in under 50 ms and under
64 MB above the baseline; time linear in L.

It also times ``compile`` of long unions and intersections (the canonical order of their
terms): 200, 1,000 and 10,000 terms as one flat source expression, and 1,000 terms joined
by ``|`` / ``&`` one at a time through the Python operators. Target: 1,000 terms in under
0.5 s either way; the script exits with status 1 when that target is missed.

Run: ``python benchmarks/plan_scaling.py [--repeat 5] [--flex-max 16384] [--compile-only]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WINDOW = 1023
BLOCK = 128
SIZES = (16 * 1024, 128 * 1024, 1024 * 1024)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, length: int, repeat: int) -> dict:
    """Measure one (implementation, length) in this process; returns the numbers as a dict."""
    import tracemalloc

    if kind == "patterndsl":
        import patterndsl as pd

        pattern = pd.compile(f"pattern s {{ causal & window({WINDOW}) }}")

        def run():
            return pattern.plan(length, block=(BLOCK, BLOCK))

        pattern.plan(4096, block=(BLOCK, BLOCK))  # warm-up: imports, sympy, caches
    else:
        from torch.nn.attention.flex_attention import create_block_mask

        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)

        def run():
            return create_block_mask(sliding, None, None, length, length, device="cpu", BLOCK_SIZE=BLOCK)

        create_block_mask(sliding, None, None, 1024, 1024, device="cpu", BLOCK_SIZE=BLOCK)
    base = _rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = run()
    first = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak = _peak_rss_mb() - base
    del out
    times = [first]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        del out
    times.sort()
    return {"ms": times[len(times) // 2] * 1e3, "traced_mb": traced / 2**20, "rss_mb": max(peak, 0.0)}


def measure(kind: str, length: int, repeat: int, timeout: float) -> dict | None:
    """Run :func:`child` in a subprocess (fresh baseline); None when it failed or ran out of time/memory."""
    cmd = [sys.executable, __file__, "--child", kind, str(length), str(repeat)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-2000:])
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


#: Terms of the long unions / intersections timed by :func:`compile_scaling`, and the target.
CHAIN_TERMS = (200, 1000, 10_000)
CHAIN_TARGET = (1000, 0.5)


def compile_scaling() -> bool:
    """Print compile times of long unions / intersections; True when the 1,000-term target is met."""
    import patterndsl as pd

    pd.compile("pattern warm { causal | window(2) }")
    ok = True
    print("compile of long unions / intersections (window(1) .. window(n)), seconds")
    print(f"{'terms':>7s} | {'flat |':>8s} {'flat &':>8s} | {'one by one |':>12s} {'one by one &':>12s}")
    for n in CHAIN_TERMS:
        terms = [f"window({i + 1})" for i in range(n)]
        row = []
        for op in ("|", "&"):
            t0 = time.perf_counter()
            pd.compile("pattern p { " + f" {op} ".join(terms) + " }")
            row.append(time.perf_counter() - t0)
        if n <= CHAIN_TARGET[0]:
            leaves = [pd.compile(f"pattern p {{ {t} }}").ir.default for t in terms]
            for op in ("|", "&"):
                t0 = time.perf_counter()
                acc = leaves[0]
                for leaf in leaves[1:]:
                    acc = (acc | leaf) if op == "|" else (acc & leaf)
                row.append(time.perf_counter() - t0)
        cells = " ".join(f"{t:8.3f}" for t in row[:2]) + " | " + " ".join(f"{t:12.3f}" for t in row[2:])
        print(f"{n:7d} | {cells}")
        if n == CHAIN_TARGET[0] and max(row) >= CHAIN_TARGET[1]:
            ok = False
    print(f"target: {CHAIN_TARGET[0]} terms in under {CHAIN_TARGET[1]} s: {'met' if ok else 'MISSED'}")
    return ok


def main() -> None:
    """Measure every size for both implementations and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--flex-max", type=int, default=16 * 1024, help="largest L for create_block_mask")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--compile-only", action="store_true", help="only time compiling long unions")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, length, repeat = args.child
        print(json.dumps(child(kind, int(length), int(repeat))))
        return
    chains_ok = compile_scaling()
    if args.compile_only:
        sys.exit(0 if chains_ok else 1)
    print()
    print(f"causal & window({WINDOW}), {BLOCK}x{BLOCK} tiles, median of {args.repeat} runs; memory above baseline")
    head = f"{'L':>9s} | {'plan ms':>9s} {'traced MB':>9s} {'RSS MB':>7s} | {'flex ms':>9s} {'flex MB':>8s} |"
    print(head + f" {'time ratio':>10s} {'mem ratio':>9s}")
    ours_prev = None
    for length in SIZES:
        ours = measure("patterndsl", length, args.repeat, args.timeout)
        flex = measure("flex", length, max(1, args.repeat // 2), args.timeout) if length <= args.flex_max else None
        o = f"{ours['ms']:9.2f} {ours['traced_mb']:9.2f} {ours['rss_mb']:7.1f}" if ours else f"{'failed':>27s}"
        if flex:
            f = f"{flex['ms']:9.1f} {flex['rss_mb']:8.1f}"
            mem_ratio = flex["rss_mb"] / max(ours["rss_mb"], ours["traced_mb"], 0.1)
            r = f"{flex['ms'] / ours['ms']:9.1f}x {mem_ratio:8.1f}x"
        else:
            f = f"{'(L*L does not fit)':>18s}"
            r = f"{'-':>10s} {'-':>9s}"
        print(f"{length:9d} | {o} | {f} | {r}")
        if ours and ours_prev:
            per = (ours["ms"] / length) / (ours_prev[1] / ours_prev[0])
            print(f"{'':9s}   time per token vs previous size: {per:.2f}x (1.00x = linear)")
        if ours:
            ours_prev = (length, ours["ms"])
    if not chains_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
