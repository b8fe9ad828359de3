"""Block efficiency (allowed pairs / pairs in visited tiles) with ``order="auto"`` vs identity order.

Plans a suite of well-known sparse patterns at 128x128 tiles and prints, per
pattern, the efficiency in identity order, in the one token order the planner
chose (``tiles()``), with parts that have their own orders and tile shapes (what
the executors run: ``stats.executed_efficiency``), the ratio of the last to
identity, the plan time and what was chosen; then the geometric mean of the
ratios. Targets (issue 17): geometric mean >= 3x, no case below 1x,
``window(32, 32, dilation = 8) | global(4)`` >= 1.8x.

Then the same for the tiles a GPU runs: the Triton runtime plans at ``PLAN_TILES`` (64 x 64), splits
there, and fits each part into its kernel's launch row (``codegen.passes``; sm_90, float16, head dim 64
by default): the efficiency of those passes against identity order and the single order, both at the
row's tiles (what the kernels would run without parts).

Run: ``python benchmarks/tile_efficiency.py [--block 128] [--length 16384] [--head-dim 64] [--kind forward]``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import patterndsl as pd
from patterndsl.codegen import launch_tiles, passes
from patterndsl.codegen.launch import PLAN_TILES

L = 16384

SUITE = [
    ("causal window", "pattern p { causal & window(1023) }", L, 1),
    ("dilated window", "pattern p { causal & window(255, dilation = 8) }", L, 1),
    ("dilated window (bidir)", "pattern p { window(128, 128, dilation = 4) }", L, 1),
    ("strided", "pattern p { causal & strided(64) }", L, 1),
    ("dilated window + global", "pattern p { window(32, 32, dilation = 8) | global(4) }", L, 1),
    ("sparse transformer strided", "pattern p { causal & (window(127) | strided(128)) }", L, 1),
    ("sparse transformer fixed", "pattern p { causal & (blocks(128) | summary(128, 8)) }", L, 1),
    ("longformer", "pattern p { window(256, 256) | global(16) }", L, 1),
    ("longformer dilated", "pattern p { window(128, 128, dilation = 2) | global(16) }", L, 1),
    ("bigbird", "pattern p { window(191, 192) | global(128) | random(3, 64, seed = 1) }", L, 1),
    ("2-D neighborhood", "pattern p { layout grid(y = 128, x = 128)\n neighborhood(13) }", L, 1),
    (
        "2-D dilated neighborhood",
        "pattern p { layout grid(y = 128, x = 128)\n neighborhood(7, dilation = 4) }",
        L,
        1,
    ),
    ("3-D neighborhood", "pattern p { layout grid(t = 16, y = 32, x = 32)\n neighborhood((3, 7, 7)) }", L, 1),
    (
        "3-D dilated neighborhood",
        "pattern p { layout grid(t = 16, y = 32, x = 32)\n neighborhood((3, 7, 7), dilation = (1, 2, 2)) }",
        L,
        1,
    ),
    (
        "S2-style heads",
        """pattern p {
            heads 0..2: causal & (window(127) | window(1024, dilation = 8))
            heads 2..4: causal & window(512, dilation = 8)
            causal & window(255)
        }""",
        L,
        6,
    ),
]


def main() -> None:
    """Plan every case in both orders and print the efficiencies and their ratio, then the GPU's."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--length", type=int, default=L, help="tokens (the 2-D/3-D layouts need 16384)")
    ap.add_argument("--head-dim", type=int, default=64, help="of the GPU launch row")
    ap.add_argument("--dtype", default="float16", help="of the GPU launch row")
    ap.add_argument("--kind", default="forward", help="of the GPU launch row")
    args = ap.parse_args()
    block = (args.block, args.block)
    print(f"block efficiency at {block[0]}x{block[1]} tiles, L = {args.length}")
    _table(block, args.length, None)
    row = launch_tiles(args.head_dim, "sm_90", args.kind, args.dtype)
    print(f"\nGPU: plan at {PLAN_TILES[0]}x{PLAN_TILES[1]}, parts fitted to the sm_90 {args.dtype} head dim "
          f"{args.head_dim} {args.kind} row ({row[0]}x{row[1]})")  # fmt: skip
    _table(PLAN_TILES, args.length, row)


def _table(block: tuple[int, int], length: int, row: tuple[int, int] | None) -> None:
    print(f"{'case':28s} {'identity':>9s} {'1 order':>9s} {'parts':>9s} {'ratio':>7s} {'plan ms':>8s}  chosen")
    ratios = []
    for name, src, size, heads in SUITE:
        p = pd.compile(src)
        size = size if "layout" in src else length
        # identity and the single order at the tiles the kernels run (the row's), like the parts
        ident = p.plan(size, heads=heads, block=row or block, order="identity")
        t0 = time.perf_counter()
        auto = p.plan(size, heads=heads, block=block, order="auto")
        runs = [passes.fitted(part, row) for part in passes.passes(auto)] if row else passes.passes(auto)
        ms = (time.perf_counter() - t0) * 1e3
        single = passes.fitted(dataclasses.replace(auto, parts_source=None), row) if row else auto
        e0, e1 = ident.stats.block_efficiency, single.stats.block_efficiency
        e2 = sum(r.stats.allowed_pairs for r in runs) / max(1, sum(r.stats.visited_pairs for r in runs))
        assert auto.stats.allowed_pairs == ident.stats.allowed_pairs
        ratio = e2 / e0
        ratios.append(ratio)
        chosen = single.order
        if auto.parts:
            chosen = "; ".join(f"{r.order} {r.block_m}x{r.block_n}" for r in runs)
            chosen = f"{len(runs)} parts: {chosen}"
        print(f"{name:28s} {e0:9.4f} {e1:9.4f} {e2:9.4f} {ratio:6.2f}x {ms:8.1f}  {chosen}")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"geometric mean of ratios (parts / identity): {geo:.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
