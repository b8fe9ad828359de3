"""Runtime stage: the tiles of a pattern with ``route(...)`` and run-time inputs, exact at every call.

Comes in: the :class:`~patterndsl.analysis.plan.BlockPlan` (identity order) of a pattern whose
routes sit outside ``within`` and whose inputs are read by the operators around them (``among``
reads none: :mod:`patterndsl.check`), the op's ``data`` list and ``q``/``k``. Goes out: for every
batch element, head group and key-value head, the tile lists (CSR, states 1 partial / 2 full) and
the element mask of each partial tile.

How. The route's choice is made exactly as without inputs (:func:`patterndsl.runtime.routing.select`,
LANGUAGE.md section 2: on the original scores, among its own candidates); inputs only shape the
operators around it. Each of the 2^r *corners* (every route replaced by ``empty`` or ``full``) is a
pattern with inputs and no route, planned exactly for the call's data by
:func:`patterndsl.runtime.inputs.call_plan` (cached per input tensors). Each route's choice is
reduced to a state per tile (none, some or all of the (group, block) pairs it meets chosen), and a
tile takes the state that every corner consistent with those states agrees on, else partial
(:func:`patterndsl.runtime.dynamic.merge`, the set algebra tile by tile). Partial tiles are exact
per element: :func:`patterndsl.semantics.evaluate` with the selection and the bound inputs.
Nothing is of size ``Lq x Lk``.
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import torch

from patterndsl import ir
from patterndsl.analysis import inputplan
from patterndsl.analysis.plan import DYNAMIC, EMPTY, FULL, PARTIAL, BlockPlan
from patterndsl.errors import BackendError, InputError
from patterndsl.runtime import dynamic, inputs, routing, validate
from patterndsl.runtime.plans import build, per_plan


def applies(plan: BlockPlan) -> bool:
    """Whether ``plan``'s pattern has both run-time inputs and a ``route``."""
    pattern = plan.pattern
    return bool(getattr(pattern, "inputs", ())) and any(ir.routes(g.node) for g in plan.groups)


def check_backend(pattern: ir.PatternIR, backend: str, device: torch.device) -> None:
    """Refuse ``route(...)`` with run-time inputs on a backend other than the CPU executor.

    Routes beside ``cluster(...)`` whose only inputs are its centroids run on both backends
    (:mod:`patterndsl.runtime.clusters`); any other input next to a route runs on the CPU only.

    Raises:
        BackendError: located at the first route, when ``backend`` resolves to Triton.
    """
    nodes = pattern.nodes()
    routes = [prim for node in nodes for prim in ir.routes(node)]
    if not pattern.inputs or not routes:
        return
    centroids = {p.arg("centroids") for n in nodes for p in ir.contents(n) if p.name == "cluster"}
    if pattern.score is None and all(d.name in centroids for d in pattern.inputs):
        return
    if validate.resolve_backend(backend, device) == "cpu":
        return
    raise BackendError(
        f"pattern '{pattern.name}': route(...) combined with run-time inputs runs on the CPU backend only "
        "for now (backend='cpu' with CPU tensors); the Triton kernels cannot combine them yet",
        routes[0].span,
    )


def corner_plans(plan: BlockPlan) -> tuple[tuple[ir.Prim, ...], list[BlockPlan]]:
    """The routes of ``plan``'s pattern and the plans of its 2^r corners (cached per plan).

    Corner ``c`` replaces route ``p`` by ``full`` when bit ``p`` of ``c`` (most significant
    first, the order of :func:`patterndsl.runtime.dynamic.merge`) is set, else by ``empty``.
    """

    def make():
        pattern = plan.pattern
        routes = tuple(routing.voters(pattern, plan.heads))
        out = []
        for bits in itertools.product((0, 1), repeat=len(routes)):
            swap = {p: ir.FULL if bit else ir.EMPTY for p, bit in zip(routes, bits, strict=True)}
            rules = tuple(dataclasses.replace(r, node=ir.replace(r.node, swap)) for r in pattern.heads)
            default = None if pattern.default is None else ir.replace(pattern.default, swap)
            corner = dataclasses.replace(pattern, heads=rules, default=default)
            out.append(build(corner, plan.q_len, plan.kv_len, plan.heads, plan.block, "identity"))
        return routes, out

    return per_plan(plan, ("route-input-corners",), make)


