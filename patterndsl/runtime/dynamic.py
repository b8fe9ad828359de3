"""Runtime stage: merging the run-time choice of ``route(...)`` with the static block plan.

Comes in: the :class:`~patterndsl.analysis.plan.BlockPlan` of a pattern with
``route`` (exact static tiles, and tiles marked 3 that only the data decides)
and, at every call, the :class:`~patterndsl.runtime.routing.Selection` of each
route. Goes out: for every head group, batch element and key-value head, the
query-tile -> key-tile lists (CSR, states 1 partial / 2 full) that executors
run, and the element mask of each partial tile.

How. Planned once per plan (:func:`dynamic_plan`): for every 3-tile, the
static state of the pattern with each route replaced by ``empty`` or ``full``
(the *corners*, 2^r for r routes, classified by the analysis engine on those
tiles only), and which query tiles / key tiles meet which query groups / key
blocks. At run time each route's choice is reduced to a state per 3-tile
(none, some or all of its (group, block) pairs chosen: 0, 1, 2); a tile then
takes the state every corner consistent with those states agrees on, the one
corner's state when the routes are all decided, and is partial otherwise. That
is the set algebra of the pattern applied tile by tile; partial tiles are
exact at element level through :func:`patterndsl.semantics.evaluate` with the
selection, or, on tiles where the pattern equals one route, a lookup of the
chosen table per row and column. Nothing is of size ``Lq x Lk``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng
from patterndsl.analysis.plan import DYNAMIC, EMPTY, FULL, PARTIAL, BlockPlan, HeadGroup, _rows_of
from patterndsl.analysis.rewrite import simplify
from patterndsl.runtime import routing
from patterndsl.runtime.plans import per_plan


@dataclass(frozen=True)
class RouteTiles:
    """Which tiles meet which query groups and key blocks of one route (static, per plan).

    Attributes:
        prim: the ``route`` primitive.
        voters: the query heads that add their scores (:func:`routing.voters`).
        q_tile, q_group: int64 ``[P]``: query tile ``q_tile[p]`` holds queries of group ``q_group[p]``.
        k_ptr, k_block: CSR over key tiles: key tile ``n`` holds keys of blocks
            ``k_block[k_ptr[n]:k_ptr[n+1]]``.
    """

    prim: ir.Prim
    voters: tuple[int, ...]
    q_tile: torch.Tensor
    q_group: torch.Tensor
    k_ptr: torch.Tensor
    k_block: torch.Tensor


@dataclass(frozen=True)
class DynamicGroup:
    """A head group whose tiles depend on the data.

    Attributes:
        group: the plan's head group.
        routes: the routes in its pattern.
        static_keys, static_state: tiles decided statically (``m * nkt + n``, states 1/2) that
            need no selection: full, or partial where no route reaches.
        dyn_keys: int64 ``[T]`` sorted keys of the tiles marked 3 and of the partial tiles a
            route reaches.
        corners: int8 ``[2^r, T]``: state of each 3-tile with route ``p`` replaced by
            ``full`` when bit ``p`` of the corner index is set, else ``empty``.
        gather: bool ``[n_q_tiles, n_blocks]`` or None: with a single route, ``gather[m, c]``
            says that on every tile of query tile ``m`` meeting key block ``c`` the pattern
            equals the route, so (row, chosen block) pairs there run gathered, per block,
            with no tile and no mask (:func:`gathered_rows`).
        drop: bool ``[T]``: 3-tiles entirely covered by gathered work (not in the tile lists).
        split: bool ``[T]``: 3-tiles where the pattern equals the route but only some of the
            blocks they meet are gathered: the tile path masks the gathered blocks out.
    """

    group: HeadGroup
    routes: tuple[ir.Prim, ...]
    static_keys: torch.Tensor
    static_state: torch.Tensor
    dyn_keys: torch.Tensor
    corners: torch.Tensor
    gather: torch.Tensor | None
    drop: torch.Tensor
    split: torch.Tensor


@dataclass(frozen=True)
class DynamicPlan:
    """The static preparation of a route pattern's plan (built once per plan)."""

    plan: BlockPlan
    routes: dict[ir.Prim, RouteTiles]
    groups: tuple[DynamicGroup | None, ...]

    @property
    def ctx(self) -> semantics.Context:
        return self.plan.sizes


