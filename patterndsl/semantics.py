"""Stage 3 of the pipeline: the exact, dense meaning of every pattern.

Comes in: canonical IR (:mod:`patterndsl.ir`) and concrete sizes. Goes out:
boolean tensors saying which (head, query, key) pairs are allowed. This module
is the reference every other stage is measured against: the block plan calls
:func:`evaluate` on tiles it cannot classify symbolically, the CPU executor
calls it for partial tiles, and :func:`mask` is ``Pattern.mask``. Everything
here is vectorised torch over original (un-reordered) indices; the rules are
written out for users in ``docs/SEMANTICS.md``. Each primitive's own meaning
is the ``meaning`` rule of its record in :mod:`patterndsl.primitives`; this
module combines them and holds what they share: the ``where`` expression
evaluator, the ``random`` generator, NATTEN's neighborhood rule and ``route``'s
choice.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from patterndsl import ir, primitives
from patterndsl.errors import HeadsError, InputError, LayoutError, PatternError, PatternTypeError, PatternValueError
from patterndsl.sizes import Sizes

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SEED_MUL = 0x2545F4914F6CDD1D
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


#: Entries of the largest dense mask :func:`mask` builds (``batch x heads x Lq x Lk``).
MASK_LIMIT = 1 << 28

#: The sizes and layout a pattern is evaluated at (``Context(q_len, kv_len, layout)``, ``ctx.offset``).
Context = Sizes


# --------------------------------------------------------------------------- small helpers


def _floordiv(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a // b
    return torch.div(torch.as_tensor(a), b, rounding_mode="floor")


def _mod(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return torch.remainder(torch.as_tensor(a), b)


def _shape_of(*values) -> torch.Size:
    # Broadcast by hand: torch.broadcast_shapes imports torch.fx's symbolic shapes and sympy
    # (0.3 s) on its first call, which would land on a CPU user's first attention call.
    shapes = [v.shape for v in values if isinstance(v, torch.Tensor)]
    rank = max((len(s) for s in shapes), default=0)
    out = [1] * rank
    for shape in shapes:
        for axis, size in enumerate(shape, start=rank - len(shape)):
            if size != 1:
                if out[axis] not in (1, size):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[axis] = size
    return torch.Size(out)


def _full_like(value: bool, *like) -> torch.Tensor:
    device = next((v.device for v in like if isinstance(v, torch.Tensor)), None)
    return torch.full(_shape_of(*like), value, dtype=torch.bool, device=device)


def _positions(i: torch.Tensor, j: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    return i + ctx.offset, j


def grid_coords(pos: torch.Tensor, layout: ir.Layout) -> tuple[torch.Tensor, ...]:
    """Grid coordinates of flattened positions under a row-major layout (last axis fastest).

    Args:
        pos: int64 tensor of positions.
        layout: the pattern's layout.

    Returns:
        One int64 tensor per axis, in layout order.
    """
    coords = []
    inner = 1
    for extent in reversed(layout.shape):
        coords.append(torch.remainder(torch.div(pos, inner, rounding_mode="floor"), extent))
        inner *= extent
    return tuple(reversed(coords))


def _per_axis(value, rank: int, what: str) -> tuple:
    if isinstance(value, tuple):
        if len(value) != rank:
            raise PatternTypeError(f"{what} has {len(value)} entries but the layout has {rank} axes")
        return value
    return (value,) * rank


def _need_layout(ctx: Context, prim: ir.Prim) -> ir.Layout:
    if ctx.layout is None:
        raise LayoutError(f"{prim.name}(...) needs a 'layout grid(...)' in the pattern", prim.span)
    return ctx.layout


# --------------------------------------------------------------------------- random(...)


def _splitmix_next(state: int) -> tuple[int, int]:
    state = (state + _GOLDEN) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return state, z ^ (z >> 31)


def random_blocks(seed: int, qblock: int, n_key_blocks: int, count: int) -> tuple[int, ...]:
    """The key blocks ``random(count, block, seed)`` gives to one query block.

    The generator is splitmix64 with 64-bit wrap-around. ``next(state)``::

        state = (state + 0x9E3779B97F4A7C15) mod 2^64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) mod 2^64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) mod 2^64
        return state, z ^ (z >> 31)

    The initial state is ``(seed * 0x2545F4914F6CDD1D + qblock * 0x9E3779B97F4A7C15) mod 2^64``
    (negative seeds or query blocks are reduced mod 2^64). ``r = min(count, n_key_blocks)``
    distinct blocks are drawn with Floyd's algorithm: ``S = {}``; for ``jj`` from
    ``n_key_blocks - r`` to ``n_key_blocks - 1``: ``state, z = next(state)``,
    ``t = z mod (jj + 1)``, add ``jj`` to ``S`` if ``t`` is already in ``S``, else add ``t``.

    Args:
        seed: the pattern's ``seed``.
        qblock: the query block ``q // block`` of the end-aligned query position.
        n_key_blocks: ``ceil(Lk / block)``.
        count: the pattern's ``blocks``.

    Returns:
        The drawn key blocks, sorted ascending.
    """
    state = (seed * _SEED_MUL + qblock * _GOLDEN) & _MASK64
    r = max(0, min(count, n_key_blocks))
    chosen: set[int] = set()
    for jj in range(n_key_blocks - r, n_key_blocks):
        state, z = _splitmix_next(state)
        t = z % (jj + 1)
        chosen.add(jj if t in chosen else t)
    return tuple(sorted(chosen))


def random_table(seed: int, qblocks: range, n_key_blocks: int, count: int) -> torch.Tensor:
    """:func:`random_blocks` for many query blocks at once, vectorised over the query blocks.

    Args:
        seed: the pattern's ``seed``.
        qblocks: consecutive query blocks (may start below 0 when ``Lq > Lk``).
        n_key_blocks: ``ceil(Lk / block)``.
        count: the pattern's ``blocks``.

    Returns:
        int64 ``[len(qblocks), min(count, n_key_blocks)]``; row ``a`` holds the sorted key
        blocks of query block ``qblocks[a]``.
    """
    r = max(0, min(count, n_key_blocks))
    n = len(qblocks)
    if n == 0 or r == 0:
        return torch.zeros(n, r, dtype=torch.int64)
    qb = np.arange(qblocks.start, qblocks.stop, qblocks.step, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        state = np.uint64((seed * _SEED_MUL) & _MASK64) + qb * np.uint64(_GOLDEN)
        chosen = np.empty((n, r), dtype=np.uint64)
        for step, jj in enumerate(range(n_key_blocks - r, n_key_blocks)):
            state = state + np.uint64(_GOLDEN)
            z = state.copy()
            z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
            z = z ^ (z >> np.uint64(31))
            t = z % np.uint64(jj + 1)
            seen = (chosen[:, :step] == t[:, None]).any(axis=1)
            chosen[:, step] = np.where(seen, np.uint64(jj), t)
    table = torch.from_numpy(chosen.astype(np.int64))
    return torch.sort(table, dim=1).values


@functools.lru_cache(maxsize=64)
def _random_allowed(seed: int, qb_lo: int, qb_hi: int, n_key_blocks: int, count: int) -> torch.Tensor:
    # Bool [qb_hi - qb_lo, n_key_blocks]; cached because partial tiles ask again and again.
    table = random_table(seed, range(qb_lo, qb_hi), n_key_blocks, count)
    allowed = torch.zeros(qb_hi - qb_lo, n_key_blocks, dtype=torch.bool)
    allowed.scatter_(1, table, True)
    return allowed


# --------------------------------------------------------------------------- neighborhood(...)


def neighborhood_axis(x, y, n: int, size: int, dilation: int, stride: int, causal: bool) -> torch.Tensor:
    """NATTEN's neighborhood rule on one axis (LANGUAGE.md section 6).

    Args:
        x: int64 tensor of query coordinates on this axis.
        y: int64 tensor of key coordinates, broadcastable against ``x``.
        n: the axis length.
        size: window size ``s``.
        dilation: ``d``; the axis splits into ``d`` interleaved groups.
        stride: ``r``; queries whose index in their group shares ``p // r`` share a window.
        causal: the window ends at the query.

    Returns:
        Bool tensor, the broadcast shape of ``x`` and ``y``.
    """
    d, s, r = dilation, size, stride
    g = torch.remainder(x, d)
    same_group = torch.remainder(y, d) == g
    p = torch.div(x, d, rounding_mode="floor")
    t = torch.div(y, d, rounding_mode="floor")
    m = torch.div(n - g + d - 1, d, rounding_mode="floor")  # length of the query's group
    if causal:
        lead = torch.minimum((p // r) * r + (r - 1), m - 1)
        return same_group & (t <= p) & (lead - t < s)
    left = s // 2
    right = s // 2 + (s % 2 - 1)
    lead = torch.minimum((p // r) * r + r // 2, m - 1)
    centre = torch.minimum(torch.clamp(lead, min=left), m - 1 - right)
    return same_group & (centre - left <= t) & (t <= centre + right)


# --------------------------------------------------------------------------- where(...)


_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "//": _floordiv, "%": _mod}
_CMP = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def _min_max(fn: str, a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b) if fn == "min" else max(a, b)
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return torch.minimum(a, b) if fn == "min" else torch.maximum(a, b)


def _safe_divisor(b, care, e: ir.Arith, env: dict):
    """The divisor with zeros replaced by 1, after checking no zero is reached where the value matters."""
    zero = b == 0
    reached = zero & care
    if bool(reached.any()) if isinstance(reached, torch.Tensor) else bool(reached):
        raise PatternValueError(
            f"division by zero: the divisor of '{e.op}' is 0 for some (q, k) at Lq={env['Lq']}, Lk={env['Lk']}",
            e.span,
        )
    if isinstance(b, torch.Tensor):
        return torch.where(zero, torch.ones_like(b), b)
    return 1 if zero else b


def _expr(e: ir.Expr, env: dict):
    """Value of a ``where`` expression: a Python int/bool or an int64/bool tensor."""
    if isinstance(e, ir.Const):
        return e.value
    if isinstance(e, ir.Var):
        return env[e.name]
    if isinstance(e, ir.Coord):
        layout = env["layout"]
        if layout is None or e.axis not in layout.names:
            raise LayoutError(f"{e.side}.{e.axis}: no such grid axis in the pattern's layout", e.span)
        return grid_coords(env[e.side], layout)[layout.names.index(e.axis)]
    if isinstance(e, ir.Arith):
        a, b = _expr(e.left, env), _expr(e.right, env)
        if e.op in ("//", "%"):
            b = _safe_divisor(b, env.get("care", True), e, env)
        return _ARITH[e.op](a, b)
    if isinstance(e, ir.Neg):
        return -_expr(e.operand, env)
    if isinstance(e, ir.Func):
        args = [_expr(a, env) for a in e.args]
        return abs(args[0]) if e.fn == "abs" else _min_max(e.fn, *args)
    if isinstance(e, ir.Cmp):
        return _CMP[e.op](_expr(e.left, env), _expr(e.right, env))
    if isinstance(e, ir.Logic):
        # Short-circuit like Python: a later operand only matters (and may only fail, e.g. on a
        # zero divisor) where the earlier ones have not decided the result yet.
        combine = operator.and_ if e.op == "and" else operator.or_
        care = env.get("care", True)
        value = None
        for item in e.items:
            part = _expr(item, {**env, "care": care})
            value = part if value is None else combine(value, part)
            care = care & (value if e.op == "and" else ~value if isinstance(value, torch.Tensor) else not value)
        return value
    if isinstance(e, ir.LNot):
        v = _expr(e.operand, env)
        return (not v) if isinstance(v, bool) else ~v
    if isinstance(e, ir.InputRef):
        return primitives.inputs.read(e, env, lambda index: _expr(index, env))
    raise TypeError(f"unknown expression node {type(e).__name__}")


# --------------------------------------------------------------------------- route(...)


def route_blocks(prim: ir.Prim, ctx: Context) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """How ``route`` cuts queries into groups and keys into blocks at these sizes.

    Query groups are numbered from the group of the first query: group index
    ``(q // qblock) - ((Lk - Lq) // qblock)``, so that group 0 holds query index 0
    whatever the end alignment. With tuple ``block``/``qblock`` on a grid, groups
    and blocks are the boxes of the grid, numbered row-major over boxes.

    Args:
        prim: a ``route`` primitive.
        ctx: the sizes.

    Returns:
        ``(n_qgroups, n_kblocks, qgroup, kblock)``: the counts, the group of every query
        index (int64 ``[Lq]``) and the block of every key index (int64 ``[Lk]``).
    """
    block = prim.arg("block")
    qblock = prim.arg("qblock")
    qblock = block if qblock is None else qblock
    if isinstance(block, tuple) or isinstance(qblock, tuple):
        layout = _need_layout(ctx, prim)
        rank = len(layout.shape)
        qgroup, n_q = _box_ids(ctx.offset, ctx.q_len, layout, _per_axis(qblock, rank, "route qblock"))
        kblock, n_k = _box_ids(0, ctx.kv_len, layout, _per_axis(block, rank, "route block"))
        return n_q, n_k, qgroup, kblock
    qpos = torch.arange(ctx.q_len, dtype=torch.int64) + ctx.offset
    kpos = torch.arange(ctx.kv_len, dtype=torch.int64)
    first = ctx.offset // qblock
    qgroup = torch.div(qpos, qblock, rounding_mode="floor") - first
    n_q = (ctx.kv_len - 1) // qblock - first + 1
    n_k = -(-ctx.kv_len // block)
    return n_q, n_k, qgroup, torch.div(kpos, block, rounding_mode="floor")


def _box_ids(first: int, count: int, layout: ir.Layout, box: Sequence[int]) -> tuple[torch.Tensor, int]:
    """The box (row-major over boxes) of the positions ``first, ..., first + count - 1`` and the number of boxes."""
    n_boxes = [-(-extent // side) for extent, side in zip(layout.shape, box, strict=True)]
    if count < math.prod(layout.shape):  # fewer positions than the grid: from their coordinates
        ids = torch.zeros(count, dtype=torch.int64)
        coords = grid_coords(torch.arange(count, dtype=torch.int64) + first, layout)
        for coord, side, n in zip(coords, box, n_boxes, strict=True):
            ids = ids * n + torch.div(coord, side, rounding_mode="floor")
        return ids, math.prod(n_boxes)
    # The box of every cell of the grid, row-major (one pass over the grid), looked up at each position:
    # positions wrap around the grid as in grid_coords.
    ids = torch.zeros((), dtype=torch.int64)
    for extent, side, n in zip(layout.shape, box, n_boxes, strict=True):
        ids = ids[..., None] * n + torch.div(torch.arange(extent), side, rounding_mode="floor")
    ids = ids.reshape(-1)
    if first == 0 and count == len(ids):
        return ids, math.prod(n_boxes)
    return ids[torch.remainder(torch.arange(count, dtype=torch.int64) + first, len(ids))], math.prod(n_boxes)


def route_selection(prim: ir.Prim, q: torch.Tensor, k: torch.Tensor, ctx: Context, heads=None) -> torch.Tensor:
    """The reference choice of ``route(...)`` (LANGUAGE.md section 2, dynamic primitives).

    Readable and dense, for small sizes. Scores are those of :func:`route_scores`; the
    candidates of group ``a`` are the key blocks where ``among`` allows some pair (computed
    here from the dense meaning of ``among``); each group gets its ``topk`` best
    candidates, ties towards the lower block index (:func:`route_top`).

    Args:
        prim: the ``route`` primitive.
        q: ``[batch, heads, Lq, head_dim]``.
        k: ``[batch, kv_heads, Lk, head_dim]``; ``kv_heads`` divides ``heads``.
        ctx: the sizes (``Lq``, ``Lk`` must match the tensors).
        heads: the query heads whose pattern contains this primitive (all heads when None);
            only their scores are summed.

    Returns:
        Bool ``[batch, kv_heads, n_qgroups, n_kblocks]`` (groups/blocks as in :func:`route_blocks`).
    """
    n_heads, kv_heads = q.shape[1], k.shape[1]
    heads = range(n_heads) if heads is None else list(heads)
    n_q, n_k, qgroup, kblock = route_blocks(prim, ctx)
    scores = route_scores(prim, q, k, ctx, heads)
    cand = _candidates(prim.arg("among"), qgroup, kblock, n_q, n_k, ctx, heads, n_heads // kv_heads, kv_heads)
    return route_top(scores, cand, prim.arg("topk"))


def route_scores(prim: ir.Prim, q: torch.Tensor, k: torch.Tensor, ctx: Context, heads=None) -> torch.Tensor:
    """Scores of every (query group, key block) pair of ``route(...)``, per batch element and key-value head.

    ``dot(poolq(Q[a]), poolk(K[b]))`` in float32 (float64 when an input is float64),
    summed over the query heads that share a key-value head and whose pattern contains
    this route. Linear in the tensors plus ``n_groups x n_blocks`` per (batch, kv head);
    nothing of size ``Lq x Lk``.

    Args:
        prim, q, k, ctx, heads: as in :func:`route_selection`.

    Returns:
        Float ``[batch, kv_heads, n_qgroups, n_kblocks]``.
    """
    kv_heads = k.shape[1]
    n_q, n_k, qgroup, kblock = route_blocks(prim, ctx)
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    # No gradient through the choice; the tensors may live on any device.
    kf = k.detach().to(dtype)
    kblock = kblock.to(q.device)
    score = prim.arg("score")
    reduce = "amax" if score == "max" else "mean"
    summed = route_query_pool(prim, q, qgroup.to(q.device), n_q, heads, kv_heads, dtype)
    if score == "landmark":
        last = torch.full((n_k,), -1, dtype=torch.int64, device=q.device).scatter_reduce(
            0, kblock, torch.arange(ctx.kv_len, device=q.device), "amax", include_self=True
        )
        pooled_k = kf[:, :, last]
    else:
        pooled_k = _pool(kf, kblock, n_k, reduce)  # [B, Hkv, n_k, D]
    return summed @ pooled_k.transpose(-1, -2)


def route_query_pool(prim: ir.Prim, q: torch.Tensor, qgroup, n_q: int, heads, kv_heads: int, dtype) -> torch.Tensor:
    """``poolq`` of every query group of ``route(...)``, summed over the voting heads of each key-value head.

    Args:
        prim: the ``route`` primitive.
        q: ``[batch, heads, Lq, head_dim]``.
        qgroup: int64 ``[Lq]``, the group of each query index (:func:`route_blocks`).
        n_q: the number of groups.
        heads: the voting query heads (all when None).
        kv_heads: key-value heads.
        dtype: the scores' dtype (float32 at least).

    Returns:
        ``[batch, kv_heads, n_q, head_dim]`` in ``dtype``: its product with the pooled keys is the score.
    """
    batch, n_heads, q_len, dim = q.shape
    share = n_heads // kv_heads
    heads = range(n_heads) if heads is None else list(heads)
    qf = q.detach().to(dtype)
    if len(heads) < n_heads:
        qf = qf[:, list(heads)]
    singletons = n_q == q_len and bool(torch.equal(qgroup, torch.arange(q_len, device=qgroup.device)))
    # qblock = 1 (per token): every group is one query, pooling is the identity.
    pooled_q = qf if singletons else _pool(qf, qgroup, n_q, "amax" if prim.arg("score") == "max" else "mean")
    # sum_h (q_h . k) == (sum_h q_h) . k: the voting heads of a kv head are summed first.
    if share == 1 and len(heads) == n_heads:
        return pooled_q
    owner = torch.tensor([h // share for h in heads], dtype=torch.int64, device=q.device)
    return torch.zeros(batch, kv_heads, n_q, dim, dtype=dtype, device=q.device).index_add_(1, owner, pooled_q)


def route_bounds(node: ir.Node) -> tuple[ir.Node, ir.Node]:
    """Static patterns that bound a dynamic one whatever ``route`` chooses.

    Every ``route`` is replaced by ``empty`` or ``full`` according to its polarity
    (under an odd number of complements the roles swap), so that
    ``lower ⊆ node ⊆ upper`` for every possible choice: a tile where ``upper`` is
    empty is empty, one where ``lower`` is full is full, the rest are decided at run time.

    Args:
        node: a pattern node, possibly containing ``route``.

    Returns:
        ``(lower, upper)``, both free of ``route`` (``among`` is not part of the meaning).
    """
    return ir.route_bound(node, True), ir.route_bound(node, False)


def _pool(x: torch.Tensor, ids: torch.Tensor, count: int, reduce: str) -> torch.Tensor:
    # Pools over the actual members only, so a partial block at the end is not diluted.
    shape = (*x.shape[:2], count, x.shape[3])
    if reduce == "amax":
        index = ids.view(1, 1, -1, 1).expand_as(x)
        init = torch.full(shape, -torch.inf, dtype=x.dtype, device=x.device)
        return init.scatter_reduce(2, index, x, "amax", include_self=True)
    total = torch.zeros(shape, dtype=x.dtype, device=x.device).index_add_(2, ids, x)
    members = torch.bincount(ids, minlength=count).clamp(min=1).to(x.dtype)
    return total / members.view(1, 1, count, 1)


def _candidates(among, qgroup, kblock, n_q, n_k, ctx, heads, share, kv_heads) -> torch.Tensor:
    if ir.is_dynamic(among):
        raise PatternError("route(among = ...) cannot itself contain route(...)", getattr(among, "span", None))
    i = torch.arange(ctx.q_len)[:, None]
    j = torch.arange(ctx.kv_len)[None, :]
    gq = torch.nn.functional.one_hot(qgroup, n_q).to(torch.float64)  # [Lq, n_q]
    gk = torch.nn.functional.one_hot(kblock, n_k).to(torch.float64)  # [Lk, n_k]
    cand = torch.zeros(kv_heads, n_q, n_k, dtype=torch.bool)
    # Under GQA one choice serves every query head of the group: a block is a candidate
    # if among allows some pair for some head of the group that uses this route.
    per_head = ir.uses_head(among)
    reach = None
    for h in heads:
        if reach is None or per_head:
            allowed = evaluate(among, i, j, h, ctx).to(torch.float64)
            reach = (gq.T @ allowed @ gk) > 0
        cand[h // share] |= reach
    return cand


def nan_lowest(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with NaN replaced by ``-inf`` (how :func:`route_top` ranks a NaN score)."""
    return torch.where(torch.isnan(scores), float("-inf"), scores)


def route_top(scores: torch.Tensor, cand: torch.Tensor, topk: int) -> torch.Tensor:
    """Each group's ``topk`` best candidate blocks, ties towards the lower block index.

    Args:
        scores: float ``[..., n_qgroups, n_kblocks]``.
        cand: bool, broadcastable to ``scores``: the candidates.
        topk: how many blocks each group gets (fewer when it has fewer candidates).

    Returns:
        Bool, the shape of ``scores``: the chosen blocks.
    """
    # Order: candidates first, then by score descending, ties by block index ascending.
    # Two stable sorts (the last key sorted last) give exactly that order. A NaN score (a
    # non-finite key in the block) ranks as -inf, below every number: the choice does not
    # prefer a block of garbage, and every path chooses alike whatever the NaN's sign bit.
    scores = nan_lowest(scores)
    n_k = scores.shape[-1]
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    cand_sorted = torch.gather(cand.expand_as(scores), -1, by_score)
    by_cand = torch.sort(cand_sorted.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = torch.gather(by_score, -1, by_cand)
    take = min(topk, n_k)
    chosen = order[..., :take]
    out = torch.zeros_like(scores, dtype=torch.bool)
    out.scatter_(-1, chosen, True)
    return out & cand.expand_as(out)


# --------------------------------------------------------------------------- evaluate


def evaluate(node: ir.Node, i, j, h, ctx: Context, selection: dict | None = None) -> torch.Tensor:
    """Whether query index ``i`` may attend to key index ``j`` under ``node``, elementwise.

    Args:
        node: a pattern node.
        i: int64 tensor of original query indices in ``[0, Lq)``.
        j: int64 tensor of original key indices in ``[0, Lk)``, broadcastable against ``i``.
        h: the head, an int or an int64 tensor broadcastable against ``i`` and ``j``.
        ctx: the sizes and layout.
        selection: for patterns with ``route``: a dict from each ``route`` Prim to its bool
            ``[n_qgroups, n_kblocks]`` choice for one batch element and one head (one slice
            of :func:`route_selection`).

    Returns:
        Bool tensor of the broadcast shape of ``i``, ``j`` (and ``h`` when it is a tensor).
    """
    i = torch.as_tensor(i, dtype=torch.int64)
    j = torch.as_tensor(j, dtype=torch.int64)
    q, k = _positions(i, j, ctx)
    out = _eval(node, q, k, h, ctx, selection).expand(_shape_of(q, k, h))
    # Callers combine results in place; an expanded view (stride 0) would refuse that.
    return out if out.is_contiguous() else out.contiguous()


def evaluate_local(node: ir.Node, q, k, h, length) -> torch.Tensor:
    """``node`` at positions ``q``, ``k`` of a segment with ``Lq = Lk = length`` (``within``'s pattern).

    Args:
        node: a pattern without layout, route or inputs.
        q, k: int64 tensors of positions counted from the segment's start.
        h: the head.
        length: the segment's length, an int or an int64 tensor broadcastable against ``q``.

    Returns:
        Bool tensor, the broadcast shape.
    """
    return _eval(node, q, k, h, Context(length, length, None), None)


def _eval(node: ir.Node, q, k, h, ctx: Context, selection) -> torch.Tensor:
    if isinstance(node, ir.Union):
        out = _eval(node.items[0], q, k, h, ctx, selection)
        for item in node.items[1:]:
            out = out | _eval(item, q, k, h, ctx, selection)
        return out
    if isinstance(node, ir.Inter):
        out = _eval(node.items[0], q, k, h, ctx, selection)
        for item in node.items[1:]:
            out = out & _eval(item, q, k, h, ctx, selection)
        return out
    if isinstance(node, ir.Not):
        return ~_eval(node.item, q, k, h, ctx, selection)
    if not isinstance(node, ir.Prim):
        raise TypeError(f"unknown pattern node {type(node).__name__}")
    if node.name == "within" and ir.contents(node.arg("body")):
        # Labels belong to tokens: segment coordinates do not change them (ir.hoist_contents).
        return _eval(ir.hoist_contents(node), q, k, h, ctx, selection)
    return primitives.lookup(node.name).meaning(node, q, k, h, ctx, selection)


# --------------------------------------------------------------------------- mask


def _route_prims(nodes: Iterable[ir.Node]) -> list[ir.Prim]:
    return list(dict.fromkeys(prim for node in nodes for prim in ir.routes(node)))


def _check_inputs(q, k, heads: int, q_len: int, kv_len: int) -> None:
    from patterndsl import tensors

    sizes = tensors.check(q, k, dtypes=tensors.FLOAT_DTYPES, who="mask()")
    tensors.check_sizes(sizes, heads, q_len, kv_len, "mask()")


def mask(
    pir: ir.PatternIR, q_len: int, kv_len: int | None = None, heads: int = 1, q=None, k=None, inputs=None
) -> torch.Tensor:
    """The dense meaning of a pattern: ``Pattern.mask``.

    Args:
        pir: the bound pattern.
        q_len: ``Lq``.
        kv_len: ``Lk`` (default ``Lq``).
        heads: number of query heads.
        q, k: ``[batch, heads, Lq, head_dim]`` and ``[batch, kv_heads, Lk, head_dim]``; needed
            when the pattern contains ``route`` (the choice is made from them).
        inputs: the run-time inputs (``binding.Inputs``); needed when the pattern declares inputs.

    Returns:
        Bool ``[heads, Lq, Lk]``, or ``[batch, heads, Lq, Lk]`` when ``q`` and ``k`` or inputs are given.

    Raises:
        PatternError: lengths that do not fit the layout, heads not covered, ``route``
            without ``q``/``k``, or input tensors of the wrong shape.
    """
    from patterndsl import check

    kv_len = q_len if kv_len is None else kv_len
    check.check_lengths(pir, q_len, kv_len, heads)
    batch = q.shape[0] if q is not None and hasattr(q, "shape") and len(q.shape) == 4 else 1
    if batch * heads * q_len * kv_len > MASK_LIMIT:
        raise PatternValueError(
            f"mask() would build {batch * heads * q_len * kv_len:.3g} entries (at most 2**28): the dense mask is "
            "for small sizes; use plan() or attention at large ones"
        )
    ctx = Context(q_len, kv_len, pir.layout)
    segments = head_segments(pir, heads)
    prims = _route_prims([node for _, _, node in segments])
    if (q is None) != (k is None):
        raise InputError("pass both q= and k= (or neither)")
    content = list(dict.fromkeys(p for _, _, node in segments for p in ir.contents(node)))
    if (prims or content) and q is None:
        what = ", ".join(dict.fromkeys(f"{p.name}(...)" for p in prims + content))
        raise PatternError(
            f"this pattern uses {what}, which is chosen from the data: pass q= and k= to mask()", pir.span
        )
    if inputs is None and ir.mask_input_names(pir):
        names = ", ".join(f"{d.name}=..." for d in pir.inputs)
        raise InputError(f"pattern '{pir.name}' declares run-time inputs: pass {names} to mask()")
    i = torch.arange(q_len, dtype=torch.int64)[:, None]
    j = torch.arange(kv_len, dtype=torch.int64)[None, :]
    if q is None and inputs is None:
        return _static_mask(segments, heads, i, j, ctx)
    if q is not None:
        _check_inputs(q, k, heads, q_len, kv_len)
    batch = q.shape[0] if q is not None else inputs.batch
    if batch * heads * q_len * kv_len > MASK_LIMIT:
        raise PatternValueError(
            f"mask() would build {batch * heads * q_len * kv_len:.3g} entries (at most 2**28): the dense mask is "
            "for small sizes; use plan() or attention at large ones"
        )
    if not prims and not content and inputs is None:
        return _static_mask(segments, heads, i, j, ctx).unsqueeze(0).expand(batch, -1, -1, -1).clone()
    share = heads // k.shape[1] if k is not None else 1
    voters = {prim: [h for lo, hi, node in segments if prim in ir.walk(node) for h in range(lo, hi)] for prim in prims}
    selections = {prim: route_selection(prim, q, k, ctx, voters[prim]) for prim in prims}
    labels = {prim: primitives.clusters.labels(prim, q, k, inputs) for prim in content}
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        bound = ctx if inputs is None else primitives.inputs.Bound(ctx, inputs.element(b))
        if not prims and not content:
            out[b] = _static_mask(segments, heads, i, j, bound)
            continue
        for lo, hi, node in segments:
            # The heads of one rule that share a key-value head share its choice: one evaluation.
            for kvh in range(lo // share, (hi - 1) // share + 1):
                h0, h1 = max(lo, kvh * share), min(hi, (kvh + 1) * share)
                chosen = {prim: sel[b, kvh] for prim, sel in selections.items()}
                chosen.update({prim: lab.element(b) for prim, lab in labels.items()})
                out[b, h0:h1] = _evaluate_heads(node, h0, h1, i, j, bound, chosen)
    return out


def head_segments(pir: ir.PatternIR, heads: int) -> list[tuple[int, int, ir.Node]]:
    """The heads below ``heads`` as runs ``(lo, hi, node)`` that share one rule, in head order.

    Work follows the ``heads`` lines, never the head count.

    Raises:
        HeadsError: a head no ``heads`` line covers when the pattern has no final expression.
    """
    out, start = [], 0
    for rule in pir.heads:  # sorted by ``lo`` and disjoint
        if start >= heads:
            break
        if rule.lo > start:
            out.append((start, min(rule.lo, heads), pir.default))
        if rule.lo < heads:
            out.append((rule.lo, min(rule.hi, heads), rule.node))
        start = max(start, rule.hi)
    if start < heads:
        out.append((start, heads, pir.default))
    for lo, _, node in out:
        if node is None:
            raise HeadsError(f"head {lo} is not covered by any 'heads' line and the pattern has no default", pir.span)
    return out


#: Heads evaluated at once by one call of :func:`evaluate` times ``Lq x Lk`` (bounds its temporaries).
_HEAD_CHUNK = 1 << 22


def _evaluate_heads(node: ir.Node, lo: int, hi: int, i, j, ctx: Context, selection=None) -> torch.Tensor:
    """Bool ``[hi - lo, Lq, Lk]``: ``node`` for heads ``lo .. hi - 1``; one evaluation when it does not read ``h``."""
    if not ir.uses_head(node):
        return evaluate(node, i, j, lo, ctx, selection).expand(hi - lo, -1, -1)
    out = torch.empty(hi - lo, ctx.q_len, ctx.kv_len, dtype=torch.bool)
    step = max(1, _HEAD_CHUNK // max(ctx.q_len * ctx.kv_len, 1))
    for a in range(lo, hi, step):
        h = torch.arange(a, min(a + step, hi), dtype=torch.int64)[:, None, None]
        out[a - lo : a - lo + len(h)] = evaluate(node, i[None], j[None], h, ctx, selection)
    return out


def _static_mask(segments, heads: int, i, j, ctx: Context) -> torch.Tensor:
    out = torch.empty(heads, ctx.q_len, ctx.kv_len, dtype=torch.bool)
    for lo, hi, node in segments:
        out[lo:hi] = _evaluate_heads(node, lo, hi, i, j, ctx)
    return out


# --------------------------------------------------------------------------- score modifiers


def modified_scores(pir: ir.PatternIR, s: torch.Tensor, heads=None, data=None) -> torch.Tensor:
    """The logits after the pattern's ``score`` statement (contract section 8), for every pair.

    Args:
        pir: the bound pattern.
        s: scaled logits ``[..., H, Lq, Lk]`` (query index ``i``, key index ``j``).
        heads: the head index of each slice of dimension -3 (default ``0..H-1``).
        data: the run-time inputs the score reads, by name (a batched input is indexed by the
            leading dimension of ``s``), or a read hook (:attr:`patterndsl.scores.Env.read`), or None.

    Returns:
        ``s`` itself when the pattern has no score, else the modified logits in ``s``'s dtype
        (differentiable in ``s`` and in the float inputs).
    """
    if pir.score is None:
        return s
    from patterndsl import scores

    if data is None:
        from patterndsl.scores.nodes import Read

        read = list(dict.fromkeys(n.name for n in scores.walk(pir.score.expr) if isinstance(n, Read)))
        if read:
            names = ", ".join(f"{name}=..." for name in read)
            raise InputError(f"pattern '{pir.name}' has a score that reads run-time inputs: pass {names}")
    if isinstance(data, dict):
        batch = torch.arange(s.shape[0]).view(-1, 1, 1, 1) if s.dim() == 4 else None
        data = scores.Tables(pir.inputs, [data[d.name] for d in pir.inputs], batch)
    h_count, q_len, kv_len = s.shape[-3:]
    offset = kv_len - q_len
    head = torch.arange(h_count) if heads is None else torch.as_tensor(heads)
    env = scores.Env(
        s=s,
        q=torch.arange(q_len)[:, None] + offset,
        k=torch.arange(kv_len)[None, :],
        h=head[:, None, None],
        lq=q_len,
        lk=kv_len,
        layout=pir.layout,
        dtype=s.dtype,
        read=data,
    )
    return scores.evaluate(pir.score.expr, env).to(s.dtype).expand(s.shape)


def attention(pir: ir.PatternIR, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None, data=None):
    """The dense float64 meaning of pattern attention, score modifier included.

    Args:
        pir: the bound pattern (static: no ``route``).
        q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``Hkv`` dividing ``H``.
        scale: softmax scale (default ``D ** -0.5``).
        data: the run-time inputs by name (the mask and the score read them), or a read hook for
            the score alone, as in :func:`modified_scores`.

    Returns:
        ``(out, lse)`` in float64: softmax over the modified logits of the allowed keys; rows
        with no allowed key give 0 and ``lse = -inf``. Differentiable.
    """
    _, h, q_len, d = q.shape
    kv_len = k.shape[2]
    bound = None
    if isinstance(data, dict):
        from patterndsl import binding

        bound = binding.bind(pir, data, kv_len, h, d, q.shape[0], who="semantics.attention()")
    allowed = mask(pir, q_len, kv_len, h, inputs=bound)
    group = h // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (d**-0.5 if scale is None else scale)
    s = modified_scores(pir, s, data=data)
    # Select, not add: a modified logit of a blocked pair (even NaN) never reaches the softmax.
    s = torch.where(allowed, s, torch.tensor(float("-inf"), dtype=s.dtype))
    lse = torch.logsumexp(s, -1)
    empty = ~allowed.any(-1)
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])
    return torch.matmul(p, v), lse
