"""Runtime stage, CPU executor: the layouts steps read and write, as views of Q/K/V wherever possible.

Comes in: ``[B, H, L, D]`` tensors in the caller's order and dtype, a :class:`BlockPlan` and
the :class:`~patterndsl.runtime.cpu.schedule.Segment` a step runs. Goes out: the tensors in
plan order padded to whole tiles (:func:`to_tiles`, undone by :func:`from_tiles`), and per
segment ``[B, h, n, rows, D]`` views of its query tiles and key windows: an affine segment's
key windows overlap, so they are ``as_strided`` views with no copy, a gathered one's are
indexed copies. Also the writes back (rows, accumulated key gradients) and the chunking of a
segment under a byte budget, which the caller passes from its options.
"""

from __future__ import annotations

import torch

from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime.cpu.schedule import Segment, derived


def to_tiles(x: torch.Tensor, heads, order: torch.Tensor, identity: bool, length_pad: int, dtype) -> torch.Tensor:
    """``x[:, heads]`` in plan order, padded with zeros to ``length_pad``, contiguous, in ``dtype``.

    A permutation is one ``index_select`` into the result (advanced indexing allocates a second
    buffer and is ~2.5x slower on CPU: reordered plans permute Q/K/V forward and five tensors backward).
    """
    b, _, length, d = x.shape
    if heads is None and identity and length == length_pad and x.dtype == dtype:
        return x.contiguous()
    src = x if heads is None else x[:, heads]
    out = x.new_empty(b, src.shape[1], length_pad, d, dtype=dtype)
    if not identity and length == length_pad and src.dtype == dtype:
        return torch.index_select(src, 2, order, out=out)
    if not identity:
        src = src.index_select(2, order)
    out[:, :, :length] = src
    out[:, :, length:] = 0
    return out


def from_tiles(x: torch.Tensor, length: int, inverse: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`to_tiles` along the sequence dim (drop padding, restore original order)."""
    x = x[:, :, :length]
    return x if inverse is None else x.index_select(2, inverse)


def _build_inverses(plan: BlockPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    qi = None if _is_identity(plan.q_order) else torch.argsort(plan.q_order)
    ki = None if _is_identity(plan.kv_order) else torch.argsort(plan.kv_order)
    return (qi, ki)


def inverses(plan: BlockPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Original index -> plan position for queries and keys (None when identity)."""
    return derived(plan, ("inverses",), _build_inverses)


def _is_identity(order: torch.Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(order.numel(), dtype=order.dtype)))