def dynamic_plan(plan: BlockPlan) -> DynamicPlan:
    """The :class:`DynamicPlan` of ``plan`` (cached while the plan lives).

    Args:
        plan: the block plan of a pattern with ``route``, in identity order.

    Returns:
        The corners, incidences and static tiles needed to merge selections at run time.
    """
    return per_plan(plan, "dynamic", lambda: _build(plan))


def _build(plan: BlockPlan) -> DynamicPlan:
    if not (plan.is_identity_order or (_is_identity(plan.q_order) and _is_identity(plan.kv_order))):
        raise AssertionError("plans of route patterns keep the identity order")
    ctx = plan.sizes
    votes = routing.voters(plan.pattern, plan.heads)
    routes = {prim: _route_tiles(prim, heads, plan, ctx) for prim, heads in votes.items()}
    groups = tuple(_group(plan, g, ctx, routes) if ir.is_dynamic(g.node) else None for g in plan.groups)
    return DynamicPlan(plan, routes, groups)


def _is_identity(order: torch.Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(order.numel(), dtype=order.dtype)))


def _route_tiles(prim: ir.Prim, heads: tuple[int, ...], plan: BlockPlan, ctx: semantics.Context) -> RouteTiles:
    n_q, n_k, qgroup, kblock = semantics.route_blocks(prim, ctx)
    bm, bn = plan.block
    qpairs = torch.unique(torch.div(torch.arange(plan.q_len), bm, rounding_mode="floor") * n_q + qgroup)
    q_tile = torch.div(qpairs, n_q, rounding_mode="floor")
    q_group = qpairs % n_q
    kpairs = torch.unique(torch.div(torch.arange(plan.kv_len), bn, rounding_mode="floor") * n_k + kblock)
    k_tile = torch.div(kpairs, n_k, rounding_mode="floor")
    k_ptr = torch.zeros(plan.n_kv_tiles + 1, dtype=torch.int64)
    k_ptr[1:] = torch.cumsum(torch.bincount(k_tile, minlength=plan.n_kv_tiles), 0)
    return RouteTiles(prim, heads, q_tile, q_group, k_ptr, kpairs % n_k)


def _group(plan: BlockPlan, group: HeadGroup, ctx: semantics.Context, route_tiles: dict) -> DynamicGroup:
    tl = group.tiles
    nkt = plan.n_kv_tiles
    rows = torch.from_numpy(_rows_of(tl.row_ptr, plan.n_q_tiles))
    keys = rows * nkt + tl.cols
    routes = ir.routes(group.node)
    engine = eng.identity_engine(ctx, group.heads[0], plan.block)
    # A partial tile whose state is static may still have a mask that depends on the choice
    # (a route that reaches it without changing its state): it is decided per call too. With
    # the plan's heads, a route whose among reads h reaches what any head's choice may open
    # (under GQA a group shares the union's choice).
    if group.route_mask is not None:
        reached = group.route_mask.tensor()  # the plan's flags: no candidate pair listed again
    else:
        reach = np.unique(np.concatenate([engine.run(r)[0] for r in routes]))
        reached = torch.from_numpy(np.isin(keys.numpy(), reach))
    dyn = (tl.state == DYNAMIC) | ((tl.state == PARTIAL) & reached)
    dyn_keys = keys[dyn]
    domain = dyn_keys.numpy()
    corners = torch.zeros(1 << len(routes), len(dyn_keys), dtype=torch.int8)
    for c, bits in enumerate(itertools.product((0, 1), repeat=len(routes))):
        # Bit p of corner c is route p (the last route is the lowest bit).
        values = {p: (ir.FULL if bit else ir.EMPTY) for p, bit in zip(routes, bits, strict=True)}
        k2, s2 = engine.run(simplify(ir.replace(group.node, values)), domain)
        corners[c, torch.from_numpy(np.searchsorted(domain, k2))] = torch.from_numpy(s2)
    # Statically partial tiles stay partial whatever the corners say about their elements.
    corners[:, tl.state[dyn] == PARTIAL] = PARTIAL
    none = torch.zeros(len(dyn_keys), dtype=torch.bool)
    if len(routes) != 1:
        return DynamicGroup(group, routes, keys[~dyn], tl.state[~dyn], dyn_keys, corners, None, none, none)
    # Tiles where the pattern is exactly its route: empty with the route empty, full with it full.
    pure = (corners[0] == EMPTY) & (corners[1] == FULL)
    gather, drop = _gatherable(route_tiles[routes[0]], dyn_keys[pure], plan)
    full_drop = none.clone()
    full_drop[pure] = drop
    split = pure & ~full_drop
    return DynamicGroup(group, routes, keys[~dyn], tl.state[~dyn], dyn_keys, corners, gather, full_drop, split)


