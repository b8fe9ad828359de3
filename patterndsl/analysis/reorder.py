"""Stage 4 (block plan), token reordering: candidate permutations that can make tiles denser.

Comes in: the per-head pattern nodes, the lengths, layout and tile size. Goes
out: candidate token orders as segment lists (see
:mod:`patterndsl.analysis.tiles`), identity first. The planner plans every
candidate and keeps the one with the least visited work, so a candidate that
does not help is simply not chosen. Candidates:

* 1-D: group positions by ``position % m`` for every dilation ``m`` of a
  ``window`` and every stride ``m`` of a ``strided`` (a dilated window is then
  an ordinary band inside each class, a stride class a full block).
* grids: per ``neighborhood`` dilation, group each axis by residue, and tile
  each group's sub-grid into boxes of about one tile's size shaped like the
  neighborhood, so a query tile is a box and its keys are a few boxes (plain
  boxes, without groups, only for neighborhoods without dilation).
"""

from __future__ import annotations

import itertools
import math

from patterndsl import ir
from patterndsl.analysis import tiles
from patterndsl.analysis.classify import neighborhood_axes

MAX_MODULI = 4
MAX_BOXES = 3


def _prims(nodes: list[ir.Node], name: str) -> list[ir.Prim]:
    out: dict[ir.Prim, None] = {}
    for node in nodes:
        for sub in ir.walk(node):
            if isinstance(sub, ir.Prim) and sub.name == name:
                out[sub] = None
    return list(out)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def box_shapes(group_extents: tuple[int, ...], target: tuple[float, ...], block: int) -> list[tuple[int, ...]]:
    """Box shapes (one size per axis) whose volume is one tile, closest to ``target`` in shape first."""
    divs = [[d for d in _divisors(block) if d <= e] for e in group_extents]
    shapes = [s for s in itertools.product(*divs) if math.prod(s) == block]
    if not shapes:
        return []
    scale = (block / math.prod(target)) ** (1 / len(target))
    goal = [math.log(max(t * scale, 1e-9)) for t in target]
    shapes.sort(key=lambda s: sum((math.log(b) - g) ** 2 for b, g in zip(s, goal, strict=True)))
    return shapes[:MAX_BOXES]


def candidates(nodes: list[ir.Node], layout: ir.Layout | None, q_len: int, kv_len: int, block: tuple[int, int]):
    """Candidate orders: ``[(description, query segments, key segments, identity)]``, identity first."""
    off = kv_len - q_len
    if layout is None:
        ident = [
            ("identity", tiles.identity_segments(q_len, off, (kv_len,)), tiles.identity_segments(kv_len, 0, (kv_len,)))
        ]
    else:
        ident = [("identity", tiles.identity_segments(q_len, 0, layout.shape), None)]
        ident[0] = (ident[0][0], ident[0][1], ident[0][1])
    out = [(*ident[0], True)]
    if any(ir.is_dynamic(n) for n in nodes) or _prims(nodes, "random"):
        return out
    if layout is None:
        moduli = sorted(
            {p.arg("dilation") for p in _prims(nodes, "window") if p.arg("dilation") > 1}
            | {p.arg("stride") for p in _prims(nodes, "strided") if p.arg("stride") > 1}
        )
        for m in moduli[:MAX_MODULI]:
            if m >= min(q_len, kv_len):
                continue
            out.append(
                (
                    f"classes mod {m}",
                    tiles.class_segments(q_len, off, m),
                    tiles.class_segments(kv_len, 0, m),
                    False,
                )
            )
        return out
    if q_len != kv_len or block[0] != block[1]:
        return out
    nbhs = _prims(nodes, "neighborhood")
    if not nbhs:
        return out
    rank = len(layout.shape)
    seen = set()
    for prim in nbhs:
        axes = neighborhood_axes(prim, layout)
        dils = tuple(a[2] for a in axes)
        target = tuple(float(a[1] * max(a[3], 1)) for a in axes)
        # A dilated neighborhood pairs only positions of one dilation group per axis: plain boxes mix
        # every group in a tile and never win, so they come only from undilated neighborhoods.
        for dil in {dils}:
            gext = tuple(-(-e // d) for e, d in zip(layout.shape, dil, strict=True))
            for box in [*box_shapes(gext, target, block[0]), gext]:
                key = (dil, box)
                if key in seen or (box == gext and dil == (1,) * rank):
                    continue
                seen.add(key)
                segs = tiles.box_segments(layout.shape, dil, box)
                desc = f"boxes {'x'.join(map(str, box))}" + (
                    f", dilation groups {'x'.join(map(str, dil))}" if any(d > 1 for d in dil) else ""
                )
                out.append((desc, segs, segs, False))
    return out
