"""Stage 4 (block plan) for patterns with run-time inputs: the static bound and the call-time plan.

Comes in: a bound pattern that reads inputs (``within``, ``where`` over an input), sizes and
tiles; at a call, the validated inputs (:class:`patterndsl.binding.Inputs`). Goes out:

* :func:`static_plan`: the plan without data. Every primitive that reads inputs is replaced by
  ``empty``/``full`` by polarity (:func:`patterndsl.ir.input_bound`); a tile is exact where the
  two bounds agree and 3 (decided at the call) elsewhere, as for ``route``.
* :func:`call_plan`: the exact plan for the data, :class:`InputPlan`, with tile states
  ``[batch, groups, nqb, nkb]``, never an ``Lq x Lk`` tensor. Each sub-pattern gives a state per
  tile (0, 1, 2, or 3 = not decided by tile reasoning), combined through ``| & ~`` on the tile
  grid; only the tiles still 3 at the top are evaluated element by element.

  - static sub-patterns: the static plan of that sub-pattern (cached per sizes);
  - ``where`` over inputs: conditions that read only query-side values (``q``, ``tag[q]``, ...)
    are evaluated once per query position and reduced per tile row, likewise key-side ones per
    key tile; a row set combined with a column set by ``or``/``and`` is exact on every tile
    (``R x all | all x C`` is full iff one of them is full). Anything else is bounded by
    intervals over per-tile minima and maxima of the inputs;
  - ``within(SEG, P)``: segments are the runs of ``SEG`` (their starts: where ``SEG`` changes); every
    (tile, segment) overlap is a box, and ``P`` is classified on each box in the segment's
    coordinates by the primitives' own tile rules (bands of one ``&`` merged into one band).
    Only boxes those rules cannot decide are evaluated element by element. ``P`` built from
    ``causal``/``window``/``sink``/``global``/``blocks`` is planned instead by
    :mod:`patterndsl.analysis.segments`: every box exact from cuts, as torch ops on the inputs'
    device, no element work and (``static_shapes``) no host synchronisation.

  Cost ``O(Lq + Lk + tiles + boxes)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from patterndsl import ir, primitives, semantics
from patterndsl.analysis import segments
from patterndsl.analysis.plan import (
    DYNAMIC,
    EMPTY,
    FULL,
    PARTIAL,
    BlockPlan,
    HeadGroup,
    PlanStats,
    Runs,
    RunTiles,
    TileList,
)
from patterndsl.primitives.band import band
from patterndsl.primitives.common import BIG
from patterndsl.primitives.inputs import Bound
from patterndsl.sizes import Sizes

#: Pairs evaluated per chunk when tiles are evaluated element by element.
CHUNK_ELEMENTS = 1 << 22
#: How many times a box of a segment that the tile rules cannot decide is halved before its
#: elements are evaluated (2 * log2 of the largest tile side reaches single rows and columns).
SPLIT_DEPTH = 16


# --------------------------------------------------------------------------- static plan


def static_plan(pir: ir.PatternIR, q_len: int, kv_len: int, heads: int, block, order: str) -> BlockPlan:
    """The plan of an input pattern without data: exact tiles where no input can change them, 3 elsewhere.

    Args:
        pir: the bound pattern (reads inputs).
        q_len, kv_len, heads, block: sizes and tiles.
        order: ``"auto"`` or ``"identity"``. With ``"auto"`` the order is the one the part every
            input leaves in place (the lower bound) plans best in, valid for any data; a pattern
            with ``within`` keeps token order (segments are runs of positions).

    Returns:
        A :class:`BlockPlan` whose head groups hold the original nodes and states 0/1/2/3.
    """
    from patterndsl.analysis import planner

    lower = _bounded(pir, True)
    upper = _bounded(pir, False)
    cands = orders(pir, q_len, kv_len, heads, block, order)
    lo = planner.plan(lower, q_len, kv_len, heads, block, "auto", orders=cands)
    chosen = [c for c in cands if c[0] == lo.order]
    up = planner.plan(upper, q_len, kv_len, heads, block, "auto", orders=chosen)
    groups, head_group = planner._head_groups(pir, heads)
    out = []
    stats = PlanStats(total_pairs=heads * q_len * kv_len)
    nqb, nkb = lo.n_q_tiles, lo.n_kv_tiles
    for node, hs in groups:
        runs = _agreed(lo.group_of(hs[0]).runs, up.group_of(hs[0]).runs, nkb)
        out.append(HeadGroup(tuple(hs), node, RunTiles(runs, nqb, nkb), runs))
        n = len(hs)
        count = np.bincount(runs.state.numpy(), (runs.hi - runs.lo).numpy(), DYNAMIC + 1).astype(np.int64)
        stats.tiles_full += int(count[FULL]) * n
        stats.tiles_partial += int(count[PARTIAL]) * n
        stats.tiles_dynamic += int(count[DYNAMIC]) * n
        stats.tiles_empty += (nqb * nkb - int(count.sum())) * n
    stats.allowed_pairs = lo.stats.allowed_pairs
    stats.visited_pairs = up.stats.visited_pairs
    stats.extra["dynamic_pairs_bound"] = up.stats.allowed_pairs - lo.stats.allowed_pairs
    return BlockPlan(
        pir,
        q_len,
        kv_len,
        heads,
        lo.block_m,
        lo.block_n,
        lo.q_perm,
        lo.kv_perm,
        lo.order,
        tuple(out),
        tuple(head_group),
        stats,
    )


def _agreed(a: Runs, b: Runs, nkb: int) -> Runs:
    """Tile by tile, ``a``'s state where ``a`` and ``b`` agree on it (and it is not 3), else 3; empty where both are.

    On the runs themselves (cut at every end of either), never on a dense ``[nqb, nkb]`` map: the
    bounds of ``packed_documents`` at 1M are 33 million tiles in a few thousand runs (the dense
    maps took 10 s and 2.7 GB).
    """
    width = nkb + 1  # a run ends at most at nkb: keys of one row never reach the next

    def keyed(r: Runs):
        row = r.row.numpy().astype(np.int64)
        return row * width + r.lo.numpy(), row * width + r.hi.numpy(), r.state.numpy()

    (alo, ahi, ast), (blo, bhi, bst) = keyed(a), keyed(b)
    cuts = np.unique(np.concatenate([alo, ahi, blo, bhi]))
    start, end = cuts[:-1], cuts[1:]

    def state_at(lo, hi, st):
        # the state of the run holding each piece's start (runs are sorted and disjoint), EMPTY outside
        if not len(lo):
            return np.zeros(len(start), np.int8)
        i = np.maximum(np.searchsorted(lo, start, "right") - 1, 0)
        return np.where((start >= lo[i]) & (start < hi[i]), st[i], EMPTY)

    sa, sb = state_at(alo, ahi, ast), state_at(blo, bhi, bst)
    keep = (sa != EMPTY) | (sb != EMPTY)
    state = np.where((sa == sb) & (sa != DYNAMIC), sa, DYNAMIC)[keep]
    start, end = start[keep], end[keep]
    row = start // width
    return Runs.merged(row, start - row * width, end - row * width, state)


def orders(pir: ir.PatternIR, q_len: int, kv_len: int, heads: int, block, order: str) -> list:
    """The candidate token orders of an input pattern: those of its lower bound, identity first.

    Only the identity with ``order="identity"`` or when the pattern uses ``within``.
    """
    from patterndsl.analysis import reorder

    lower = _bounded(pir, True)
    nodes = [lower.node_for_head(h) for h in range(heads)]
    cands = reorder.candidates([n for n in nodes if n is not None], pir.layout, q_len, kv_len, tuple(block))
    nested = any(isinstance(sub, ir.Prim) and sub.name == "within" for n in pir.nodes() for sub in ir.walk(n))
    return cands[:1] if order == "identity" or nested else cands


def _bounded(pir: ir.PatternIR, lower: bool) -> ir.PatternIR:
    heads = tuple(ir.HeadRule(r.lo, r.hi, ir.input_bound(r.node, lower), r.span) for r in pir.heads)
    default = None if pir.default is None else ir.input_bound(pir.default, lower)
    return ir.PatternIR(pir.name, pir.params, pir.layout, heads, default, pir.span)


# --------------------------------------------------------------------------- the call-time plan


@dataclass
class InputPlan:
    """The exact plan of an input pattern for one call's data.

    Attributes:
        static: the plan without data (:func:`static_plan`): sizes, head groups, tiles.
        states: int8 ``[batch, groups, nqb, nkb]``: 0 empty, 1 partial, 2 full, per batch element
            and head group (``static.groups``).
        inputs: the inputs planned for (:class:`patterndsl.binding.Inputs`).
        work: what planning did: ``boxes`` classified, ``boxes_evaluated`` and ``tiles_evaluated``
            element by element, ``elements_evaluated``.
    """

    static: BlockPlan
    states: torch.Tensor
    inputs: object
    work: dict = field(default_factory=dict)

    @functools.cached_property
    def stats(self) -> PlanStats:
        """Tile counts, visited and allowed pairs over every batch element and head, as :class:`PlanStats`.

        Counting allowed pairs evaluates the partial tiles' elements: computed on first read only.
        """
        plan = self.static
        tiles = self.tiles().cpu()
        area = _areas(plan)
        stats = PlanStats(total_pairs=self.batch * plan.stats.total_pairs)
        stats.tiles_full = int((tiles == FULL).sum())
        stats.tiles_partial = int((tiles == PARTIAL).sum())
        stats.tiles_empty = int((tiles == EMPTY).sum())
        stats.visited_pairs = int((area * (tiles > EMPTY)).sum())
        stats.allowed_pairs = sum(self._count(b, area) for b in range(self.batch))
        stats.elements_evaluated = self.work.get("elements_evaluated", 0)
        stats.tiles_evaluated = self.work.get("tiles_evaluated", 0)
        stats.extra.update(self.work)
        return stats

    def __getattr__(self, name: str):
        # Sizes and tiling read like a BlockPlan's (q_len, block_m, n_q_tiles, order, groups, ...).
        if name.startswith("_") or name in ("static", "states", "inputs", "work"):
            raise AttributeError(name)
        return getattr(self.static, name)

    @property
    def batch(self) -> int:
        return self.states.shape[0]

    @property
    def block(self) -> tuple[int, int]:
        return self.static.block

    @property
    def q_order(self) -> torch.Tensor:
        return self.static.q_order

    @property
    def kv_order(self) -> torch.Tensor:
        return self.static.kv_order

    def tiles(self) -> torch.Tensor:
        """int8 ``[batch, heads, nqb, nkb]``: 0 empty, 1 partial, 2 full, exact for this data."""
        index = torch.tensor(self.static.head_group, dtype=torch.int64, device=self.states.device)
        return self.states[:, index]

    def element(self, b: int) -> BlockPlan:
        """Batch element ``b``'s exact tiles as a :class:`BlockPlan` (for drawing and statistics)."""
        plan = self.static
        nqb = plan.n_q_tiles
        groups = []
        stats = PlanStats(total_pairs=plan.stats.total_pairs)
        for g, group in enumerate(plan.groups):
            dense = self.states[b, g].cpu()
            tl = TileList.from_dense(dense.contiguous())
            groups.append(HeadGroup(group.heads, group.node, tl, Runs.from_tiles(tl, nqb)))
            n = len(group.heads)
            stats.tiles_full += int((dense == FULL).sum()) * n
            stats.tiles_partial += int((dense == PARTIAL).sum()) * n
            stats.tiles_empty += int((dense == EMPTY).sum()) * n
        area = _areas(plan)
        index = torch.tensor(plan.head_group, dtype=torch.int64)
        stats.visited_pairs = int((area * (self.states[b, index.to(self.states.device)] > 0).cpu()).sum())
        stats.allowed_pairs = self._count(b, area)
        stats.elements_evaluated = self.work.get("elements_evaluated", 0)
        stats.extra.update(self.work)
        return dataclasses.replace(plan, groups=tuple(groups), stats=stats)

    def _count(self, b: int, area: torch.Tensor) -> int:
        """Allowed pairs of batch element ``b``: full tiles by area, partial tiles element by element."""
        plan = self.static
        total = 0
        for g, group in enumerate(plan.groups):
            dense = self.states[b, g].cpu()
            count = int(area[dense == FULL].sum())
            m, n = torch.nonzero(dense == PARTIAL, as_tuple=True)
            mask = self.tile_mask(b, g)
            per = max(1, CHUNK_ELEMENTS // (plan.block_m * plan.block_n))
            for lo in range(0, len(m), per):
                rows = m[lo : lo + per]
                valid = (rows[:, None] * plan.block_m + torch.arange(plan.block_m)) < plan.q_len
                count += int((mask(rows, n[lo : lo + per]) & valid[:, :, None]).sum())
            total += count * len(group.heads)
        return total

    def bound(self, b: int) -> Bound:
        """The evaluation context of batch element ``b`` (sizes and its inputs)."""
        return Bound(self.static.sizes, self.inputs.element(b))

    def lists(self, b: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR ``(row_ptr, cols, state)`` of batch element ``b`` and head group ``g``."""
        dense = self.states[b, g].cpu()
        rows, cols = torch.nonzero(dense, as_tuple=True)
        row_ptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=dense.shape[0]), 0)
        return row_ptr, cols, dense[rows, cols]

    def tile_mask(self, b: int, g: int):
        """``f(q_tiles [P], kv_tiles [P]) -> allowed bool [P, BM, BN]`` for batch element ``b``, head group ``g``."""
        plan = self.static
        group = plan.groups[g]
        ctx = self.bound(b)
        bm, bn = plan.block

        q_order, kv_order = plan.q_order, plan.kv_order

        def tile_mask(q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
            rows = (q_tiles[:, None] * bm + torch.arange(bm)).clamp(max=plan.q_len - 1)
            cols = kv_tiles[:, None] * bn + torch.arange(bn)
            valid = cols < plan.kv_len
            i, j = q_order[rows][:, :, None], kv_order[cols.clamp(max=plan.kv_len - 1)][:, None, :]
            return semantics.evaluate(group.node, i, j, group.heads[0], ctx) & valid[:, None, :]

        return tile_mask


def call_plan(static: BlockPlan, inputs, static_shapes: bool | None = None) -> InputPlan:
    """The exact plan of ``static``'s pattern for these inputs.

    Args:
        static: the plan without data (:func:`static_plan`), identity order.
        inputs: validated :class:`patterndsl.binding.Inputs`.
        static_shapes: plan ``within`` groups with static upper bounds on every size, so nothing
            is read back to the host (:func:`patterndsl.analysis.segments.within_states`); None:
            when the inputs are on a CUDA device.

    Returns:
        An :class:`InputPlan`. When every head group is a ``within`` that
        :mod:`patterndsl.analysis.segments` plans, its states are on the inputs' device.
    """
    sizes = static.sizes
    batched = any(
        d.batched and inputs.tensors[d.name].dim() == len(d.dims) and inputs.tensors[d.name].shape[0] > 1
        for d in inputs.decls
    )
    count = inputs.batch if batched else 1
    nqb, nkb = static.n_q_tiles, static.n_kv_tiles
    work = {"elements_evaluated": 0, "boxes": 0, "boxes_evaluated": 0}
    fast = [_device_within(group.node, static.block) for group in static.groups]
    devices = {t.device for t in inputs.tensors.values()}
    device = devices.pop() if all(fast) and len(devices) == 1 else torch.device("cpu")
    if static_shapes is None:
        static_shapes = device.type == "cuda"
    states = torch.zeros(count, len(static.groups), nqb, nkb, dtype=torch.int8, device=device)
    host = None
    for g, group in enumerate(static.groups):
        node = group.node
        if fast[g]:
            seg = _rows(inputs.tensors[node.arg("seg")], count)
            got = segments.within_states(
                seg, node.arg("body"), static.q_len, static.block, group.heads[0], static_shapes, work
            )
            if len(static.groups) == 1:
                states = got.to(device)[:, None]  # the one group: no copy
            else:
                states[:, g] = got.to(device)
            continue
        # The tile reasoning runs on the host (numpy tile rules); inputs on a GPU are copied once.
        if host is None:
            host = [{name: t.cpu() for name, t in inputs.element(b).items()} for b in range(count)]
        if count > 1 and isinstance(node, ir.Prim) and node.name == "within":
            # The whole batch at once (packed documents: the common case).
            seg = torch.stack([h[node.arg("seg")].reshape(-1) for h in host])
            states[:, g] = _Grid(static, None, group.heads[0], work).within_all(seg, node.arg("body"))
            continue
        for b in range(count):
            states[b, g] = _Grid(static, Bound(sizes, host[b]), group.heads[0], work).exact(node)
    if count != inputs.batch:
        states = states.expand(inputs.batch, -1, -1, -1)
    work["tiles_evaluated"] = work.pop("tiles_evaluated", 0)
    return InputPlan(static, states, inputs, work)


def _device_within(node: ir.Node, block) -> bool:
    """Whether ``node`` is a ``within`` that :mod:`patterndsl.analysis.segments` plans on the inputs' device."""
    return isinstance(node, ir.Prim) and node.name == "within" and segments.supported(node.arg("body"), block)


def _rows(seg: torch.Tensor, count: int) -> torch.Tensor:
    """``SEG`` as ``[count, Lk]`` (a tensor shared by the batch serves every row)."""
    flat = seg.reshape(-1, seg.shape[-1])
    return flat if flat.shape[0] == count else flat[:1].expand(count, -1)


class _Grid:
    """Tile states of sub-patterns for one batch element and head, on the identity tile grid."""

    def __init__(self, plan: BlockPlan, ctx: Bound, head: int, work: dict):
        self.plan = plan
        self.ctx = ctx
        self.head = head
        self.work = work
        bm, bn = plan.block
        self.bm, self.bn = bm, bn
        self.nqb, self.nkb = plan.n_q_tiles, plan.n_kv_tiles
        self.offset = plan.kv_len - plan.q_len

    # The tiles' tokens in the plan's order (identity: plain ranges), built only where read.
    @functools.cached_property
    def q_order(self) -> torch.Tensor:
        return self.plan.q_order

    @functools.cached_property
    def kv_order(self) -> torch.Tensor:
        return self.plan.kv_order

    # -- the exact entry point

    def exact(self, node: ir.Node) -> torch.Tensor:
        state = self.state(node)
        if isinstance(node, ir.Prim) and node.name == "within":
            return state  # exact already (its boxes are decided)
        todo = torch.nonzero(state == DYNAMIC)
        if len(todo):
            state[todo[:, 0], todo[:, 1]] = self._evaluate(node, todo[:, 0], todo[:, 1])
        return state

    def _evaluate(self, node: ir.Node, m: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """Exact states of tiles ``(m, n)`` by evaluating ``node`` on their elements."""
        plan, bm, bn = self.plan, self.bm, self.bn
        out = torch.empty(len(m), dtype=torch.int8)
        per = max(1, CHUNK_ELEMENTS // (bm * bn))
        for lo in range(0, len(m), per):
            mm, nn = m[lo : lo + per], n[lo : lo + per]
            rows = mm[:, None] * bm + torch.arange(bm)
            cols = nn[:, None] * bn + torch.arange(bn)
            valid = (rows < plan.q_len)[:, :, None] & (cols < plan.kv_len)[:, None, :]
            i = self.q_order[rows.clamp(max=plan.q_len - 1)][:, :, None]
            j = self.kv_order[cols.clamp(max=plan.kv_len - 1)][:, None, :]
            allowed = semantics.evaluate(node, i, j, self.head, self.ctx) & valid
            got = allowed.sum((1, 2))
            area = valid.sum((1, 2))
            out[lo : lo + per] = _state(got > 0, got == area)
        self.work["tiles_evaluated"] = self.work.get("tiles_evaluated", 0) + len(m)
        self.work["elements_evaluated"] += len(m) * bm * bn
        return out

    # -- states of sub-patterns (3 = not decided by tile reasoning)

    def state(self, node: ir.Node) -> torch.Tensor:
        if not ir.reads_inputs(node):
            return self._static(node)
        if isinstance(node, ir.Not):
            return _not(self.state(node.item))
        if isinstance(node, (ir.Union, ir.Inter)):
            parts = [self.state(item) for item in node.items]
            combine = _union if isinstance(node, ir.Union) else _inter
            out = parts[0]
            for part in parts[1:]:
                out = combine(out, part)
            return out
        if node.name == "within":
            return self._within(node)
        if node.name == "where":
            return self._where(node.arg("pred"))
        return torch.full((self.nqb, self.nkb), DYNAMIC, dtype=torch.int8)

    def _static(self, node: ir.Node) -> torch.Tensor:
        plan = self.plan
        head = self.head if ir.uses_head(node) else 0
        cands = orders(plan.pattern, plan.q_len, plan.kv_len, plan.heads, plan.block, "auto")
        chosen = tuple(c for c in cands if c[0] == plan.order)
        layout = plan.pattern.layout
        tiles = _static_tiles(node, plan.q_len, plan.kv_len, layout, plan.heads, plan.block, head, chosen)
        return tiles.clone()

    # -- where(...) over inputs

    def _where(self, pred: ir.Expr) -> torch.Tensor:
        op = pred.op if isinstance(pred, ir.Logic) else "and"
        items = pred.items if isinstance(pred, ir.Logic) else (pred,)
        by_side: dict[str, list[ir.Expr]] = {"q": [], "k": [], "": [], "qk": []}
        for item in items:
            by_side[_side(item)].append(item)
        parts = []
        rows = cols = None
        if by_side["q"]:
            rows = self._per_position(_join(op, by_side["q"]), "q")
        if by_side["k"]:
            cols = self._per_position(_join(op, by_side["k"]), "k")
        if by_side[""]:
            value = bool(semantics._expr(_join(op, by_side[""]), self._env(0, 0)))
            parts.append(torch.full((self.nqb, self.nkb), FULL if value else EMPTY, dtype=torch.int8))
        if rows is not None or cols is not None:
            parts.append(_cross(op, rows, cols, self.nqb, self.nkb))
        for item in by_side["qk"]:
            parts.append(self._intervals(item))
        combine = _union if op == "or" else _inter
        out = parts[0]
        for part in parts[1:]:
            out = combine(out, part)
        return out

    def _env(self, q, k) -> dict:
        sizes = self.plan.sizes
        return {
            "q": q,
            "k": k,
            "h": self.head,
            "Lq": sizes.q_len,
            "Lk": sizes.kv_len,
            "layout": sizes.layout,
            "inputs": self.ctx.inputs,
        }

    def _per_position(self, pred: ir.Expr, side: str) -> torch.Tensor:
        """Per query (or key) tile: 0 when no position satisfies ``pred``, 2 when all do, else 1."""
        if side == "q":
            pos = self.q_order + self.offset
            env, block, n_tiles = self._env(pos, 0), self.bm, self.nqb
        else:
            pos = self.kv_order
            env, block, n_tiles = self._env(0, pos), self.bn, self.nkb
        value = torch.as_tensor(semantics._expr(pred, env)).expand(pos.shape).to(torch.int64)
        count = torch.zeros(n_tiles, dtype=torch.int64).index_add_(
            0, torch.div(torch.arange(len(pos)), block, rounding_mode="floor"), value
        )
        size = torch.clamp(len(pos) - torch.arange(n_tiles) * block, max=block)
        return _state(count > 0, count == size)

    def _intervals(self, pred: ir.Expr) -> torch.Tensor:
        bounds = _Intervals(self)
        can_true, can_false = bounds.truth(pred)
        undecided = torch.where(can_true, _const(DYNAMIC), _const(EMPTY))
        return torch.where(can_false, undecided, _const(FULL)).expand(self.nqb, self.nkb).contiguous()

    # -- within(SEG, P)

    def _within(self, prim: ir.Prim) -> torch.Tensor:
        seg = self.ctx.inputs[prim.arg("seg")].reshape(1, -1)
        return self.within_all(seg, prim.arg("body"))[0]

    def within_all(self, seg: torch.Tensor, body: ir.Node) -> torch.Tensor:
        """int8 ``[B, nqb, nkb]``: exact states of ``within(SEG, body)`` for ``SEG`` values ``seg [B, Lk]``.

        Every batch element at once: the rows are laid end to end (a run never crosses a row),
        so the pieces, boxes and their classification are one set of tensor operations.
        """
        if segments.supported(body, self.plan.block):
            return segments.within_states(seg, body, self.plan.q_len, self.plan.block, self.head, work=self.work)
        bm, bn = self.bm, self.bn
        count, width = seg.shape
        start, length = _run_starts(seg)
        top = width - 1
        # Query tile m: positions [m*bm + offset, min(...)], key tile n: [n*bn, ...] (in each row).
        qlo = torch.arange(self.nqb) * bm + self.offset
        qhi = torch.clamp(qlo + bm - 1, max=top)
        klo = torch.arange(self.nkb) * bn
        khi = torch.clamp(klo + bn - 1, max=top)
        qm, qr, qa, qb = _pieces(qlo, qhi, start, length, count, width)
        km, kr, ka, kb = _pieces(klo, khi, start, length, count, width)
        # Boxes: every (query piece, key piece) of the same run. Pieces are sorted by run.
        kfirst = torch.searchsorted(kr, qr, right=False)
        klast = torch.searchsorted(kr, qr, right=True)
        owner, inner = _expand(klast - kfirst)
        kidx = kfirst[owner] + inner
        r = qr[owner]
        s = start[r]
        box = (qa[owner] - s, qb[owner] - s, ka[kidx] - s, kb[kidx] - s, length[r])
        self.work["boxes"] += len(box[0])
        state = self._decide(body, box, 0)
        m, n = qm[owner], km[kidx]
        key = (torch.div(s, width, rounding_mode="floor") * self.nqb + m) * self.nkb + n
        # A tile is full only when it is one box covering it all (one segment on both sides) and full;
        # any other tile a non-empty box meets is partial. Only the boxes' tiles are written.
        area = (box[1] - box[0] + 1) * (box[3] - box[2] + 1)
        tile_area = (qhi[m] - qlo[m] + 1) * (khi[n] - klo[n] + 1)
        out = torch.zeros(count * self.nqb * self.nkb, dtype=torch.int8)
        out[key[state > EMPTY]] = PARTIAL
        out[key[(state == FULL) & (area == tile_area)]] = FULL
        return out.view(count, self.nqb, self.nkb)

    def _decide(self, body: ir.Node, box, depth: int) -> torch.Tensor:
        """Exact states of ``body`` on boxes: the tile rules first, then undecided boxes halved along
        their longer side (a sink column or a block edge inside a box is then a box edge), and only
        what is still undecided after :data:`SPLIT_DEPTH` halvings evaluated element by element."""
        state = _box_states(body, *(t.numpy() for t in box), self.head)
        undecided = torch.nonzero(state == DYNAMIC).reshape(-1)
        if not len(undecided):
            return state
        sub = [t[undecided] for t in box]
        qa, qb, ka, kb, length = sub
        if depth >= SPLIT_DEPTH:
            state[undecided] = self._evaluate_boxes(body, sub)
            return state
        tall = (qb - qa) >= (kb - ka)
        qmid = torch.div(qa + qb, 2, rounding_mode="floor")
        kmid = torch.div(ka + kb, 2, rounding_mode="floor")
        first = (qa, torch.where(tall, qmid, qb), ka, torch.where(tall, kb, kmid), length)
        second = (torch.where(tall, qmid + 1, qa), qb, torch.where(tall, ka, kmid + 1), kb, length)
        halves = self._decide(body, [torch.cat([a, b]) for a, b in zip(first, second, strict=True)], depth + 1)
        a, b = halves[: len(qa)], halves[len(qa) :]
        state[undecided] = _state((a > EMPTY) | (b > EMPTY), (a == FULL) & (b == FULL))
        return state

    def _evaluate_boxes(self, body: ir.Node, box) -> torch.Tensor:
        qa, qb, ka, kb, length = box
        out = torch.empty(len(qa), dtype=torch.int8)
        h = max(int((qb - qa).max()) + 1, 1)
        w = max(int((kb - ka).max()) + 1, 1)
        per = max(1, CHUNK_ELEMENTS // (h * w))
        for lo in range(0, len(qa), per):
            sl = slice(lo, lo + per)
            q = qa[sl, None, None] + torch.arange(h)[None, :, None]
            k = ka[sl, None, None] + torch.arange(w)[None, None, :]
            valid = (q <= qb[sl, None, None]) & (k <= kb[sl, None, None])
            n = length[sl, None, None]
            allowed = semantics.evaluate_local(body, q, k, self.head, n) & valid
            got = allowed.sum((1, 2))
            out[sl] = _state(got > 0, got == valid.sum((1, 2)))
        self.work["boxes_evaluated"] += len(qa)
        self.work["elements_evaluated"] += len(qa) * h * w
        return out


# --------------------------------------------------------------------------- helpers


def _areas(plan: BlockPlan) -> torch.Tensor:
    """int64 ``[nqb, nkb]``: the in-range pairs of every tile."""
    rows = torch.clamp(plan.q_len - torch.arange(plan.n_q_tiles) * plan.block_m, max=plan.block_m)
    cols = torch.clamp(plan.kv_len - torch.arange(plan.n_kv_tiles) * plan.block_n, max=plan.block_n)
    return rows[:, None] * cols[None, :]


def _state(nonempty: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    # Arithmetic on the tile grid, not masked assignment: one pass per operation, no index lists.
    return nonempty.to(torch.int8) + (full & nonempty).to(torch.int8)


def _const(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int8)


def _not(a: torch.Tensor) -> torch.Tensor:
    """Empty and full swap; partial stays partial, undecided undecided."""
    return torch.where(a == DYNAMIC, a, FULL - a)


def _union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact where it can be: full if either is full, the other's state if one is empty, else 3."""
    one_empty = torch.where(a == EMPTY, b, torch.where(b == EMPTY, a, _const(DYNAMIC)))
    return torch.where((a == FULL) | (b == FULL), _const(FULL), one_empty)


def _inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _not(_union(_not(a), _not(b)))


def _cross(op: str, rows, cols, nqb: int, nkb: int) -> torch.Tensor:
    """A row set (query tiles' states) combined with a column set: exact on every tile."""
    if rows is None:
        return cols[None, :].expand(nqb, nkb).clone()
    if cols is None:
        return rows[:, None].expand(nqb, nkb).clone()
    r, c = rows[:, None], cols[None, :]
    if op == "or":  # R x all | all x C: full iff one is full, empty iff both are
        return _state((r > EMPTY) | (c > EMPTY), (r == FULL) | (c == FULL))
    return _state((r > EMPTY) & (c > EMPTY), (r == FULL) & (c == FULL))


def _join(op: str, items: list[ir.Expr]) -> ir.Expr:
    return items[0] if len(items) == 1 else ir.Logic(op, tuple(items))


def _side(expr: ir.Expr) -> str:
    """Which positions an expression reads: ``"q"``, ``"k"``, ``"qk"`` (both) or ``""`` (neither)."""
    names = {e.name for e in ir.walk_expr(expr) if isinstance(e, ir.Var)}
    sides = {e.side for e in ir.walk_expr(expr) if isinstance(e, ir.Coord)}
    sides |= names & {"q", "k"}
    return "qk" if len(sides) == 2 else "".join(sides)


def _expand(count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts ``c [n]``: ``(owner, inner)``; ``owner`` repeats ``i`` ``c[i]`` times, ``inner`` counts 0..c[i]-1.

    numpy: torch.repeat_interleave has a large fixed cost per call on CPU.
    """
    c = count.numpy()
    owner = np.repeat(np.arange(len(c), dtype=np.int64), c)
    starts = np.cumsum(c) - c
    inner = np.arange(len(owner), dtype=np.int64) - np.repeat(starts, c)
    return torch.from_numpy(owner), torch.from_numpy(inner)


def _run_starts(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, length)`` of the runs of equal values of each row of ``seg [B, L]``, rows laid end to end.

    ``start`` indexes the flattened rows; every row starts a run. No per-position run index.
    """
    flat = seg.reshape(-1)
    change = torch.ones(flat.numel(), dtype=torch.bool)
    if flat.numel() > 1:
        torch.ne(flat[1:], flat[:-1], out=change[1:])
    change[:: seg.shape[1]] = True
    start = torch.nonzero(change).reshape(-1)
    ends = torch.cat([start[1:], torch.tensor([flat.numel()])])
    return start, ends - start


def _pieces(lo: torch.Tensor, hi: torch.Tensor, start: torch.Tensor, length: torch.Tensor, count: int, width: int):
    """Cut each tile ``[lo, hi]`` of each of ``count`` rows at segment boundaries.

    Returns ``(tile, run, first, last)`` sorted by run: ``tile`` within its row, ``run`` an index
    of ``start``, ``first``/``last`` positions in the rows laid end to end (a row's positions
    below 0, queries when Lq > Lk, belong to its first run). The run of a position is found among
    the runs' starts (``searchsorted``): only the tiles' ends are looked up, never every position.
    """
    tiles = len(lo)
    base = (torch.arange(count) * width)[:, None]
    glo, ghi = (base + lo).reshape(-1), (base + hi).reshape(-1)
    rlo = torch.searchsorted(start, (base + lo.clamp(0, width - 1)).reshape(-1), right=True) - 1
    rhi = torch.searchsorted(start, (base + hi.clamp(0, width - 1)).reshape(-1), right=True) - 1
    tile, inner = _expand(rhi - rlo + 1)
    r = rlo[tile] + inner
    row_start = torch.div(tile, tiles, rounding_mode="floor") * width
    first = torch.where(start[r] == row_start, glo[tile], torch.maximum(start[r], glo[tile]))
    last = torch.minimum(start[r] + length[r] - 1, ghi[tile])
    order = torch.argsort(r, stable=True)
    return tile[order] % tiles, r[order], first[order], last[order]


_STATIC_CACHE: dict = {}


def _static_tiles(node, q_len, kv_len, layout, heads, block, head, chosen: tuple) -> torch.Tensor:
    """Dense tiles ``[nqb, nkb]`` of a static sub-pattern in the order ``chosen``, cached per sizes."""
    from patterndsl.analysis import planner

    key = (node, q_len, kv_len, layout, heads, block, head, chosen[0][0])
    got = _STATIC_CACHE.get(key)
    if got is None:
        pir = ir.PatternIR("sub", (), layout, (), node)
        p = planner.plan(pir, q_len, kv_len, heads, block, "auto", orders=chosen)
        got = p.group_of(head).tiles.to_dense(p.n_q_tiles, p.n_kv_tiles)
        if len(_STATIC_CACHE) > 256:
            _STATIC_CACHE.clear()
        _STATIC_CACHE[key] = got
    return got


# --------------------------------------------------------------------------- boxes in segment coordinates


class _Boxes:
    """One side of boxes as the tile rules read pieces: contiguous 1-D ranges ``[first, last]``."""

    def __init__(self, first: np.ndarray, last: np.ndarray):
        self.fa = self.fmin = first
        self.fmax = last
        self.fn = last - first + 1
        self.fs = np.ones_like(first)
        self.isap = np.ones(len(first), dtype=bool)
        self.a = first[:, None]
        self.s = np.ones_like(self.a)
        self.n = self.fn[:, None]
        self.last = last[:, None]


def _box_states(node: ir.Node, qa, qb, ka, kb, length, head: int) -> torch.Tensor:
    """int8 states (3 = undecided) of ``node`` on boxes ``[qa, qb] x [ka, kb]`` of segments of ``length``."""
    qp, kp = _Boxes(qa, qb), _Boxes(ka, kb)
    from patterndsl.analysis.classify import Env

    env = Env(Sizes(BIG, BIG), head)
    return _boxes(node, qp, kp, env)


def _boxes(node: ir.Node, qp: _Boxes, kp: _Boxes, env) -> torch.Tensor:
    size = len(qp.fa)
    if isinstance(node, ir.Not):
        return _not(_boxes(node.item, qp, kp, env))
    if isinstance(node, (ir.Union, ir.Inter)):
        items = list(node.items)
        parts = []
        if isinstance(node, ir.Inter):
            bands = [(item, b) for item in items if (b := _band_of(item, env)) is not None]
            if len(bands) > 1:
                lo = max(b[0] for _, b in bands)
                hi = min(b[1] for _, b in bands)
                mod = math.lcm(*(b[2] for _, b in bands))
                n, f, ok = band(qp, kp, lo, hi, mod)
                parts.append(_numpy_state(n, f, ok))
                items = [item for item in items if all(item is not it for it, _ in bands)]
        parts += [_boxes(item, qp, kp, env) for item in items]
        combine = _union if isinstance(node, ir.Union) else _inter
        out = parts[0]
        for part in parts[1:]:
            out = combine(out, part)
        return out
    if node.name == "where" and _reads_sizes(node.arg("pred")):
        return torch.full((size,), DYNAMIC, dtype=torch.int8)
    rule = primitives.lookup(node.name).classify
    got = None if rule is None else rule(node, qp, kp, env)
    if got is None:
        return torch.full((size,), DYNAMIC, dtype=torch.int8)
    return _numpy_state(*got)


def _numpy_state(nonempty, full, ok) -> torch.Tensor:
    out = np.where(nonempty, PARTIAL, EMPTY).astype(np.int8)
    out[full & nonempty] = FULL
    out[~np.asarray(ok, dtype=bool)] = DYNAMIC
    return torch.from_numpy(out)


def _band_of(node: ir.Node, env):
    if not isinstance(node, ir.Prim):
        return None
    if node.name == "where" and _reads_sizes(node.arg("pred")):
        return None
    rule = primitives.lookup(node.name).band
    return None if rule is None else rule(node, env)


def _reads_sizes(pred) -> bool:
    """A predicate reading ``Lq``/``Lk``/``h``: inside a segment those are per box, so it is evaluated."""
    return isinstance(pred, ir.Expr) and any(
        isinstance(e, ir.Var) and e.name in ("Lq", "Lk", "h") for e in ir.walk_expr(pred)
    )


# --------------------------------------------------------------------------- interval bounds over tiles


class _Intervals:
    """Bounds of a ``where`` expression over every tile: per-tile minima and maxima of positions and inputs."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.q = _tile_range(grid.q_order + grid.offset, grid.bm)
        self.k = _tile_range(grid.kv_order, grid.bn)

    def truth(self, e: ir.Expr):
        """``(can_true, can_false)`` bool tensors broadcastable to ``[nqb, nkb]``."""
        if isinstance(e, ir.Logic):
            parts = [self.truth(item) for item in e.items]
            if e.op == "and":
                return _all(p[0] for p in parts), _any(p[1] for p in parts)
            return _any(p[0] for p in parts), _all(p[1] for p in parts)
        if isinstance(e, ir.LNot):
            t, f = self.truth(e.operand)
            return f, t
        if isinstance(e, ir.Const):
            return torch.tensor(bool(e.value)), torch.tensor(not e.value)
        if isinstance(e, ir.Cmp):
            (a, b), (c, d) = self.value(e.left), self.value(e.right)
            op = e.op
            if op == "==":
                return (a <= d) & (c <= b), ~((a == b) & (c == d) & (a == c))
            if op == "!=":
                return ~((a == b) & (c == d) & (a == c)), (a <= d) & (c <= b)
            if op in (">", ">="):
                (a, b), (c, d) = (c, d), (a, b)
                op = "<" if op == ">" else "<="
            if op == "<":
                return a < d, b >= c
            return a <= d, b > c
        return torch.tensor(True), torch.tensor(True)

    def value(self, e: ir.Expr):
        """``(lo, hi)`` int64 tensors broadcastable to ``[nqb, nkb]``."""
        grid = self.grid
        if isinstance(e, ir.Const):
            v = torch.tensor(int(e.value))
            return v, v
        if isinstance(e, ir.Var):
            if e.name == "q":
                return self.q[0][:, None], self.q[1][:, None]
            if e.name == "k":
                return self.k[0][None, :], self.k[1][None, :]
            v = torch.tensor(int(grid._env(0, 0)[e.name]))
            return v, v
        if isinstance(e, ir.InputRef):
            return self._input(e)
        if isinstance(e, ir.Neg):
            lo, hi = self.value(e.operand)
            return -hi, -lo
        if isinstance(e, ir.Func):
            args = [self.value(a) for a in e.args]
            if e.fn == "abs":
                ((lo, hi),) = args
                return torch.where((lo <= 0) & (hi >= 0), 0, torch.minimum(lo.abs(), hi.abs())), torch.maximum(
                    lo.abs(), hi.abs()
                )
            pick = torch.minimum if e.fn == "min" else torch.maximum
            return pick(args[0][0], args[1][0]), pick(args[0][1], args[1][1])
        if isinstance(e, ir.Arith):
            (a, b), (c, d) = self.value(e.left), self.value(e.right)
            if e.op == "+":
                return a + c, b + d
            if e.op == "-":
                return a - d, b - c
            if e.op == "*":
                corners = torch.stack(torch.broadcast_tensors(a * c, a * d, b * c, b * d))
                return corners.min(0).values, corners.max(0).values
            if isinstance(e.right, ir.Const) and int(e.right.value) > 0:
                c = int(e.right.value)
                if e.op == "//":
                    return torch.div(a, c, rounding_mode="floor"), torch.div(b, c, rounding_mode="floor")
                same = torch.div(a, c, rounding_mode="floor") == torch.div(b, c, rounding_mode="floor")
                return torch.where(same, a % c, 0), torch.where(same, b % c, c - 1)
        big = torch.tensor(BIG)
        return -big, big

    def _input(self, e: ir.InputRef):
        table = self.grid.ctx.inputs[e.name]
        if e.kind != "int":
            big = torch.tensor(BIG)
            return -big, big
        if len(e.indices) == 1 and isinstance(e.indices[0], ir.Var) and e.indices[0].name in ("q", "k"):
            name = e.indices[0].name
            values = table.reshape(-1).to(torch.int64).cpu()
            top = values.numel() - 1
            if name == "q":
                pos = (self.grid.q_order + self.grid.offset).clamp(0, top)
                lo, hi = _tile_range(values[pos], self.grid.bm)
                return lo[:, None], hi[:, None]
            lo, hi = _tile_range(values[self.grid.kv_order.clamp(0, top)], self.grid.bn)
            return lo[None, :], hi[None, :]
        if all(_side(i) == "" for i in e.indices):
            v = torch.as_tensor(semantics._expr(e, self.grid._env(0, 0))).to(torch.int64).cpu()
            return v, v
        values = table.to(torch.int64)
        return values.min().cpu(), values.max().cpu()


def _tile_range(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of ``block`` consecutive entries: ``(min, max)``."""
    n = len(values)
    tiles = -(-n // block)
    pad = tiles * block - n
    lo = torch.nn.functional.pad(values, (0, pad), value=int(values.max()) if n else 0).view(tiles, block)
    hi = torch.nn.functional.pad(values, (0, pad), value=int(values.min()) if n else 0).view(tiles, block)
    return lo.min(1).values, hi.max(1).values


def _all(items):
    out = None
    for x in items:
        out = x if out is None else out & x
    return out


def _any(items):
    out = None
    for x in items:
        out = x if out is None else out | x
    return out