def _gatherable(rt: RouteTiles, pure_keys: torch.Tensor, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query tile, block) pairs are route-only on every tile they meet, and which tiles that covers."""
    nkt = plan.n_kv_tiles
    n_blocks = int(rt.k_block.max()) + 1 if rt.k_block.numel() else 0
    m, n = torch.div(pure_keys, nkt, rounding_mode="floor"), pure_keys % nkt
    owner, blocks = _expand(rt, n)
    count = torch.zeros(plan.n_q_tiles * n_blocks, dtype=torch.int64)
    count.index_add_(0, m[owner] * n_blocks + blocks, torch.ones_like(blocks))
    meets = torch.bincount(rt.k_block, minlength=n_blocks)
    gather = (count.view(plan.n_q_tiles, n_blocks) == meets) & (meets > 0)
    # A tile is covered when every block it meets is gathered for its query tile.
    covered = torch.ones(len(pure_keys), dtype=torch.int64)
    covered.scatter_reduce_(0, owner, gather[m[owner], blocks].to(torch.int64), "amin", include_self=True)
    return gather, covered.bool()


def _expand(rt: RouteTiles, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For key tiles ``n [T]``: ``(owner, block)`` pairs, one per block each tile meets."""
    count = rt.k_ptr[n + 1] - rt.k_ptr[n]
    owner = torch.repeat_interleave(torch.arange(len(n)), count)
    local = torch.arange(int(count.sum())) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return owner, rt.k_block[rt.k_ptr[n][owner] + local]


# --------------------------------------------------------------------------- run time


def select_all(dp: DynamicPlan, q: torch.Tensor, k: torch.Tensor) -> dict[ir.Prim, routing.Selection]:
    """Every route's choice for these tensors.

    Args:
        dp: the dynamic plan.
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``.

    Returns:
        ``{route: Selection}``.
    """
    return {prim: routing.select(prim, q, k, dp.ctx, rt.voters) for prim, rt in dp.routes.items()}


def route_states(rt: RouteTiles, sel: routing.Selection, keys: torch.Tensor, nkt: int) -> torch.Tensor:
    """State of one route on tiles ``keys`` for every batch element and key-value head.

    Args:
        rt: the route's incidences.
        sel: its selection.
        keys: int64 ``[T]`` tile keys ``m * nkt + n``.
        nkt: number of key tiles.

    Returns:
        int8 ``[B, Hkv, T]``: 0 when no (group, block) pair meeting the tile is chosen, 2 when
        all are, 1 otherwise.
    """
    b, hkv, _, n_blocks = sel.chosen.shape
    nqt = int(rt.q_tile.max()) + 1 if rt.q_tile.numel() else 0
    chosen = sel.chosen.to(torch.int8).reshape(b * hkv, -1, n_blocks).cpu()
    # Per query tile and block: does any / every group of the tile choose the block?
    src = chosen[:, rt.q_group]
    index = rt.q_tile.view(1, -1, 1).expand_as(src)
    shape = (b * hkv, nqt, n_blocks)
    anyc = torch.zeros(shape, dtype=torch.int8).scatter_reduce(1, index, src, "amax", include_self=False)
    allc = torch.ones(shape, dtype=torch.int8).scatter_reduce(1, index, src, "amin", include_self=False)
    # Then over the blocks each key tile meets.
    m, n = torch.div(keys, nkt, rounding_mode="floor"), keys % nkt
    owner, blocks = _expand(rt, n)
    rows = m[owner]
    index = owner.view(1, -1).expand(b * hkv, -1)
    shape = (b * hkv, len(keys))
    out_any = torch.zeros(shape, dtype=torch.int8).scatter_reduce(
        1, index, anyc[:, rows, blocks], "amax", include_self=False
    )
    out_all = torch.ones(shape, dtype=torch.int8).scatter_reduce(
        1, index, allc[:, rows, blocks], "amin", include_self=False
    )
    state = torch.where(out_all > 0, FULL, torch.where(out_any > 0, PARTIAL, EMPTY)).to(torch.int8)
    return state.view(b, hkv, len(keys))


