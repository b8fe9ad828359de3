"""Context parallelism, planning at scale: per-rank work and traffic from the plan alone.

Comes in: a pattern, sizes and a layout. Goes out: one :class:`~patterndsl.distributed.traffic.RankCost`
per rank (query x key tiles visited, bytes received in the forward and the backward), with no
tensor of the attention's size: the plan's runs (two levels of tiles for long sequences) and
the layout's chunks are all it reads.
"""

from __future__ import annotations

import torch

from patterndsl.distributed import layout as layouts
from patterndsl.distributed import traffic
from patterndsl.errors import PatternTypeError, PatternValueError


def resolve_layout(layout, seq_len: int, world_size: int, block: int | None):
    """``layout`` checked against the sizes, or the contiguous layout when None."""
    if layout is None:
        return layouts.contiguous(seq_len, world_size, 128 if block is None else block)
    if not isinstance(layout, layouts.Layout):
        raise PatternTypeError(
            f"layout must be a patterndsl.distributed.Layout (from shard()), got {type(layout).__name__}"
        )
    if layout.seq_len != seq_len or layout.world_size != world_size:
        raise PatternValueError(
            f"layout is for seq_len={layout.seq_len} over {layout.world_size} ranks, "
            f"not seq_len={seq_len} over {world_size}"
        )
    if block is not None and layout.block != block:
        raise PatternValueError(f"layout has tiles of {layout.block} tokens, not block={block}")
    return layout


def cost(
    pattern,
    seq_len,
    world_size,
    layout=None,
    batch=1,
    kv_heads=1,
    head_dim=64,
    dtype=torch.bfloat16,
    block=128,
    heads=None,
    **inputs,
) -> list[traffic.RankCost]:
    """Per-rank work and traffic of :func:`patterndsl.distributed.attention`, from the plan alone.

    Args:
        pattern: a :class:`patterndsl.Pattern`.
        seq_len, world_size: the sizes.
        layout: a :class:`Layout` of these sizes (default contiguous in tiles of ``block``).
        batch, kv_heads, head_dim, dtype: what one token's key and value weigh (the value has
            ``head_dim`` too); dK/dV travel in the same dtype.
        block: tile size (must be the layout's).
        heads: query heads the pattern is planned for (default: enough for its ``heads`` lines).
        **inputs: the pattern's run-time inputs, whole.

    Returns:
        One :class:`RankCost` per rank: ``tiles`` (query x key tiles it visits), ``bytes_received``
        (keys and values of the tiles it reads and others own) and ``bytes_received_backward``
        (the dK and dV of its own keys that other ranks computed).
    """
    from patterndsl.api import Pattern, _integer

    if not isinstance(pattern, Pattern):
        raise PatternTypeError(f"cost() needs a patterndsl.Pattern, got {type(pattern).__name__}")
    seq_len = _integer("seq_len", seq_len)
    world_size = _integer("world_size", world_size)
    batch, kv_heads, head_dim = (
        _integer(n, v) for n, v in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim))
    )
    block = _integer("block", block)
    if not isinstance(dtype, torch.dtype):
        raise PatternTypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    heads = layouts.pattern_heads(pattern) if heads is None else _integer("heads", heads)
    layout = resolve_layout(layout, seq_len, world_size, block)
    vis = traffic.plan_visits(pattern, seq_len, heads, block, inputs)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return traffic.rank_costs(vis, layout, 2 * batch * kv_heads * head_dim * itemsize)
