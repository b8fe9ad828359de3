"""Runtime stage: content-based block selection for ``route(...)``, computed from the data at every call.

Comes in: a bound ``route`` primitive, the query and key tensors
``[batch, heads, seq, head_dim]`` (keys may have fewer heads: grouped-query
attention) and the sequence lengths. Goes out: a :class:`Selection`, for each
batch element, key-value head and query group, the key blocks given to it
(``topk`` at most, best first, ties towards the lower block index), and a
boolean ``[batch, kv_heads, n_groups, n_blocks]`` view of the same choice.

Nothing here is of size ``Lq x Lk``: pooling is linear in the tensors, the
scores are ``n_groups x n_blocks`` per (batch, kv head), and the candidates of
``among`` are computed once per geometry from the block plan of ``among`` and
cached (they do not depend on the data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from patterndsl import ir


@dataclass(frozen=True)
class Geometry:
    """Where positions fall into key blocks and query groups, for one route at one size.

    Attributes:
        q_len, kv_len: sequence lengths.
        block, qblock: the route's ``block``/``qblock`` (an int, or a tuple of box sides on a grid).
        layout: the pattern's layout (needed for tuple blocks).
    """

    q_len: int
    kv_len: int
    block: int | tuple[int, ...]
    qblock: int | tuple[int, ...]
    layout: ir.Layout | None

    @property
    def offset(self) -> int:
        """End alignment: query index ``i`` sits at position ``i + offset``."""
        return self.kv_len - self.q_len

    def key_blocks(self) -> tuple[torch.Tensor, int]:
        """Block id of every key index, and the number of blocks."""
        return _ids(torch.arange(self.kv_len), self.block, self.layout, self.kv_len)

    def query_groups(self) -> tuple[torch.Tensor, int]:
        """Group id (from 0) of every query index, and the number of groups."""
        pos = torch.arange(self.q_len) + self.offset
        if isinstance(self.qblock, tuple):
            return _ids(pos, self.qblock, self.layout, self.kv_len)
        first = (self.offset) // self.qblock
        last = (self.kv_len - 1) // self.qblock
        return torch.div(pos, self.qblock, rounding_mode="floor") - first, max(last - first + 1, 0)


def _ids(pos: torch.Tensor, block, layout: ir.Layout | None, length: int) -> tuple[torch.Tensor, int]:
    if not isinstance(block, tuple):
        return torch.div(pos, block, rounding_mode="floor"), -(-length // block)
    # Boxes of the grid, numbered row-major over boxes.
    shape = layout.shape
    ids = torch.zeros_like(pos)
    n_total = 1
    rest = pos.clone()
    coords = []
    for extent in reversed(shape):
        coords.append(rest % extent)
        rest = torch.div(rest, extent, rounding_mode="floor")
    coords.reverse()
    for coord, extent, side in zip(coords, shape, block, strict=True):
        n_axis = -(-extent // side)
        ids = ids * n_axis + torch.div(coord, side, rounding_mode="floor")
        n_total *= n_axis
    return ids, n_total


@dataclass(frozen=True)
class Selection:
    """The blocks chosen for one route at one call.

    Attributes:
        blocks: int64 ``[batch, kv_heads, n_groups, topk]``, chosen key blocks best first, ``-1`` padding.
        chosen: bool ``[batch, kv_heads, n_groups, n_blocks]``, the same choice as a table.
        group_of_query: int64 ``[Lq]`` group id of each query index.
        block_of_key: int64 ``[Lk]`` block id of each key index.
    """

    blocks: torch.Tensor
    chosen: torch.Tensor
    group_of_query: torch.Tensor
    block_of_key: torch.Tensor

    def allowed(self, i: torch.Tensor, j: torch.Tensor, batch: int, kv_head: int) -> torch.Tensor:
        """Element-level meaning: is key index ``j`` in a block chosen for query index ``i``'s group?"""
        table = self.chosen[batch, kv_head]
        return table[self.group_of_query[i], self.block_of_key[j]]


