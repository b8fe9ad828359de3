"""Runtime stage: decoding steps of ``route(...)`` patterns through the ragged split-K kernels (issue 14).

Comes in: a paged call of at most :data:`patterndsl.codegen.ragged.DECODE_ROWS` queries per element over a
:class:`patterndsl.PagedKVCache`'s pages, and per element the routes' choice made from the cache's block
summaries (:mod:`patterndsl.runtime.route_decode`: route -> ``(chosen [kv_heads, n_groups, n_blocks], qgroup)``).
Goes out: ``(out, lse)`` as the element-by-element call gives them.

How: the pattern's head groups (heads sharing a node) get one forward module of
:mod:`patterndsl.codegen.ragged` whose element rule reads the choice from a small table ``SEL`` (per element,
key/value head, route and query group, the ``topk`` chosen key blocks); nothing in the module depends on a length
or on the choice, so every step runs the same compiled kernels. Each element's rows get one row block of 16 per key
/value head, whose key tiles are the static part's (routes -> ``empty``, the square plan family cut at the length)
and those holding that head's chosen blocks; the kernels load the keys of those tiles through the block table (no
copy of the cache) and split a block's tiles over several programs when the call has too few (flash decoding,
merged by log-sum-exp). Every tile is masked by the element rule, so any polarity of a route is exact.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from patterndsl import ir, kernel_cache
from patterndsl.codegen import ragged as codegen
from patterndsl.errors import InputError
from patterndsl.runtime import ragged, triton_ragged


@dataclasses.dataclass(frozen=True)
class RouteGroup:
    """Heads sharing one node of a routed pattern (what :func:`patterndsl.codegen.ragged.make_spec` reads)."""

    heads: tuple[int, ...]
    node: ir.Node


@functools.lru_cache(maxsize=64)
def groups(pattern: ir.PatternIR, heads: int) -> tuple[RouteGroup, ...]:
    """The pattern's heads grouped by node, in head order (heads without a node attend nothing: left out)."""
    by_node: dict = {}
    for h in range(heads):
        node = pattern.node_for_head(h)
        if node is not None:
            by_node.setdefault(node, []).append(h)
    return tuple(RouteGroup(tuple(hs), node) for node, hs in by_node.items())


@functools.lru_cache(maxsize=64)
def _static_pattern(pattern: ir.PatternIR, node: ir.Node) -> ir.PatternIR:
    """A pattern whose every head is ``node`` with its routes replaced by ``empty``."""
    static = ir.replace(node, {p: ir.EMPTY for p in ir.routes(node)})
    return dataclasses.replace(pattern, heads=(), default=static, score=None, inputs=(), layout=None)


def _static_tiles(pattern, group: RouteGroup, heads: int, q_len: int, kv_len: int, r0: int, block) -> set[int]:
    """Key tiles of plan rows ``r0 .. r0 + 16`` the group's static part reaches, cut at ``kv_len``."""
    fr = ragged.frame(_static_pattern(pattern, group.node), block, heads, q_len, kv_len, True)
    out: set[int] = set()
    for g in range(len(fr.plan.groups)):
        out.update(triton_ragged._row_block(None, fr.plan, g, r0, codegen.DECODE_ROWS, kv_len, block[1])[0])
    return out


