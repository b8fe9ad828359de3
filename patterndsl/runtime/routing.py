"""Runtime stage: content-based block selection for ``route(...)``, computed from the data at every call.

Comes in: a bound pattern's ``route`` primitives, the query and key tensors
``[batch, heads, seq, head_dim]`` (keys may have fewer heads: grouped-query
attention) and the sequence lengths. Goes out: a :class:`Selection` per
``route``: for each batch element, key-value head and query group, which key
blocks were given to it, as a bool ``[batch, kv_heads, n_groups, n_blocks]``
table, plus the group of every query index and the block of every key index.

The rule is the one of LANGUAGE.md section 2 and is shared with the dense
reference: scores come from :func:`patterndsl.semantics.route_scores` and the
top-k rule from :func:`patterndsl.semantics.route_top`. What differs from the
reference is the candidates of ``among``: here they come from the block plan
of ``among`` on a coarse tiling whose tiles are the query groups and key blocks
(:meth:`patterndsl.analysis.engine.Engine.route_candidates`), cached per size,
so nothing here is of size ``Lq x Lk``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch

from patterndsl import ir, semantics
from patterndsl.analysis import engine as eng


@dataclass(frozen=True)
class Selection:
    """The blocks chosen for one route at one call.

    Attributes:
        chosen: bool ``[batch, kv_heads, n_groups, n_blocks]``: block ``b`` was given to group ``a``.
        qgroup: int64 ``[Lq]`` group of each query index.
        kblock: int64 ``[Lk]`` block of each key index.
    """

    chosen: torch.Tensor
    qgroup: torch.Tensor
    kblock: torch.Tensor

    @property
    def n_groups(self) -> int:
        return int(self.chosen.shape[-2])

    @property
    def n_blocks(self) -> int:
        return int(self.chosen.shape[-1])

    def blocks(self, topk: int) -> torch.Tensor:
        """int64 ``[batch, kv_heads, n_groups, topk]``: the chosen blocks in ascending order, ``-1`` padding."""
        n = self.n_blocks
        index = torch.arange(n, device=self.chosen.device)
        # Chosen blocks sort first (keyed by their index), the rest after them.
        keyed = torch.where(self.chosen, index, index + n)
        order = torch.sort(keyed, dim=-1).values[..., : min(topk, n)]
        return torch.where(order < n, order, torch.full_like(order, -1))

    def allowed(self, i: torch.Tensor, j: torch.Tensor, batch: int, kv_head: int) -> torch.Tensor:
        """Element-level meaning: is key index ``j`` in a block chosen for query index ``i``'s group?"""
        return self.chosen[batch, kv_head][self.qgroup[i], self.kblock[j]]


def voters(pattern: ir.PatternIR, heads: int) -> dict[ir.Prim, tuple[int, ...]]:
    """Every ``route`` of the pattern with the query heads whose pattern contains it.

    Under grouped-query attention those heads add their scores (per key-value head);
    heads under another ``heads`` line do not vote.

    Args:
        pattern: the bound pattern.
        heads: number of query heads.

    Returns:
        ``{route primitive: ascending head indices}``, in order of first appearance.
    """
    out: dict[ir.Prim, list[int]] = {}
    for h in range(heads):
        node = pattern.node_for_head(h)
        for prim in ir.routes(node) if node is not None else ():
            out.setdefault(prim, []).append(h)
    return {prim: tuple(hs) for prim, hs in out.items()}