def _segment_pool(x: torch.Tensor, ids: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """Pool ``x [B, H, L, D]`` over positions with equal ``ids`` into ``[B, H, n, D]``."""
    b, h, _, d = x.shape
    index = ids.view(1, 1, -1, 1).expand(b, h, -1, d)
    if how == "mean":
        total = torch.zeros(b, h, n, d, dtype=x.dtype).index_add_(2, ids, x)
        count = torch.bincount(ids, minlength=n).clamp(min=1).to(x.dtype)
        return total / count.view(1, 1, n, 1)
    if how == "max":
        init = torch.full((b, h, n, d), float("-inf"), dtype=x.dtype)
        return init.scatter_reduce(2, index, x, reduce="amax", include_self=True)
    if how == "last":
        last = torch.full((n,), -1, dtype=torch.int64).scatter_reduce(
            0, ids, torch.arange(ids.numel()), reduce="amax", include_self=True
        )
        return x[:, :, last.clamp(min=0)]
    raise ValueError(how)


def _pool(prim: ir.Prim, q: torch.Tensor, k: torch.Tensor, geom: Geometry):
    score = prim.arg("score")
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    gq, nq = geom.query_groups()
    bk, nk = geom.key_blocks()
    qf, kf = q.to(work), k.to(work)
    poolq = _segment_pool(qf, gq, nq, "max" if score == "max" else "mean")
    poolk = _segment_pool(kf, bk, nk, {"mean": "mean", "max": "max", "landmark": "last"}[score])
    return poolq, poolk, gq, bk


def select(prim: ir.Prim, q: torch.Tensor, k: torch.Tensor, geom: Geometry, candidates: torch.Tensor) -> Selection:
    """Choose key blocks for every query group from the data.

    Args:
        prim: the bound ``route`` primitive.
        q: ``[batch, heads, Lq, head_dim]``.
        k: ``[batch, kv_heads, Lk, head_dim]``; ``kv_heads`` divides ``heads``.
        geom: the :class:`Geometry` of this call.
        candidates: bool ``[n_groups, n_blocks]``, the blocks ``among`` allows for each group.

    Returns:
        A :class:`Selection`. Scores are in float32 at least; the query heads that share a
        key-value head add their scores and share one choice.
    """
    with torch.no_grad():
        poolq, poolk, gq, bk = _pool(prim, q, k, geom)
        batch, heads, ngroups, dim = poolq.shape
        kv_heads = poolk.shape[1]
        # sum_g (q_g . k) == (sum_g q_g) . k, so group heads are summed before the product.
        poolq = poolq.view(batch, kv_heads, heads // kv_heads, ngroups, dim).sum(dim=2)
        scores = poolq @ poolk.transpose(-1, -2)
        scores = scores.masked_fill(~candidates, float("-inf"))
        topk = min(int(prim.arg("topk")), scores.shape[-1])
        # A stable descending sort keeps equal scores in index order: ties go to the lower block.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
        valid = torch.gather(candidates.expand_as(scores), -1, order)
        blocks = torch.where(valid, order, torch.full_like(order, -1))
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(-1, order, valid)
    return Selection(blocks, chosen, gq, bk)


@lru_cache(maxsize=64)
def candidates(among: ir.Node, geom: Geometry) -> torch.Tensor:
    """Blocks that ``among`` allows for each query group: bool ``[n_groups, n_blocks]`` (cached).

    A block is a candidate for a group when ``among`` allows at least one pair
    ``(q, k)`` with ``q`` in the group and ``k`` in the block. Computed one
    query group chunk at a time so memory stays ``O(chunk x Lk)``.
    """
    from patterndsl import semantics
    from patterndsl.errors import PatternValueError

    if ir.uses_head(among):
        raise PatternValueError("route(among = ...) may not depend on the head index h", among.span)
    gq, nq = geom.query_groups()
    bk, nk = geom.key_blocks()
    ctx = semantics.Context(geom.q_len, geom.kv_len, geom.layout)
    out = torch.zeros(nq, nk, dtype=torch.bool)
    j = torch.arange(geom.kv_len)
    chunk = max(1, (1 << 22) // max(geom.kv_len, 1))
    for start in range(0, geom.q_len, chunk):
        i = torch.arange(start, min(start + chunk, geom.q_len))
        allowed = semantics.evaluate(among, i[:, None], j[None, :], 0, ctx)
        rows, cols = torch.nonzero(allowed, as_tuple=True)
        out[gq[i[rows]], bk[cols]] = True
    return out