def merge(dg: DynamicGroup, states: list[torch.Tensor]) -> torch.Tensor:
    """Run-time states of the 3-tiles from the routes' tile states and the corners.

    Args:
        dg: the head group.
        states: one int8 ``[B, Hkv, T]`` per route of ``dg.routes`` (:func:`route_states`).

    Returns:
        int8 ``[B, Hkv, T]``: 0 empty, 1 partial, 2 full.
    """
    all0 = all2 = None
    count = single = None
    for c, bits in enumerate(itertools.product((0, 1), repeat=len(dg.routes))):
        consistent = None
        for st, bit in zip(states, bits, strict=True):
            ok = st >= PARTIAL if bit else st <= PARTIAL
            consistent = ok if consistent is None else consistent & ok
        cs = dg.corners[c]
        z, f = ~consistent | (cs == EMPTY), ~consistent | (cs == FULL)
        all0 = z if all0 is None else all0 & z
        all2 = f if all2 is None else all2 & f
        count = consistent.to(torch.int8) if count is None else count + consistent
        single = torch.where(consistent, cs, torch.zeros_like(cs) if single is None else single)
    state = torch.where(count == 1, single, torch.full_like(single, PARTIAL))
    state = torch.where(all2, torch.full_like(state, FULL), state)
    return torch.where(all0, torch.full_like(state, EMPTY), state).to(torch.int8)


@dataclass(frozen=True)
class Lists:
    """One (head group, batch element, key-value head)'s tiles at this call."""

    group: DynamicGroup
    heads: tuple[int, ...]
    batch: int
    kv_head: int
    row_ptr: torch.Tensor
    cols: torch.Tensor
    state: torch.Tensor
    split: torch.Tensor  # bool per tile of ``cols``: route-only tiles with some blocks gathered