def chunks(segment: Segment, bytes_per_key_tile: int, budget: int):
    """Consecutive slices of ``segment`` whose per-tile buffers stay under ``budget`` bytes (at least one tile each)."""
    n = max(1, budget // max(bytes_per_key_tile * segment.width, 1))
    for a in range(0, len(segment), n):
        yield segment.slice(a, min(a + n, len(segment)))


def q_view(x: torch.Tensor, seg: Segment, bm: int) -> torch.Tensor:
    """``[B, h, n, BM, D]``: the segment's query tiles (a view when affine)."""
    b, h, _, d = x.shape
    if seg.affine is not None:
        m0 = int(seg.q_tiles[0])
        return x[:, :, m0 * bm : (m0 + len(seg)) * bm].view(b, h, len(seg), bm, d)
    return x.view(b, h, -1, bm, d)[:, :, seg.q_tiles]


def kv_view(x: torch.Tensor, seg: Segment, bn: int) -> torch.Tensor:
    """``[B, h, n, width*BN, D]``: each query tile's keys (a strided view, no copy, when affine)."""
    b, h, _, d = x.shape
    if seg.affine is not None:
        lo0, step = seg.affine
        sb, sh = x.stride(0), x.stride(1)
        size = (b, h, len(seg), seg.width * bn, d)
        return x.as_strided(size, (sb, sh, step * bn * d, d, 1), x.storage_offset() + lo0 * bn * d)
    return x.view(b, h, -1, bn, d)[:, :, seg.kv_tiles].reshape(b, h, len(seg), seg.width * bn, d)


def scores(qc: torch.Tensor, kc: torch.Tensor, seg: Segment, modify=None, cols=None) -> torch.Tensor:
    """``qc @ kc^T``, through the score modifier ``modify(s, seg)`` when given, with blocked pairs at ``-inf``.

    ``cols``: the :func:`partial_columns` of the segment (or of the segment ``seg`` was sliced from):
    only those columns are selected, the full key tiles are left alone. None: every column.
    """
    s = torch.matmul(qc, kc.transpose(-1, -2))
    if modify is not None:
        s = modify(s, seg, own=True)
    if seg.blocked is not None:
        if cols is None:
            s.masked_fill_(seg.blocked, float("-inf"))
        for a, b in cols or ():
            s[..., a:b].masked_fill_(seg.blocked[..., a:b], float("-inf"))
    return s


def partial_columns(seg: Segment, bn: int) -> list[tuple[int, int]]:
    """Column ranges ``[a, b)`` of the segment's key windows covering every key tile with a blocked pair.

    Runs of consecutive partial key tiles (in any of the segment's query tiles) merge into one range;
    the slices of the segment (:meth:`Segment.slice`) have their blocked pairs inside the same ranges.
    A sliding window's affine segment masks 2 of its key tiles, not all of them. Cached on ``seg``.
    """
    key = ("partial_columns", bn)
    if key not in seg._cache:
        runs: list[tuple[int, int]] = []
        if seg.blocked is not None:
            partial = seg.blocked.reshape(-1, seg.width, bn).any(-1).any(0).tolist()
            for t in (t for t, p in enumerate(partial) if p):
                if runs and runs[-1][1] == t * bn:
                    runs[-1] = (runs[-1][0], (t + 1) * bn)
                else:
                    runs.append((t * bn, (t + 1) * bn))
        seg._cache[key] = runs
    return seg._cache[key]


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every value of ``tensors`` is finite, by the finiteness of their sums.

    A sum is one vectorised pass (4-5x faster than ``isfinite(x).all()`` on CPU); it is NaN or
    infinite when any value is, and may overflow for huge finite values: then the caller merely
    takes its exact selecting path.
    """
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def cleaned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` with its non-finite values replaced by 0, and where they were (in ``x``'s dtype, 1/0), or None.

    Masking by select: a product ``P @ X`` over a blocked pair must be 0 even when ``X`` holds NaN or
    Inf there (``0 * NaN`` is NaN), so the matmuls read the cleaned copy and :func:`matmul_seen`
    puts the non-finite values back where an allowed pair reads them.
    """
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return x, None
    return x.masked_fill(bad, 0.0), bad.to(x.dtype)


def matmul_seen(a: torch.Tensor, b: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """``a @ b`` where ``a`` is exactly 0 on blocked pairs and ``b`` was :func:`cleaned`: entries that read
    a non-finite value of the original ``b`` through a non-zero ``a`` are NaN, the others exact."""
    out = torch.matmul(a, b)
    if bad is not None:
        seen = torch.matmul((a != 0).to(a.dtype), bad)
        out.masked_fill_(seen != 0, float("nan"))
    return out


def scores_seen(qc: torch.Tensor, kc: torch.Tensor, k_raw: torch.Tensor, bad_k: torch.Tensor | None) -> torch.Tensor:
    """``qc @ kc^T`` (``qc`` cleaned and scaled, ``kc`` :func:`cleaned` from ``k_raw`` with ``bad_k``), except that a
    score reading a non-finite key value through a non-zero query value is ``qc @ k_raw^T`` as IEEE gives it.

    As the forward's scores: a key whose infinite component gives a ``-inf`` score has ``P = 0`` there, not
    the finite score of its cleaned copy. A zero query row (a padding row) reads nothing, so stays finite.
    """
    s = torch.matmul(qc, kc.transpose(-1, -2))
    if bad_k is None:
        return s
    seen = torch.matmul((qc != 0).to(qc.dtype), bad_k.transpose(-1, -2))
    return torch.where(seen != 0, torch.matmul(qc, k_raw.transpose(-1, -2)), s)


def put_rows(dst: torch.Tensor, seg: Segment, bm: int, value: torch.Tensor) -> None:
    """Write per-tile rows ``value [B, h, n, BM, ...]`` into ``dst [B, h, Lq_pad, ...]``."""
    b, h = dst.shape[:2]
    tiled = dst.view(b, h, -1, bm, *dst.shape[3:])
    if seg.affine is not None:
        m0 = int(seg.q_tiles[0])
        tiled[:, :, m0 : m0 + len(seg)] = value
    else:
        tiled[:, :, seg.q_tiles] = value


def add_keys(dst: torch.Tensor, seg: Segment, bn: int, value: torch.Tensor) -> None:
    """Accumulate per-tile key gradients ``value [B, h, n, width*BN, D]`` into ``dst [B, h, Lk_pad, D]``."""
    b, h, _, d = dst.shape
    n, width = len(seg), seg.width
    value = value.reshape(b, h, n, width, bn, d)
    if seg.affine is not None and seg.affine[1] >= 1:
        # For a fixed offset w the query tiles touch distinct key tiles, so one strided add each.
        lo0, step = seg.affine
        sb, sh = dst.stride(0), dst.stride(1)
        for w in range(width):
            view = dst.as_strided((b, h, n, bn, d), (sb, sh, step * bn * d, d, 1), (lo0 + w) * bn * d)
            view.add_(value[:, :, :, w])
        return
    if seg.affine is not None:
        lo0 = seg.affine[0]
        dst[:, :, lo0 * bn : (lo0 + width) * bn] += value.sum(2).view(b, h, width * bn, d)
        return
    # Gathered: key tiles may repeat across query tiles; one index_add_ over every (tile, offset).
    dst.view(b, h, -1, bn, d).index_add_(2, seg.kv_tiles.reshape(-1), value.reshape(b, h, n * width, bn, d))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat(x: torch.Tensor) -> torch.Tensor:
    # [B, h, n, rows, ...] -> [B*h, n, rows, ...]: the fused kernel's [batch, heads, L, D].
    return x.flatten(0, 1)


def rows_view(x: torch.Tensor, start: int, count: int, rows: int, stride: int) -> torch.Tensor:
    """``[B, h, count, rows, D]`` view of ``x [B, h, L, D]``: item ``i`` is rows ``start + i*stride ..+rows``."""
    b, h, _, d = x.shape
    s = x.stride()
    size, strides = (b, h, count, rows, d), (s[0], s[1], stride * s[2], s[2], s[3])
    return x.as_strided(size, strides, x.storage_offset() + start * s[2])


def window(x: torch.Tensor, tile: int, n: int, step: int, tiles: int, bn: int) -> torch.Tensor:
    """``[n, tiles*BN, D]`` view of ``x [L, D]``: item ``i`` is key tiles ``tile + i*step .. + tiles``."""
    d = x.shape[1]
    return x.as_strided((n, tiles * bn, d), (step * bn * d, d, 1), x.storage_offset() + tile * bn * d)


def put(dst: torch.Tensor, bs: slice, heads: list[int] | None, value: torch.Tensor) -> None:
    """``dst[bs, heads] = value`` (every head when ``heads`` is None), cast to ``dst``'s dtype."""
    if heads is None:
        dst[bs] = value.to(dst.dtype)
    else:
        dst[bs, heads] = value.to(dst.dtype)


def take(src: torch.Tensor, bs: slice, heads: list[int] | None) -> torch.Tensor:
    """``src[bs, heads]`` (every head when ``heads`` is None)."""
    return src[bs] if heads is None else src[bs, heads]