def tile_states(sel: routing.Selection, plan: BlockPlan) -> torch.Tensor:
    """int8 ``[B, Hkv, nqt, nkt]``: 0 when no (group, block) pair a tile meets is chosen, 2 when all are, else 1."""
    bm, bn = plan.block
    chosen = sel.chosen.to(torch.int8).cpu()
    b, hkv, _, n_blocks = chosen.shape
    src = chosen[:, :, sel.qgroup.cpu()]  # [B, Hkv, Lq, n_blocks]
    index = (torch.arange(plan.q_len) // bm).view(1, 1, -1, 1).expand_as(src)
    shape = (b, hkv, plan.n_q_tiles, n_blocks)
    anyq = torch.zeros(shape, dtype=torch.int8).scatter_reduce(2, index, src, "amax", include_self=False)
    allq = torch.ones(shape, dtype=torch.int8).scatter_reduce(2, index, src, "amin", include_self=False)
    kblock = sel.kblock.cpu()
    shape = (b, hkv, plan.n_q_tiles, plan.n_kv_tiles)
    index = (torch.arange(plan.kv_len) // bn).view(1, 1, 1, -1).expand(b, hkv, plan.n_q_tiles, -1)
    anyt = torch.zeros(shape, dtype=torch.int8).scatter_reduce(3, index, anyq[..., kblock], "amax", include_self=False)
    allt = torch.ones(shape, dtype=torch.int8).scatter_reduce(3, index, allq[..., kblock], "amin", include_self=False)
    return torch.where(allt > 0, FULL, torch.where(anyt > 0, PARTIAL, EMPTY)).to(torch.int8)


def call_lists(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, data: list):
    """Every (batch element, head group, key-value head)'s tiles at this call.

    Args:
        plan: the pattern's plan (identity order).
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``.
        data: the input tensors in declaration order.

    Returns:
        A list of ``(batch, heads, (row_ptr, cols, state), tile_mask)``, where ``tile_mask(q_tiles,
        kv_tiles) -> allowed [P, BM, BN]`` is exact per element on the partial tiles; every (batch
        element, head) appears once.

    Raises:
        InputError: when ``data`` does not hold the pattern's inputs.
    """
    if not data:
        raise InputError(f"pattern '{plan.pattern.name}' needs its run-time inputs at every call")
    _token_order(plan)
    routes, corners = corner_plans(plan)
    batch, share = q.shape[0], q.shape[1] // k.shape[1]
    voters = routing.voters(plan.pattern, plan.heads)
    selections = {p: routing.select(p, q, k, plan.sizes, voters[p]) for p in routes}
    states = [tile_states(selections[p], plan) for p in routes]
    cps = [inputs.call_plan(c, data, batch) for c in corners]
    out = []
    for b in range(batch):
        ctx = cps[0].bound(b)
        for group in plan.groups:
            for kvh in range(k.shape[1]):
                heads = tuple(h for h in group.heads if h // share == kvh)
                if not heads:
                    continue
                h0 = heads[0]
                per_corner = [
                    cp.states[min(b, cp.states.shape[0] - 1), c.head_group[h0]].cpu()
                    for cp, c in zip(cps, corners, strict=True)
                ]
                merged = dynamic.merge(
                    SimpleNamespace(routes=routes, corners=torch.stack(per_corner)), [s[b, kvh] for s in states]
                )
                rows, cols = torch.nonzero(merged, as_tuple=True)
                row_ptr = torch.zeros(plan.n_q_tiles + 1, dtype=torch.int64)
                row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=plan.n_q_tiles), 0)
                chosen = {p: s.chosen[b, kvh].cpu() for p, s in selections.items()}
                mask_fn = dynamic._evaluate_tiles(plan, group.node, h0, chosen, ctx)
                out.append((b, heads, (row_ptr, cols, merged[rows, cols]), mask_fn))
    return out


def _token_order(plan: BlockPlan) -> None:
    """Refuse a plan whose tiles reorder tokens (the route's groups and blocks are in token order)."""
    for order, n in ((plan.q_order, plan.q_len), (plan.kv_order, plan.kv_len)):
        if order is not None and not bool((order.cpu() == torch.arange(n)).all()):
            raise ValueError(f"pattern '{plan.pattern.name}': route(...) with run-time inputs needs token order")


def plan_for(static: BlockPlan, bound) -> inputplan.InputPlan:
    """``Pattern.plan(..., **inputs)`` of a pattern with ``route``: exact for the data where the choice cannot matter.

    A tile is empty or full when every corner of the routes says so for this data; partial when every
    corner and the plan without data say partial (no route reaches it); else 3, decided by ``q`` and ``k``.

    Args:
        static: the plan without data (token order).
        bound: the call's validated inputs (:class:`patterndsl.binding.Inputs`).

    Returns:
        An :class:`~patterndsl.analysis.inputplan.InputPlan` whose states may hold 3.
    """
    _token_order(static)
    _, corners = corner_plans(static)
    cps = [inputplan.call_plan(c, bound) for c in corners]
    count = max(cp.states.shape[0] for cp in cps)
    nqb, nkb = static.n_q_tiles, static.n_kv_tiles
    states = torch.empty(count, len(static.groups), nqb, nkb, dtype=torch.int8)
    for g, group in enumerate(static.groups):
        h0 = group.heads[0]
        pairs = zip(cps, corners, strict=True)
        per = torch.stack([cp.states[:, c.head_group[h0]].cpu().expand(count, -1, -1) for cp, c in pairs])
        agree = (per == per[0]).all(0)
        fixed = group.tiles.to_dense(nqb, nkb) == PARTIAL
        known = agree & ((per[0] != PARTIAL) | fixed)
        states[:, g] = torch.where(known, per[0], torch.full_like(per[0], DYNAMIC))
    return inputplan.InputPlan(static, states, bound)
