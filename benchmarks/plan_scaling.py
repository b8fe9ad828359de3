"""Plan time and memory of every example pattern vs FlexAttention's ``create_block_mask``.

For every pattern in ``examples/`` and in ``benchmarks/tile_efficiency.py`` (and the grid compositions
of :data:`COMPOSITES` and grid routes of :data:`ROUTES`) this plans at L = 16K, 128K and 1M tokens
(4 heads, 128x128 tiles; grid patterns on a grid scaled to that many tokens, or at their own layout
size when they fix it; every grid case also on an odd grid, :data:`ODD`: 125 x 125 near 16K,
999 x 999 near 1M), each measurement in a fresh subprocess so memory starts from the interpreter's
baseline after imports and a small warm-up plan. Per pattern and length it prints
the plan time (wall clock, and the CPU time of the first run, which a loaded machine inflates
less), the peak memory above the baseline (traced and RSS; the traced peak comes from a second
fresh subprocess, because ``tracemalloc`` slows every allocation and made a 15 ms plan take 70), the non-empty
tiles, the plan time per non-empty tile relative to 16K (1.00x = linear in
non-empty tiles; a ratio above 1.25x, beyond timing noise, is a miss) and the
element evaluations over the pairs in truly partial tiles.
At 16K it times ``create_block_mask`` on the same mask (a ``mask_mod`` that looks
the pattern up in its dense mask, the cheapest mask_mod there is) and prints the
ratio. Targets: every pattern at 16K in at most 20 ms, at 1M in at most 0.5 s and
256 MB; plan time at most linear in non-empty tiles; element evaluations at most 2x
the pairs in truly partial tiles. Misses are listed at the end.

It also times ``compile`` of long unions and intersections (the canonical order of their
terms): 200, 1,000 and 10,000 terms as one flat source expression, and 1,000 terms joined
by ``|`` / ``&`` one at a time through the Python operators. Target: 1,000 terms in under
0.5 s either way; the script exits with status 1 when that target is missed.

Run: ``python benchmarks/plan_scaling.py [--repeat 3] [--sizes 16384,131072,1048576]
[--only NAME,...] [--no-flex] [--compile-only]``
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
BLOCK = 128
HEADS = 4
SIZES = (16 * 1024, 128 * 1024, 1024 * 1024)
TARGET_16K_MS = 20.0
TARGET_1M_MS = 500.0
TARGET_1M_MB = 256.0
TARGET_EVAL_RATIO = 2.0
#: "At most linear in non-empty tiles": plan time per tile at most this multiple of the 16K one (timing noise).
TARGET_PER_TILE = 1.25

#: Patterns planned once before measuring, so lazy imports are not counted as plan time.
WARM_UP = (
    "pattern w { causal & (window(7, dilation = 2) | sink(4) | strided(9)) & ~blocks(5) }",
    "pattern w { where(abs(q // 64 - k // 64) <= 1 or q < 9) | global(64) | random(3, 64, 0) | summary(64, 2) }",
    "pattern w { layout grid(y = 64, x = 64)\n neighborhood(5) | where(k.x // 8 == q.x // 8) }",
    "pattern w { causal & (window(7) | route(topk = 2, block = 16, qblock = 1, among = causal - window(7))) }",
    "pattern w { layout grid(y = 64, x = 64)\n route(topk = 2, block = (8, 8)) }",
    # run-time inputs: the first such plan imports their planner modules (14 ms, most of a 16K plan)
    "pattern w { input d: int[batch, token]\n input n: int[batch]\n within(d, causal & window(7)) | where(k < n) }",
)

#: Grid examples: their layout parameters on a grid of 16K tokens (scaled by doubling the
#: shortest axis for longer sequences).
GRID_PARAMS = {
    "biformer": {"H": 128, "W": 128},
    "halonet": {"H": 128, "W": 128},
    "nat": {"H": 128, "W": 128},
    "video": {"T": 16, "H": 32, "W": 32},
    "swin": {"height": 128, "width": 128},
    "swin_shifted": {"height": 128, "width": 128},
}


#: Grid compositions users write that no example holds: a neighborhood with row attention, with global
#: tokens, and raster-causal (autoregressive image generation); ``(label, source, grid at 16K)``.
COMPOSITES = (
    ("neighborhood + row", "pattern p { layout grid(y = 128, x = 128)\n neighborhood(7) | where(k.y == q.y) }"),
    ("neighborhood + global", "pattern p { layout grid(y = 128, x = 128)\n neighborhood(7) | global(16) }"),
    ("causal neighborhood", "pattern p { layout grid(y = 128, x = 128)\n causal & neighborhood(7) }"),
)

#: Route patterns of issue 19 outside ``examples/`` and the tile-efficiency suite: a grid route whose static
#: part and route are both partial (planned on cells), and routing between 3-D boxes of video frames (two
#: frames by 8 x 8); ``(label, source, grid at 16K or {length: grid})``.
ROUTES = (
    (
        "partial grid route",
        "pattern p { layout grid(y = 128, x = 128)\n"
        " neighborhood(7) | route(topk = 4, block = (8, 8), among = neighborhood(17) - neighborhood(7)) }",
        {"y": 128, "x": 128},
    ),
    (
        "video route",
        "pattern p { layout grid(t = 4, y = 32, x = 128)\n route(topk = 4, block = (2, 8, 8)) }",
        {
            16 * 1024: {"t": 4, "y": 32, "x": 128},
            128 * 1024: {"t": 8, "y": 128, "x": 128},
            1024 * 1024: {"t": 16, "y": 256, "x": 256},
        },
    ),
)


def _scaled(dims: dict, length: int) -> dict | None:
    """``dims`` with axes doubled (shortest first) until they hold ``length`` tokens; None if they cannot
    (``dims`` keyed by lengths: the grid given for ``length``)."""
    if all(isinstance(key, int) for key in dims):
        return dims.get(length)
    dims = dict(dims)
    while math.prod(dims.values()) < length:
        shortest = min(dims, key=dims.get)
        dims[shortest] *= 2
    return dims if math.prod(dims.values()) == length else None


#: Label suffix of a grid case's variant on an odd grid: every axis of ``n >= 40`` cells cut by ``n // 40``,
#: of 16 to 39 cells by 2 (128 x 128 -> 125 x 125, 1024 x 1024 -> 999 x 999, 16 x 32 x 32 -> 14 x 30 x 30),
#: so grid rows no longer hold whole tiles and boxes are cut at the grid's edges, as on the grids users
#: have (NAT's 56 x 56, a video's 30 x 40).
ODD = " (odd grid)"


def _odd(dims: dict | None) -> dict | None:
    """``dims`` cut as :data:`ODD` says; None when no axis changes."""
    if dims is None:
        return None
    out = {axis: n - (n // 40 if n >= 40 else 2 if n >= 16 else 0) for axis, n in dims.items()}
    return None if out == dims else out


def cases() -> list[tuple[str, str, str | None, dict | None]]:
    """``(label, source, pattern name, grid parameters at 16K or None)`` of every pattern measured."""
    out = []
    for path in sorted(EXAMPLES.glob("*.pdsl")):
        source = path.read_text()
        for name in re.findall(r"^pattern (\w+)", source, re.M):
            out.append((f"{path.stem}:{name}", source, name, GRID_PARAMS.get(name)))
    sys.path.insert(0, str(HERE))
    from tile_efficiency import SUITE

    for label, source, _length, _heads in SUITE:
        grid = re.search(r"grid\(([^)]*)\)", source)
        dims = None if grid is None else {k: int(v) for k, v in re.findall(r"(\w+) = (\d+)", grid.group(1))}
        out.append((f"suite:{label}", source, None, dims))
    out.extend((f"grid:{label}", source, None, {"y": 128, "x": 128}) for label, source in COMPOSITES)
    out.extend((f"route:{label}", source, None, dims) for label, source, dims in ROUTES)
    return out + [(label + ODD, *rest) for label, *rest in out if rest[2] is not None]


def _bind(case, length: int):
    """The compiled pattern of ``case`` for ``length`` tokens, or None when the pattern cannot take it."""
    import patterndsl as pd

    label, source, name, dims = case
    if dims is None:
        return pd.compile(source, name)
    scaled = _scaled(dims, length)
    if scaled is not None and label.endswith(ODD):
        scaled = _odd(scaled)
    if scaled is None:
        return None
    if name is not None:
        return pd.compile(source, name, **scaled)
    grid = ", ".join(f"{axis} = {n}" for axis, n in scaled.items())
    return pd.compile(re.sub(r"grid\([^)]*\)", f"grid({grid})", source))


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(kind: str, index: int, length: int, repeat: int) -> dict:
    """Measure one (implementation, pattern, length) in this process; returns the numbers as a dict.

    ``kind`` "patterndsl-memory" plans once under ``tracemalloc`` and returns only its peak.
    """
    import tracemalloc

    import patterndsl as pd

    case = cases()[index]
    pattern = _bind(case, length)
    if pattern is None:
        return {"skipped": True}
    if case[0].endswith(ODD):
        length = pattern.ir.layout.size  # the odd grid's tokens
    elif pattern.ir.layout is not None and pattern.ir.layout.size != length:
        return {"skipped": True}  # a grid fixed by the pattern at another size
    traced_only = kind == "patterndsl-memory"
    kind = "patterndsl" if traced_only else kind
    block = (BLOCK, BLOCK)
    if kind == "patterndsl":

        def run():
            return pattern.plan(length, heads=HEADS, block=block)

        # Warm-up: imports and one-time tables of every kind of rule, on other patterns.
        for src in WARM_UP:
            pd.compile(src).plan(4096, heads=HEADS, block=block)
    else:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask

        from patterndsl import ir, semantics
        from patterndsl.sizes import Sizes

        if any(ir.is_dynamic(n) for n in (pattern.ir.default, *(r.node for r in pattern.ir.heads)) if n is not None):
            return {"skipped": "(data-dependent mask)"}  # route(...): the mask depends on the data
        if pattern.ir.inputs:
            return {"skipped": "(run-time inputs)"}  # its mask_mod would read tensors given per call
        # The dense mask of head 0, built a band of rows at a time (no L x L int64 temporaries).
        node = pattern.ir.node_for_head(0)
        ctx = Sizes(length, length, pattern.ir.layout, HEADS)
        dense = torch.empty(length, length, dtype=torch.bool)
        cols = torch.arange(length)[None, :]
        for r0 in range(0, length, 512):
            rows = torch.arange(r0, min(r0 + 512, length))[:, None]
            dense[r0 : r0 + 512] = semantics.evaluate(node, rows, cols, 0, ctx)

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[q_idx, kv_idx]

        def run():
            return create_block_mask(mask_mod, None, None, length, length, device="cpu", BLOCK_SIZE=BLOCK)

        small = torch.ones(1024, 1024, dtype=torch.bool)
        create_block_mask(lambda b, h, q, k: small[q, k], None, None, 1024, 1024, device="cpu", BLOCK_SIZE=BLOCK)
    if traced_only:
        tracemalloc.start()
        run()
        return {"traced_mb": tracemalloc.get_traced_memory()[1] / 2**20}
    base = _peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    out = run()
    first = time.perf_counter() - t0
    cpu = time.process_time() - c0
    peak = _peak_rss_mb() - base
    numbers = {}
    if kind == "patterndsl":
        st = out.stats
        # full tiles from the runs (reading the tile lists would list every tile of a run-length plan)
        full_tiles = sum(int(((g.runs.hi - g.runs.lo) * (g.runs.state == 2)).sum()) * len(g.heads) for g in out.groups)
        partial_pairs = st.visited_pairs - full_tiles * BLOCK * BLOCK
        numbers = {
            "tiles": st.tiles_full + st.tiles_partial + st.tiles_dynamic,
            "elements": st.elements_evaluated,
            "partial_pairs": max(partial_pairs, 0),
        }
    del out
    times = [first]
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        del out
    times.sort()
    return {
        "length": length,
        "ms": times[len(times) // 2] * 1e3,
        "cpu_ms": cpu * 1e3,
        "rss_mb": max(peak, 0.0),
        **numbers,
    }


def measure(kind: str, index: int, length: int, repeat: int, timeout: float) -> dict | None:
    """Run :func:`child` in a subprocess (fresh baseline); None when it failed or ran out of time/memory.

    For patterndsl a second subprocess measures the traced peak (``traced_mb``).
    """
    numbers = _run_child(kind, index, length, repeat, timeout)
    if kind == "patterndsl" and numbers is not None and "ms" in numbers:
        traced = _run_child("patterndsl-memory", index, length, 1, timeout)
        if traced is None or "traced_mb" not in traced:
            return traced
        numbers["traced_mb"] = traced["traced_mb"]
    return numbers


def _run_child(kind: str, index: int, length: int, repeat: int, timeout: float) -> dict | None:
    """One :func:`child` in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--child", kind, str(index), str(length), str(repeat)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timeout": True}
    if res.returncode != 0:
        if "patterndsl.errors.PatternError" in res.stderr:  # refused up front (e.g. too large to plan)
            return {"timeout": False, "refused": True}
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