def tile_lists(dp: DynamicPlan, selections: dict[ir.Prim, routing.Selection], share: int) -> list[Lists]:
    """The run-time tile lists (3-tiles only) of every dynamic head group, batch element and key-value head.

    The static tiles of a dynamic group are the same at every call and run as one static
    schedule (:func:`static_lists`); these lists hold the 3-tiles that the choice makes
    non-empty and that gathered work does not cover.

    Args:
        dp: the dynamic plan.
        selections: from :func:`select_all`.
        share: query heads per key-value head.

    Returns:
        One :class:`Lists` per (dynamic head group, batch element, key-value head with heads in
        the group).
    """
    plan = dp.plan
    nqt, nkt = plan.n_q_tiles, plan.n_kv_tiles
    out = []
    for dg in dp.groups:
        if dg is None:
            continue
        states = [route_states(dp.routes[p], selections[p], dg.dyn_keys, nkt) for p in dg.routes]
        run = merge(dg, states)
        batch, hkv = run.shape[:2]
        for b, kvh in itertools.product(range(batch), range(hkv)):
            heads = tuple(h for h in dg.group.heads if h // share == kvh)
            if not heads:
                continue
            live = (run[b, kvh] > 0) & ~dg.drop
            # Split tiles lose their gathered blocks: never full, always masked.
            state = torch.where(dg.split, PARTIAL, run[b, kvh])[live]
            keys, split = dg.dyn_keys[live], dg.split[live]
            row_ptr = torch.zeros(nqt + 1, dtype=torch.int64)
            row_ptr[1:] = torch.cumsum(torch.bincount(keys // nkt, minlength=nqt), 0)
            out.append(Lists(dg, heads, b, kvh, row_ptr, keys % nkt, state, split))
    return out


def static_lists(dg: DynamicGroup, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR ``(row_ptr, cols, state)`` of the tiles of a dynamic head group that no route reaches (or full)."""
    nkt = plan.n_kv_tiles
    row_ptr = torch.zeros(plan.n_q_tiles + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(torch.bincount(dg.static_keys // nkt, minlength=plan.n_q_tiles), 0)
    return row_ptr, dg.static_keys % nkt, dg.static_state


def static_mask_fn(dg: DynamicGroup, plan: BlockPlan):
    """``f(q_tiles, kv_tiles) -> allowed [P, BM, BN]`` on the static tiles of a dynamic head group.

    These are full tiles and tiles no route reaches (partial tiles a route reaches are
    decided per call, see ``_group``), so on the masked ones the pattern equals the
    pattern with every route replaced by ``empty``, which needs no selection.
    """
    node = ir.replace(dg.group.node, dict.fromkeys(dg.routes, ir.EMPTY))
    return _evaluate_tiles(plan, node, dg.group.heads[0])


def _evaluate_tiles(plan: BlockPlan, node: ir.Node, head: int, selection=None, ctx=None):
    bm, bn = plan.block
    ctx = plan.sizes if ctx is None else ctx

    def tile_mask(q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
        rows = (q_tiles[:, None] * bm + torch.arange(bm)).clamp(max=plan.q_len - 1)
        cols = kv_tiles[:, None] * bn + torch.arange(bn)
        valid = cols < plan.kv_len
        i, j = rows[:, :, None], cols.clamp(max=plan.kv_len - 1)[:, None, :]
        return semantics.evaluate(node, i, j, head, ctx, selection) & valid[:, None, :]

    return tile_mask


def tile_mask_fn(dp: DynamicPlan, lists: Lists, selections: dict[ir.Prim, routing.Selection]):
    """``f(q_tiles [P], kv_tiles [P]) -> allowed bool [P, BM, BN]`` for one :class:`Lists`, exact per element.

    Split tiles (the pattern equals its route, some blocks gathered) are a lookup of the
    chosen table by row group and column block minus the gathered blocks; the others
    evaluate the pattern with the selection.
    """
    plan = dp.plan
    bm, bn = plan.block
    nkt = plan.n_kv_tiles
    node = plan.group_of(lists.heads[0]).node
    head = lists.heads[0]
    chosen = {p: s.chosen[lists.batch, lists.kv_head].cpu() for p, s in selections.items()}
    rows_of = torch.repeat_interleave(torch.arange(plan.n_q_tiles), torch.diff(lists.row_ptr))
    split_keys = (rows_of * nkt + lists.cols)[lists.split]
    dg = lists.group
    evaluate = _evaluate_tiles(plan, node, head, chosen)

    def tile_mask(q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
        rows = (q_tiles[:, None] * bm + torch.arange(bm)).clamp(max=plan.q_len - 1)
        cols = kv_tiles[:, None] * bn + torch.arange(bn)
        valid = cols < plan.kv_len
        cols = cols.clamp(max=plan.kv_len - 1)
        out = torch.empty(len(q_tiles), bm, bn, dtype=torch.bool)
        is_split = torch.isin(q_tiles * nkt + kv_tiles, split_keys)
        if bool(is_split.any()):
            # The pattern is the route here; the gathered blocks are done elsewhere.
            route = dg.routes[0]
            sel = selections[route]
            g = sel.qgroup.cpu()[rows[is_split]]
            blk = sel.kblock.cpu()[cols[is_split]]
            done = dg.gather[q_tiles[is_split]][torch.arange(int(is_split.sum()))[:, None], blk]
            out[is_split] = chosen[route][g[:, :, None], blk[:, None, :]] & ~done[:, None, :]
        rest = ~is_split
        if bool(rest.any()):
            out[rest] = evaluate(q_tiles[rest], kv_tiles[rest])
        return out & valid[:, None, :]

    return tile_mask


def gathered_rows(lists: Lists, selections: dict[ir.Prim, routing.Selection], q_len: int, bm: int):
    """The gathered work of one :class:`Lists`: for each key block, the query rows that run it.

    Args:
        lists: one (head group, batch element, key-value head).
        selections: from :func:`select_all`.
        q_len: ``Lq``.
        bm: query tile size.

    Returns:
        ``(blocks, row_ptr, rows)``: block ``blocks[t]`` is attended in full by query indices
        ``rows[row_ptr[t]:row_ptr[t+1]]`` (ascending); empty tensors when nothing is gathered.
    """
    dg = lists.group
    if dg.gather is None or not bool(dg.gather.any()):
        z = torch.zeros(0, dtype=torch.int64)
        return z, torch.zeros(1, dtype=torch.int64), z
    sel = selections[dg.routes[0]]
    chosen = sel.chosen[lists.batch, lists.kv_head].cpu()
    qgroup = sel.qgroup.cpu()
    tile = torch.div(torch.arange(q_len), bm, rounding_mode="floor")
    run = chosen[qgroup] & dg.gather[tile]  # [Lq, n_blocks]: not Lq x Lk
    blocks, rows = torch.nonzero(run.T, as_tuple=True)
    used, counts = torch.unique_consecutive(blocks, return_counts=True)
    row_ptr = torch.zeros(len(used) + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return used, row_ptr, rows


def block_keys(prim: ir.Prim, selection: routing.Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the key indices of every block: block ``c`` holds ``keys[ptr[c]:ptr[c+1]]`` (ascending)."""
    kblock = selection.kblock.cpu()
    order = torch.argsort(kblock, stable=True)
    ptr = torch.zeros(selection.n_blocks + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(kblock, minlength=selection.n_blocks), 0)
    return ptr, order


def kernel_lists(dp: DynamicPlan, selections: dict[ir.Prim, routing.Selection], batch: int, kv_heads: int):
    """Per head group, every tile each (batch element, key-value head) visits, for kernels that mask in place.

    Static and run-time tiles together (no gathered work): the kernel applies the element
    rule (the corners of the routes, see :mod:`patterndsl.codegen.routes`) on
    partial tiles.

    Args:
        dp: the dynamic plan.
        selections: from :func:`select_all`.
        batch, kv_heads: sizes of this call.

    Returns:
        One ``(row_ptr [batch * kv_heads, nqt + 1], cols, state)`` per head group of the plan;
        ``row_ptr`` holds global offsets into ``cols``/``state`` (list ``b * kv_heads + kv_head``).
    """
    plan = dp.plan
    nqt, nkt = plan.n_q_tiles, plan.n_kv_tiles
    out = []
    for group, dg in zip(plan.groups, dp.groups, strict=True):
        if dg is None:
            tl = group.tiles
            per = [(tl.row_ptr, tl.cols, tl.state)] * (batch * kv_heads)
        else:
            states = [route_states(dp.routes[p], selections[p], dg.dyn_keys, nkt) for p in dg.routes]
            run = merge(dg, states).reshape(batch * kv_heads, -1)
            per = []
            for lst in range(batch * kv_heads):
                live = run[lst] > 0
                keys = torch.cat([dg.static_keys, dg.dyn_keys[live]])
                state = torch.cat([dg.static_state, run[lst][live]])
                order = torch.argsort(keys)
                keys, state = keys[order], state[order]
                row_ptr = torch.zeros(nqt + 1, dtype=torch.int64)
                row_ptr[1:] = torch.cumsum(torch.bincount(keys // nkt, minlength=nqt), 0)
                per.append((row_ptr, keys % nkt, state))
        shift = torch.cumsum(torch.tensor([0] + [int(p[0][-1]) for p in per[:-1]]), 0)
        row_ptr = torch.stack([p[0] + s for p, s in zip(per, shift.tolist(), strict=True)])
        out.append((row_ptr, torch.cat([p[1] for p in per]), torch.cat([p[2] for p in per])))
    return out