def select(
    prim: ir.Prim,
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: semantics.Context,
    heads: tuple[int, ...] | None = None,
) -> Selection:
    """Choose key blocks for every query group from the data.

    Args:
        prim: the bound ``route`` primitive.
        q: ``[batch, heads, Lq, head_dim]``.
        k: ``[batch, kv_heads, Lk, head_dim]``; ``kv_heads`` divides ``heads``.
        ctx: the sizes and layout of this call.
        heads: the query heads that vote (see :func:`voters`); all heads when None.

    Returns:
        A :class:`Selection` equal to :func:`patterndsl.semantics.route_selection`. Scores
        are in float32 at least, and no gradient flows through the choice.
    """
    n_heads, kv_heads = q.shape[1], k.shape[1]
    heads = tuple(range(n_heads)) if heads is None else tuple(heads)
    with torch.no_grad():
        scores = semantics.route_scores(prim, q, k, ctx, heads)
        cand = candidates(prim, ctx, heads, n_heads // kv_heads, kv_heads).to(scores.device)
        chosen = top(scores, cand, prim.arg("topk"))
    qgroup, kblock = _ids(prim, ctx)
    return Selection(chosen, qgroup.to(q.device), kblock.to(q.device))


def top(scores: torch.Tensor, cand: torch.Tensor, topk: int) -> torch.Tensor:
    """:func:`patterndsl.semantics.route_top` with one ``topk`` over exact integer keys instead of two sorts.

    For float32 scores each pair gets a distinct int64 key: candidates above every
    non-candidate, then the score's order-preserving integer image, then the lower
    block first, so equal scores resolve exactly as the reference does. Float64 scores
    (float64 inputs, for tests) go to the reference itself.

    Args:
        scores: float ``[..., n_groups, n_blocks]``.
        cand: bool, broadcastable to ``scores``.
        topk: blocks per group.

    Returns:
        Bool, the shape of ``scores``.
    """
    n = scores.shape[-1]
    if scores.dtype != torch.float32 or n >= 1 << 31:
        return semantics.route_top(scores, cand, topk)
    scores = semantics.nan_lowest(scores)
    # + 0.0 turns -0.0 into +0.0 (they tie in the reference); flipping negative floats' bits
    # makes integer order float order.
    bits = (scores + 0.0).view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    key += (1 << 31) + 1  # [1, 2^32]: above the level 0 of non-candidates
    key.masked_fill_(~cand, 0)
    key <<= 31
    key += (1 << 31) - 1 - torch.arange(n, device=scores.device)
    best = torch.topk(key, min(topk, n), dim=-1, sorted=False).indices
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    chosen.scatter_(-1, best, True)
    return chosen & cand


@lru_cache(maxsize=64)
def _ids(prim: ir.Prim, ctx: semantics.Context) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, qgroup, kblock = semantics.route_blocks(prim, ctx)
    return qgroup, kblock


#: Tile size of the fine sides the coarse candidate plan is derived from (any size works).
_SIDE_BLOCK = 64


@lru_cache(maxsize=64)
def candidates(prim: ir.Prim, ctx: semantics.Context, heads: tuple[int, ...], share: int, kv_heads: int):
    """Blocks that ``among`` allows for each query group, from the plan of ``among`` (cached per size).

    A block is a candidate for a group when ``among`` allows at least one pair ``(q, k)``
    with ``q`` in the group and ``k`` in the block; under grouped-query attention, for some
    voting head of the key-value head.

    Args:
        prim: the ``route`` primitive.
        ctx: sizes and layout.
        heads: the voting query heads.
        share: query heads per key-value head.
        kv_heads: number of key-value heads.

    Returns:
        Bool ``[1 or kv_heads, n_groups, n_blocks]`` (one row shared by every key-value head
        when ``among`` does not read ``h``).
    """
    among = prim.arg("among")
    per_head = ir.uses_head(among)
    out = None
    for h in heads if per_head else heads[:1]:
        # heads=0: head h's own candidates, not the union over the pattern's heads
        engine = eng.identity_engine(dataclasses.replace(ctx, heads=0), h, _SIDE_BLOCK)
        keys, n_q, n_k, _, _ = engine.route_candidates(prim)
        if out is None:
            out = torch.zeros(kv_heads if per_head else 1, n_q, n_k, dtype=torch.bool)
        flat = out[h // share if per_head else 0].view(-1)
        flat[torch.from_numpy(keys)] = True
    return out