#: ``{target: {met: count}}`` of the measurements of :func:`plan_scaling`.
TALLY: dict[str, dict[bool, int]] = {
    name: {True: 0, False: 0} for name in ("16K time", "1M time and memory", "linear in tiles", "element evaluations")
}


def plan_scaling(args) -> list[str]:
    """Print the table for every pattern and length; returns the targets missed."""
    sizes = [int(x) for x in args.sizes.split(",")]
    only = None if not args.only else set(args.only.split(","))
    missed = []
    print(
        f"plans at {HEADS} heads, {BLOCK}x{BLOCK} tiles, median of {args.repeat} runs (1 at 1M); memory above baseline"
    )
    print(
        f"{'pattern':44s} {'L':>8s} | {'plan ms':>9s} {'cpu ms':>8s} {'MB':>7s} {'tiles':>9s} {'per tile':>8s}"
        f" {'eval/part':>9s} | {'flex ms':>9s} {'ratio':>8s}"
    )
    for index, case in enumerate(cases()):
        label = case[0]
        if only and label not in only and label.split(":")[1] not in only:
            continue
        base = None
        for length in sizes:
            repeat = 1 if length >= 1 << 20 else args.repeat
            ours = measure("patterndsl", index, length, repeat, args.timeout)
            if ours is not None and ours.get("skipped"):
                continue
            flex = None
            if length == 16 * 1024 and not args.no_flex:
                flex = measure("flex", index, length, 1, args.timeout)
            if ours is None or "timeout" in ours:
                for target in ("16K time", "1M time and memory"):
                    TALLY[target][False] += length == 16 * 1024 if target == "16K time" else length >= 1 << 20
                why = "failed" if ours is None else "refused" if ours.get("refused") else "timed out"
                print(f"{label:44s} {length:8d} | {why:>9s} (longer sizes not tried)")
                missed.append(f"{label} at {length}: {why}")
                break
            mb = max(ours["rss_mb"], ours["traced_mb"])
            per_tile = ours["ms"] / max(ours["tiles"], 1)
            scale = "" if base is None else f"{per_tile / base:7.2f}x"
            base = per_tile if base is None else base
            ratio = ours["elements"] / ours["partial_pairs"] if ours["partial_pairs"] else 0.0
            tokens = ours.get("length", length)
            row = (
                f"{label:44s} {tokens:8d} | {ours['ms']:9.1f} {ours['cpu_ms']:8.1f} {mb:7.1f} {ours['tiles']:9d} "
                f"{scale:>8s} {ratio:9.3f} |"
            )
            if flex and "ms" in flex:
                row += f" {flex['ms']:9.1f} {flex['ms'] / ours['ms']:7.1f}x"
            elif flex and flex.get("skipped"):
                row += f" {flex['skipped']:>18s}"
            print(row, flush=True)
            if length == 16 * 1024:
                TALLY["16K time"][ours["ms"] <= TARGET_16K_MS] += 1
                if ours["ms"] > TARGET_16K_MS:
                    missed.append(f"{label} at 16K: {ours['ms']:.1f} ms > {TARGET_16K_MS} ms")
            if length >= 1 << 20:
                TALLY["1M time and memory"][ours["ms"] <= TARGET_1M_MS and mb <= TARGET_1M_MB] += 1
                if ours["ms"] > TARGET_1M_MS or mb > TARGET_1M_MB:
                    missed.append(f"{label} at 1M: {ours['ms']:.0f} ms, {mb:.0f} MB")
            if scale:
                TALLY["linear in tiles"][per_tile <= TARGET_PER_TILE * base] += 1
                if per_tile > TARGET_PER_TILE * base:
                    missed.append(f"{label} at {length}: {per_tile / base:.2f}x the 16K plan time per tile")
            TALLY["element evaluations"][ratio <= TARGET_EVAL_RATIO] += 1
            if ratio > TARGET_EVAL_RATIO:
                missed.append(f"{label} at {length}: element evaluations {ratio:.2f}x the partial pairs")
    return missed


def main() -> None:
    """Time long compiles, then plan every pattern at every size and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sizes", default=",".join(str(x) for x in SIZES))
    ap.add_argument("--only", default="", help="comma-separated labels (file:pattern or suite:case) or names")
    ap.add_argument("--no-flex", action="store_true", help="skip create_block_mask")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--compile-only", action="store_true", help="only time compiling long unions")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, index, length, repeat = args.child
        print(json.dumps(child(kind, int(index), int(length), int(repeat))))
        return
    chains_ok = compile_scaling()
    if args.compile_only:
        sys.exit(0 if chains_ok else 1)
    print()
    missed = plan_scaling(args)
    print()
    for target, count in TALLY.items():
        print(f"target {target}: met by {count[True]} of {count[True] + count[False]} measurements")
    print("targets missed:" if missed else "all plan targets met")
    for line in missed:
        print(f"  {line}")
    if not chains_ok or missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