def _chosen_tiles(prim: ir.Prim, chosen: torch.Tensor, kv_len: int, bn: int) -> list[set[int]]:
    """Per key/value head, the key tiles holding a block it chose for some query group."""
    kb, last = int(prim.arg("block")), (kv_len - 1) // bn
    out = []
    for blocks in chosen.any(1).cpu():
        tiles: set[int] = set()
        for j in torch.nonzero(blocks).flatten().tolist():
            tiles.update(range(j * kb // bn, min(((j + 1) * kb - 1) // bn, last) + 1))
        out.append(tiles)
    return out


def _selection(slots, stride: int, choices: dict, batch: int, kv_heads: int, device) -> torch.Tensor:
    """``SEL``: per element and key/value head (``stride`` entries each), every route's chosen blocks per query group
    as ``topk`` ascending indices, ``-1`` for none."""
    sel = torch.full((batch, kv_heads, max(stride, 1)), -1, dtype=torch.int32, device=device)
    for b, chosen in choices.items():
        for slot in slots:
            picked, _ = chosen[slot.prim]
            n_groups, n_blocks = picked.shape[1], picked.shape[2]
            if n_groups > codegen.ROUTE_GROUPS or int(picked.sum(-1).max()) > slot.topk:
                raise AssertionError(f"a choice of {slot.prim} does not fit its SEL entries")
            at = torch.arange(n_blocks, device=picked.device)
            idx = torch.where(picked, at, n_blocks).sort(-1).values[..., : slot.topk]
            idx = torch.where(idx == n_blocks, -1, idx)
            width = idx.shape[-1]
            rows = sel[b, :, slot.offset : slot.offset + n_groups * slot.topk].view(kv_heads, n_groups, slot.topk)
            rows[..., :width] = idx.to(device=device, dtype=torch.int32)
    return sel.flatten()


def _missing(table: torch.Tensor, b: int, tiles: set[int], bn: int, ps: int, kv_len: int) -> torch.Tensor:
    """Key positions of element ``b``'s listed tiles that lie on a page the table does not hold (-1)."""
    if not tiles:
        return torch.zeros(0, dtype=torch.int64)
    keys = (torch.tensor(sorted(tiles))[:, None] * bn + torch.arange(bn)).flatten()
    keys = keys[keys < kv_len]
    pages = table[b].cpu()[torch.div(keys, ps, rounding_mode="floor")]
    return keys[pages < 0]


def forward(q, k, v, pattern: ir.PatternIR, data, scale: float, choices: dict, attended):
    """``(out, lse)`` of a routed decoding step through the ragged kernels.

    Args:
        q: ``[batch, heads, Lq, head_dim]``, ``Lq <= 16``.
        k, v: pages ``[pages, kv_heads, page_size, head_dim]``.
        pattern: the call's pattern (:func:`patterndsl.runtime.route_decode.serves` holds).
        data: ``[kv_lengths, q_lengths, block_table]``.
        scale: the softmax scale.
        choices: per element with queries and keys, route -> ``(chosen [kv_heads, n_groups, n_blocks], qgroup)``.
        attended: ``(b, keys) -> bool [nk]``, whether a query of element ``b`` attends the key positions ``keys``
            (asked only for keys on a page the table does not hold).

    Returns:
        ``(out, lse)``; ``lse`` float32.

    Raises:
        InputError: a page not held that a query of the call attends.
    """
    batch, heads, lq, d = q.shape
    kv_heads, ps = k.shape[1], k.shape[2]
    kvl, ql = data[0].tolist(), data[1].tolist()
    out = torch.zeros(batch, heads, lq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((batch, heads, lq), float("-inf"), dtype=torch.float32, device=q.device)
    if not choices:
        return out, lse
    rows_bm = codegen.DECODE_ROWS
    block = triton_ragged._tiles(q.device, d, q.dtype, "forward", rows_bm)
    bn = block[1]
    gs = groups(pattern, heads)
    spec, module = _module(pattern, gs, q, k, bn)
    slots, stride = codegen.route_layout(gs)
    table = data[2]
    per_group: list[list] = [[] for _ in gs]
    for b, chosen in choices.items():
        q_len, kv_len = ql[b], kvl[b]
        row0 = kv_len - q_len
        picked = {prim: _chosen_tiles(prim, sel, kv_len, bn) for prim, (sel, _) in chosen.items()}
        listed: set[int] = set()
        for gi, group in enumerate(gs):
            prims = ir.routes(group.node)
            for r0 in range((row0 // rows_bm) * rows_bm, row0 + q_len, rows_bm):
                static = _static_tiles(pattern, group, heads, q_len, kv_len, r0, block)
                for hk in sorted({h // (heads // kv_heads) for h in group.heads}):
                    tiles = sorted(static.union(*(picked[p][hk] for p in prims)))
                    listed.update(tiles)
                    per_group[gi].append((b, row0, r0, q_len, kv_len, hk, tiles, [True] * len(tiles)))
        lost = _missing(table, b, listed, bn, ps, kv_len)
        if lost.numel():
            hit = attended(b, lost)
            if bool(hit.any()):
                raise InputError(
                    f"block_table has no page (-1) for key position {int(lost[hit.cpu()][0])} of batch element {b}, "
                    "which a query of this call may attend"
                )
    lists = []
    for gi, rows in enumerate(per_group):
        want = triton_ragged.split_wanted(len(rows), len(gs[gi].heads) // max(1, len({hk for *_, hk, _, _ in rows})))
        lists.append(triton_ragged.make_lists(rows, want, q.device))
    sel = _selection(slots, stride, choices, batch, kv_heads, q.device)
    triton_ragged.launch_forward(spec, module, gs, lists, q, k, v, data, scale, out, lse, sel)
    return out, lse


def _module(pattern, gs, q, k, bn: int):
    target = "interpret" if q.device.type == "cpu" else triton_ragged.triton_backend.target_of(q.device)
    h, hkv, ps, d = q.shape[1], k.shape[1], k.shape[2], q.shape[3]
    spec = codegen.make_spec(pattern, gs, "forward", h, hkv, d, q.dtype, ps, target, codegen.DECODE_ROWS, bn)
    return spec, kernel_cache.load(spec, codegen.render)
