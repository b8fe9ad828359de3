"""Runtime stage: the CPU executor, forward and backward, driven by a block plan.

Comes in: ``q``, ``k``, ``v`` (``[batch, heads, seq, head_dim]``, any float
dtype, grouped-query heads allowed) and the :class:`BlockPlan` of the pattern
at these sizes. Goes out: the attention output and its log-sum-exp (and, for
the backward pass, ``dq``, ``dk``, ``dv``) in the original token order.

How it runs. Each head group's tile lists are turned once into a
:class:`Schedule` (cached per plan): query tiles whose key tiles are one
contiguous run of the same width, translated by a constant step from one
query tile to the next (sliding windows, blocks, neighbourhoods), form an
*affine segment* that runs as one step over strided views of Q/K/V
(``as_strided``, no copy); the other query tiles are *gathered* into buckets
of similar width (narrower rows padded with fully masked tiles). Full tiles
get no mask; partial tiles (and key tails) get the pattern's element mask from
:func:`patterndsl.semantics.evaluate` on original indices, computed once per
plan, and stored once for the whole segment when every tile has the same one
(the translation-invariant interior). Other rows give up their long runs of full
tiles, or are cut into their contiguous runs, as further affine segments whose
results merge by log-sum-exp (``Segment.merge``). A step is one call of torch's fused CPU
flash-attention kernel on the segment's ``[batch*heads, tiles, rows, D]``
views (``KERNEL = "fused"``), or batched matmuls with an exact two-pass
softmax in chunks of :data:`CHUNK_BYTES` (``KERNEL = "math"``). The backward
of an affine segment is our own (:func:`_backward_affine`): batched matmuls over
the same strided views that accumulate dK/dV in place, one key-tile offset at a
time; gathered segments use torch's fused backward (or the math one). Memory is
O(Lq * keys visited per query), never L x L. Schedules take tile lists as
input, so lists chosen at run time (``route``) can be scheduled the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patterndsl import ir, semantics
from patterndsl.analysis.plan import FULL, PARTIAL, BlockPlan, HeadGroup
from patterndsl.runtime.plans import per_plan

#: Score-matrix bytes per chunk: large enough for efficient batched matmuls,
#: small enough that the softmax passes stay in cache (measured, see benchmarks/cpu_attention.py).
CHUNK_BYTES = 4 << 20
#: Inner kernel per segment: ``"fused"`` runs torch's CPU flash-attention kernel on the
#: segment's tile views (one call per segment, fp32 accumulation, no score matrix in
#: memory); ``"math"`` runs matmul + two-pass softmax in chunks. Both give the same
#: results; fused is the default because it issues far fewer parallel regions
#: (see benchmarks/cpu_attention.py --kernel).
KERNEL = "fused"
#: Bytes of per-tile dK/dV the fused backward may hold at once, with several threads: every kernel
#: call and add is a parallel region, and on a shared machine each waits for its slowest thread,
#: so few large calls win (16K sliding window, 2 threads: 8 MiB chunks 2-6 s, 32-64 MiB 0.4-2 s).
FUSED_CHUNK_BYTES = 64 << 20
#: The same with one thread, where no region waits: buffers small enough for the allocator to
#: recycle instead of faulting in fresh pages win (1 thread: 8 MiB ~490 ms CPU, 64 MiB ~550-670 ms).
FUSED_CHUNK_BYTES_SERIAL = 8 << 20
#: Affine segments shorter than this are pooled into gathered buckets (fewer, larger steps).
MIN_AFFINE = 4


@dataclass(frozen=True)
class Segment:
    """Query tiles processed together, all visiting ``width`` key tiles.

    Attributes:
        q_tiles: int64 ``[n]`` query tile indices (consecutive when ``affine``).
        kv_tiles: int64 ``[n, width]`` key tile indices of each query tile.
        affine: ``(lo0, step)`` when query tile ``t`` of the segment visits key tiles
            ``lo0 + t*step .. + width`` (and ``q_tiles`` are consecutive), else None.
        blocked: bool ``[1 or n, BM, width*BN]``, True where a pair is *not* allowed; None
            when every tile is full and inside the lengths.
        merge: the rows also have other key tiles, in a segment scheduled earlier: the forward
            merges this segment's output into theirs by log-sum-exp, the backward adds to dQ.
    """

    q_tiles: torch.Tensor
    kv_tiles: torch.Tensor
    affine: tuple[int, int] | None
    blocked: torch.Tensor | None
    merge: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """``blocked`` as an additive mask ``[1, 1 or n, BM, width*BN]`` (0 / -inf) in ``dtype``."""
        if self.blocked is None:
            return None
        if dtype not in self._cache:
            zeros = torch.zeros(self.blocked.shape, dtype=dtype)
            self._cache[dtype] = zeros.masked_fill_(self.blocked, float("-inf")).unsqueeze(0)
        return self._cache[dtype]

    def empty_rows(self) -> torch.Tensor | None:
        """Bool ``[1 or n, BM]``: rows with no allowed key in the segment, or None when there are none."""
        if "empty" not in self._cache:
            rows = None if self.blocked is None else self.blocked.all(-1)
            self._cache["empty"] = rows if rows is not None and bool(rows.any()) else None
        return self._cache["empty"]

    @property
    def width(self) -> int:
        return int(self.kv_tiles.shape[1])

    def __len__(self) -> int:
        return int(self.q_tiles.numel())

    def slice(self, a: int, b: int) -> Segment:
        """Tiles ``a..b`` of this segment, still affine when this one is."""
        affine = None if self.affine is None else (self.affine[0] + a * self.affine[1], self.affine[1])
        blocked = self.blocked
        if blocked is not None and blocked.shape[0] > 1:
            blocked = blocked[a:b]
        part = Segment(self.q_tiles[a:b], self.kv_tiles[a:b], affine, blocked, self.merge)
        for key, bias in self._cache.items():
            # Additive masks built for this segment serve its slices (built once per plan, not per call).
            if isinstance(key, torch.dtype):
                part._cache[key] = bias[:, a:b] if bias.shape[1] > 1 else bias
        return part


@dataclass(frozen=True)
class Schedule:
    """How one head group runs: its heads, its segments, and the query tiles no segment covers."""

    heads: tuple[int, ...]
    segments: tuple[Segment, ...]
    idle_q_tiles: torch.Tensor


def schedule(
    row_ptr: torch.Tensor,
    cols: torch.Tensor,
    state: torch.Tensor,
    plan: BlockPlan,
    tile_mask,
) -> tuple[Segment, ...]:
    """Group the non-empty tiles of one head group into segments.

    Args:
        row_ptr, cols, state: CSR tile lists (as in :class:`~patterndsl.analysis.plan.TileList`);
            they may come from the static plan or be chosen at run time.
        plan: the plan (tile sizes and lengths).
        tile_mask: ``f(q_tiles [P], kv_tiles [P]) -> bool [P, BM, BN]``, the allowed pairs of
            tiles that need masking.

    Returns:
        Segments covering every query tile with at least one key tile, each once.
    """
    counts = (row_ptr[1:] - row_ptr[:-1]).tolist()
    starts = row_ptr[:-1].tolist()
    cols_l, state_l = cols.tolist(), state.tolist()
    rows = {m: cols_l[s : s + c] for m, (c, s) in enumerate(zip(counts, starts, strict=True)) if c}
    runs, loose = _affine_runs(rows)
    wide: dict[int, list[int]] = {}
    if WIDE_MIN:
        # Loose rows with a long run of full tiles: that run goes alone (no mask, no copy) and
        # is merged by log-sum-exp; the rest of the row is scheduled again like any row.
        rest = {}
        for m in sorted(m for group in loose.values() for m in group):
            a, b = _full_run(cols_l, state_l, starts[m], counts[m])
            if b - a >= WIDE_MIN:
                wide[m] = cols_l[a:b]
                rows[m] = cols_l[starts[m] : a] + cols_l[b : starts[m] + counts[m]]
            if rows[m]:
                rest[m] = rows[m]
        if wide:
            more, loose = _affine_runs(rest)
            runs += more
    segments = [(*_affine_tiles(*run), None, False) for run in runs]
    if SPLIT_RUNS:
        # Loose rows made of a few contiguous runs (box-ordered neighborhoods): run index r of
        # every such row is scheduled as affine segments over strided views (no copy); index 0
        # writes, the others merge by log-sum-exp.
        pieces: dict[int, dict[int, list[int]]] = {}
        keep: dict[int, list[int]] = {}
        for width, group in loose.items():
            for m in group:
                parts = _contiguous_runs(rows[m])
                if len(parts) > 1 and min(len(p) for p in parts) >= SPLIT_RUNS:
                    for r, part in enumerate(parts):
                        pieces.setdefault(r, {})[m] = part
                else:
                    keep.setdefault(width, []).append(m)
        loose = keep
        for r in sorted(pieces):
            split_runs, _ = _affine_runs(pieces[r], min_tiles=1)
            segments += [(*_affine_tiles(*run), None, r > 0) for run in split_runs]
    for bucket in _buckets(loose):
        width = max(c for c, _ in bucket)
        ms = sorted(m for c, group in bucket for m in group)
        q_tiles = torch.tensor(ms, dtype=torch.int64)
        # Narrower rows are padded with their last key tile, fully blocked: one bigger step
        # instead of one per width.
        kv_tiles = torch.empty(len(ms), width, dtype=torch.int64)
        pad = torch.zeros(len(ms), width, dtype=torch.bool)
        for t, m in enumerate(ms):
            c = len(rows[m])
            kv_tiles[t, :c] = torch.tensor(rows[m])
            kv_tiles[t, c:] = rows[m][-1]
            pad[t, c:] = True
        segments.append((q_tiles, kv_tiles, None, pad, False))
    # Wide runs last: they merge into rows the segments above wrote (or into idle rows).
    wide_runs, _ = _affine_runs(wide, min_tiles=1)
    segments += [(*_affine_tiles(*run), None, True) for run in wide_runs]
    # Tile states looked up by (query tile, key tile) through the sorted CSR keys: memory stays
    # O(non-empty tiles), not O(nqb x nkb).
    tile_rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    states = _TileStates(tile_rows * plan.n_kv_tiles + cols, state.to(torch.int8), plan.n_kv_tiles)
    return tuple(
        Segment(qt, kt, aff, _blocked(qt, kt, states, plan, tile_mask, pad), merge)
        for qt, kt, aff, pad, merge in segments
    )


#: A loose query tile (in no equal-width affine run) whose key tiles include at least this many
#: consecutive full tiles runs them as a separate segment, unmasked over a strided view, merged
#: by log-sum-exp: causal and global rows run at dense speed instead of as padded, gathered
#: (copied) buckets (causal 8K: 3.0 s and 4.9 GB before). 0 disables.
WIDE_MIN = 8


def _full_run(cols: list[int], state: list[int], start: int, count: int) -> tuple[int, int]:
    """``[a, b)`` positions of the longest run of consecutive full key tiles of one CSR row."""
    best, a = (start, start), None
    for i in range(start, start + count):
        if state[i] != FULL:
            a = None
            continue
        if a is None or cols[i] != cols[i - 1] + 1:
            a = i
        if i + 1 - a > best[1] - best[0]:
            best = (a, i + 1)
    return best


#: Loose rows whose key tiles form several contiguous runs, each at least this long, are split
#: into one affine piece per run (see schedule); 0 disables.
SPLIT_RUNS = 2


def _contiguous_runs(tiles: list[int]) -> list[list[int]]:
    """``tiles`` (sorted) cut into maximal runs of consecutive tiles."""
    out = [[tiles[0]]]
    for t in tiles[1:]:
        if t == out[-1][-1] + 1:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def _affine_runs(rows: dict[int, list[int]], min_tiles: int | None = None):
    """Equal-width runs of query tiles with contiguous key tiles translated by a constant step.

    Args:
        rows: query tile -> its sorted key tiles (non-empty), any query tiles.
        min_tiles: runs of fewer query tiles are loose (default :data:`MIN_AFFINE`).

    Returns:
        ``(runs, loose)``: runs ``[m0, n, lo0, step, width]``; loose maps a width to the query
        tiles in no run (key tiles not contiguous, or a run too short).
    """
    runs: list[list] = []
    loose: dict[int, list[int]] = {}
    for m in sorted(rows):
        tiles = rows[m]
        c, lo, hi = len(tiles), tiles[0], tiles[-1]
        if hi - lo + 1 != c:
            loose.setdefault(c, []).append(m)
            continue
        cur = runs[-1] if runs else None
        if cur and cur[4] == c and cur[0] + cur[1] == m:
            step = lo - (cur[2] + (cur[1] - 1) * cur[3]) if cur[1] > 1 else lo - cur[2]
            if step >= 0 and (cur[1] == 1 or step == cur[3]):
                cur[3] = step
                cur[1] += 1
                continue
        runs.append([m, 1, lo, 0, c])
    keep = MIN_AFFINE if min_tiles is None else min_tiles
    for m0, n, _, _, width in runs:
        if n < keep:
            loose.setdefault(width, []).extend(range(m0, m0 + n))
    return [r for r in runs if r[1] >= keep], loose


def _affine_tiles(m0: int, n: int, lo0: int, step: int, width: int):
    q_tiles = torch.arange(m0, m0 + n)
    kv_tiles = lo0 + step * q_tiles[:, None].sub(m0) + torch.arange(width)
    return q_tiles, kv_tiles, (lo0, step)


class _TileStates:
    """Tile states of the non-empty tiles, keyed by ``row * nkb + col`` (sorted, as CSR lists are)."""

    def __init__(self, keys: torch.Tensor, state: torch.Tensor, nkb: int):
        self.keys, self.state, self.nkb = keys, state, nkb

    def lookup(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """States at ``(rows, cols)`` (broadcast); 0 for tiles not in the lists."""
        want = rows * self.nkb + cols
        if self.keys.numel() == 0:
            return torch.zeros(want.shape, dtype=torch.int8)
        pos = torch.searchsorted(self.keys, want).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[pos] == want, self.state[pos], torch.zeros((), dtype=torch.int8))


def _buckets(loose: dict[int, list[int]]) -> list[list[tuple[int, list[int]]]]:
    """Group gathered query tiles by width, merging widths while padding at most doubles the work."""
    buckets: list[list[tuple[int, list[int]]]] = []
    work = 0
    for width, ms in sorted(loose.items()):
        if buckets and width * (sum(len(g) for _, g in buckets[-1]) + len(ms)) <= 2 * (work + width * len(ms)):
            buckets[-1].append((width, ms))
            work += width * len(ms)
        else:
            buckets.append([(width, ms)])
            work = width * len(ms)
    return buckets


def _blocked(q_tiles, kv_tiles, states: _TileStates, plan: BlockPlan, tile_mask, pad=None) -> torch.Tensor | None:
    """The not-allowed pairs of a segment (``pad``: padding tiles, all blocked), or None when no tile needs a mask."""
    bm, bn = plan.block
    n, width = kv_tiles.shape
    st = states.lookup(q_tiles[:, None], kv_tiles)
    pad = torch.zeros(st.shape, dtype=torch.bool) if pad is None else pad
    need = (st == PARTIAL) & ~pad
    # A full tile holding the key tail allows every key that exists: only the padding past
    # kv_len is blocked (the element mask is not evaluated: for a route's forced choice it
    # would need the choice).
    tail = plan.kv_len % bn != 0
    tail_full = (kv_tiles == plan.n_kv_tiles - 1) & ~need & ~pad if tail else torch.zeros_like(need)
    if not bool(need.any()) and not bool(pad.any()) and not bool(tail_full.any()):
        return None
    blocked = torch.zeros(n, bm, width * bn, dtype=torch.bool)
    view = blocked.view(n, bm, width, bn)
    t_idx, w_idx = torch.nonzero(need, as_tuple=True)
    if t_idx.numel():
        view[t_idx, :, w_idx, :] = ~tile_mask(q_tiles[t_idx], kv_tiles[t_idx, w_idx])
    t_idx, w_idx = torch.nonzero(tail_full, as_tuple=True)
    view[t_idx, :, w_idx, plan.kv_len % bn :] = True
    t_idx, w_idx = torch.nonzero(pad, as_tuple=True)
    view[t_idx, :, w_idx, :] = True
    if n > 1 and torch.equal(blocked, blocked[:1].expand_as(blocked)):
        return blocked[:1].clone()
    return blocked


def _tile_mask_fn(plan: BlockPlan, group: HeadGroup):
    """``f(q_tiles, kv_tiles) -> allowed [P, BM, BN]`` on original indices for one head group."""
    bm, bn = plan.block
    ctx = semantics.Context(plan.q_len, plan.kv_len, getattr(plan.pattern, "layout", None))
    head = group.heads[0]

    def tile_mask(q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
        rows = q_tiles[:, None] * bm + torch.arange(bm)
        cols = kv_tiles[:, None] * bn + torch.arange(bn)
        valid = cols < plan.kv_len
        i = plan.q_order[rows.clamp(max=plan.q_len - 1)]
        j = plan.kv_order[cols.clamp(max=plan.kv_len - 1)]
        allowed = semantics.evaluate(group.node, i[:, :, None], j[:, None, :], head, ctx)
        return allowed & valid[:, None, :]

    return tile_mask


def _derived(plan: BlockPlan, what: str, build):
    return per_plan(plan, ("cpu", what), lambda: build(plan))


def _build_schedules(plan: BlockPlan) -> tuple[Schedule, ...]:
    out = []
    for group in plan.groups:
        if ir.is_dynamic(group.node):
            # Decided per call from the data (see _units).
            out.append(None)
            continue
        tl = group.tiles
        segs = schedule(tl.row_ptr, tl.cols, tl.state, plan, _tile_mask_fn(plan, group))
        out.append(Schedule(tuple(group.heads), segs, _idle(segs, plan.n_q_tiles)))
    return tuple(out)


def _idle(segments: tuple[Segment, ...], n_q_tiles: int) -> torch.Tensor:
    """Query tiles no writing segment covers (zeroed first; ``merge`` segments add to them)."""
    covered = torch.zeros(n_q_tiles, dtype=torch.bool)
    for seg in segments:
        if not seg.merge:
            covered[seg.q_tiles] = True
    return torch.nonzero(~covered).flatten()


def schedules(plan: BlockPlan) -> tuple[Schedule | None, ...]:
    """The schedule of every head group of a plan (built once per plan; None for groups with ``route``)."""
    return _derived(plan, "schedules", _build_schedules)


# --------------------------------------------------------------------------- layout helpers


def _to_tiles(x: torch.Tensor, heads, order: torch.Tensor, identity: bool, length_pad: int, dtype) -> torch.Tensor:
    """``x[:, heads]`` in plan order, padded with zeros to ``length_pad``, contiguous, in ``dtype``."""
    b, _, length, d = x.shape
    if heads is None and identity and length == length_pad and x.dtype == dtype:
        return x.contiguous()
    src = x if heads is None else x[:, heads]
    if not identity:
        src = src[:, :, order]
    out = x.new_empty(b, src.shape[1], length_pad, d, dtype=dtype)
    out[:, :, :length] = src
    out[:, :, length:] = 0
    return out


def _from_tiles(x: torch.Tensor, length: int, inverse: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`_to_tiles` along the sequence dim (drop padding, restore original order)."""
    x = x[:, :, :length]
    return x if inverse is None else x[:, :, inverse]


def _build_inverses(plan: BlockPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    qi = None if _is_identity(plan.q_order) else torch.argsort(plan.q_order)
    ki = None if _is_identity(plan.kv_order) else torch.argsort(plan.kv_order)
    return (qi, ki)


def _inverses(plan: BlockPlan) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Original index -> plan position for queries and keys (None when identity)."""
    return _derived(plan, "inverses", _build_inverses)


def _is_identity(order: torch.Tensor) -> bool:
    return bool(torch.equal(order, torch.arange(order.numel(), dtype=order.dtype)))


def _kv_heads(heads: tuple[int, ...], group_size: int) -> list[int]:
    return [h // group_size for h in heads]


def _chunks(segment: Segment, bytes_per_key_tile: int, budget: int = CHUNK_BYTES):
    """Consecutive slices of ``segment`` whose per-tile buffers stay under ``budget`` bytes."""
    n = max(1, budget // max(bytes_per_key_tile * segment.width, 1))
    for a in range(0, len(segment), n):
        yield segment.slice(a, min(a + n, len(segment)))


def _q_view(x: torch.Tensor, seg: Segment, bm: int) -> torch.Tensor:
    """``[B, h, n, BM, D]``: the segment's query tiles (a view when affine)."""
    b, h, _, d = x.shape
    if seg.affine is not None:
        m0 = int(seg.q_tiles[0])
        return x[:, :, m0 * bm : (m0 + len(seg)) * bm].view(b, h, len(seg), bm, d)
    return x.view(b, h, -1, bm, d)[:, :, seg.q_tiles]


def _kv_view(x: torch.Tensor, seg: Segment, bn: int) -> torch.Tensor:
    """``[B, h, n, width*BN, D]``: each query tile's keys (a strided view, no copy, when affine)."""
    b, h, _, d = x.shape
    if seg.affine is not None:
        lo0, step = seg.affine
        sb, sh = x.stride(0), x.stride(1)
        size = (b, h, len(seg), seg.width * bn, d)
        return x.as_strided(size, (sb, sh, step * bn * d, d, 1), x.storage_offset() + lo0 * bn * d)
    return x.view(b, h, -1, bn, d)[:, :, seg.kv_tiles].reshape(b, h, len(seg), seg.width * bn, d)


def _scores(qc: torch.Tensor, kc: torch.Tensor, seg: Segment) -> torch.Tensor:
    s = torch.matmul(qc, kc.transpose(-1, -2))
    if seg.blocked is not None:
        s.masked_fill_(seg.blocked, float("-inf"))
    return s


def _put_rows(dst: torch.Tensor, seg: Segment, bm: int, value: torch.Tensor) -> None:
    """Write per-tile rows ``value [B, h, n, BM, ...]`` into ``dst [B, h, Lq_pad, ...]``."""
    b, h = dst.shape[:2]
    tiled = dst.view(b, h, -1, bm, *dst.shape[3:])
    if seg.affine is not None:
        m0 = int(seg.q_tiles[0])
        tiled[:, :, m0 : m0 + len(seg)] = value
    else:
        tiled[:, :, seg.q_tiles] = value


def _emit(op: torch.Tensor, lp: torch.Tensor, seg: Segment, bm: int, o: torch.Tensor, lse: torch.Tensor) -> None:
    """Write a segment's output rows ``o [B, h, n, BM, D]`` and ``lse [B, h, n, BM]``, or merge them.

    A ``merge`` segment (affine) combines with what the rows hold by log-sum-exp, in place;
    rows where both sides are empty stay 0 / -inf.
    """
    if not seg.merge:
        _put_rows(op, seg, bm, o)
        _put_rows(lp, seg, bm, lse)
        return
    old_o, old_l = _q_view(op, seg, bm), _q_view(lp[..., None], seg, bm)[..., 0]
    top = torch.maximum(old_l, lse)
    top.masked_fill_(torch.isinf(top), 0.0)
    w_old, w_new = (old_l - top).exp_(), (lse - top).exp_()
    den = w_old + w_new
    old_o.mul_(w_old[..., None]).add_(o * w_new[..., None]).div_(den.clamp(min=1e-30)[..., None])
    old_l.copy_(torch.where(den > 0, top + den.log(), old_l))


def _add_keys(dst: torch.Tensor, seg: Segment, bn: int, value: torch.Tensor) -> None:
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
    tiled = dst.view(b, h, -1, bn, d)
    for w in range(width):
        tiled.index_add_(2, seg.kv_tiles[:, w], value[:, :, :, w])


# --------------------------------------------------------------------------- forward / backward


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(x: torch.Tensor) -> torch.Tensor:
    # [B, h, n, rows, ...] -> [B*h, n, rows, ...]: the fused kernel's [batch, heads, L, D].
    return x.flatten(0, 1)


@dataclass(frozen=True)
class _Split:
    """An affine segment run as ``parts`` times more query tiles of ``BM/parts`` rows each.

    A query tile's rows do not all reach its whole key window (a sliding window's first rows
    stop early, its last rows start late); sub-tile ``i`` (rows ``i*rows ..``) visits only
    keys ``key0 + i*step .. + width``, which is again affine, with one shared mask.
    """

    parts: int
    rows: int
    key0: int
    step: int
    width: int
    blocked: torch.Tensor
    bias: torch.Tensor


#: Forward only: affine segments run as sub-tiles of this many query rows over narrower key
#: windows (0 disables). Measured on the 256-key sliding window at 16K: the forward ~10% faster;
#: the fused backward was slower with 32-row units (and with 128-row ones), so it keeps the tiles.
SPLIT_ROWS = 32


def _rows_view(x: torch.Tensor, start: int, count: int, rows: int, stride: int) -> torch.Tensor:
    """``[B, h, count, rows, D]`` view of ``x [B, h, L, D]``: item ``i`` is rows ``start + i*stride ..+rows``."""
    b, h, _, d = x.shape
    s = x.stride()
    size, strides = (b, h, count, rows, d), (s[0], s[1], stride * s[2], s[2], s[3])
    return x.as_strided(size, strides, x.storage_offset() + start * s[2])


def _split(seg: Segment, block, dtype: torch.dtype) -> _Split | None:
    """The sub-tile form of an affine segment with one shared mask, when it visits fewer keys."""
    key = ("split", dtype)
    if key in seg._cache:
        return seg._cache[key]
    bm, bn = block
    out = None
    shared = seg.blocked is not None and seg.blocked.shape[0] == 1
    split = SPLIT_ROWS and seg.affine is not None and shared and not seg.merge
    if split and bm % SPLIT_ROWS == 0 and bm > SPLIT_ROWS:
        parts, rows = bm // SPLIT_ROWS, SPLIT_ROWS
        step = seg.affine[1] * bn
        allowed = ~seg.blocked[0].view(parts, rows, -1)
        reach = allowed.any(1)  # [parts, width*BN]
        if step % parts == 0 and bool(reach.any(1).all()):
            sub = step // parts
            cols = torch.arange(reach.shape[1])
            lo = min(int(cols[r].min()) - i * sub for i, r in enumerate(reach))
            hi = max(int(cols[r].max()) + 1 - i * sub for i, r in enumerate(reach))
            lo, hi = lo - lo % 8, hi + (-hi) % 8
            width = hi - lo
            fits = lo >= 0 and hi + (parts - 1) * sub <= reach.shape[1] and width <= 0.95 * reach.shape[1]
            if fits:
                masks = [seg.blocked[0, i * rows : (i + 1) * rows, lo + i * sub : hi + i * sub] for i in range(parts)]
                if all(torch.equal(masks[0], m) for m in masks[1:]):
                    bias = torch.zeros(masks[0].shape, dtype=dtype).masked_fill_(masks[0], float("-inf"))
                    out = _Split(parts, rows, seg.affine[0] * bn + lo, sub, width, masks[0], bias[None, None])
    seg._cache[key] = out
    return out


def _forward_fused(qp, kp, vp, op, lp, seg0: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h, _, d = qp.shape
    sp = _split(seg0, block, qp.dtype)
    if sp is not None:
        _forward_fused_split(qp, kp, vp, op, lp, seg0, sp, bm, scale)
        return
    if seg0.affine is not None:
        _forward_fused_step(qp, kp, vp, op, lp, seg0, block, scale)
        return
    # Gathered keys are copies ([n, width*BN, D] for K and V): chunks bound that memory.
    seg0.bias(qp.dtype)
    budget = FUSED_CHUNK_BYTES_SERIAL if torch.get_num_threads() == 1 else FUSED_CHUNK_BYTES
    for seg in _chunks(seg0, 2 * b * h * bn * d * qp.element_size(), budget):
        _forward_fused_step(qp, kp, vp, op, lp, seg, block, scale)


def _forward_fused_step(qp, kp, vp, op, lp, seg: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h = qp.shape[:2]
    qc, kc, vc = _flat(_q_view(qp, seg, bm)), _flat(_kv_view(kp, seg, bn)), _flat(_kv_view(vp, seg, bn))
    o, lse = _FLASH(qc, kc, vc, 0.0, False, attn_mask=seg.bias(qp.dtype), scale=scale)
    lse = lse.unflatten(0, (b, h))
    empty = seg.empty_rows()
    if empty is not None:
        # The kernel reports lse = 0 for rows with no allowed key; the contract says -inf.
        lse = lse.masked_fill(empty, float("-inf"))
    _emit(op, lp, seg, bm, o.unflatten(0, (b, h)), lse)


def _forward_math(qp, kp, vp, op, lp, seg0: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h = qp.shape[:2]
    for seg in _chunks(seg0, b * h * bm * bn * qp.element_size()):
        s = _scores(_q_view(qp, seg, bm) * scale, _kv_view(kp, seg, bn), seg)
        m = s.amax(-1, keepdim=True)
        m.masked_fill_(m == float("-inf"), 0.0)
        s.sub_(m).exp_()
        den = s.sum(-1, keepdim=True)
        # Rows with no allowed key have den = 0 and a zero numerator: clamp makes them 0, not NaN.
        o = torch.matmul(s, _kv_view(vp, seg, bn)).div_(den.clamp(min=1.0))
        _emit(op, lp, seg, bm, o, (m + den.log()).squeeze(-1))


def _forward_fused_split(qp, kp, vp, op, lp, seg: Segment, sp: _Split, bm: int, scale: float) -> None:
    b, h, _, d = qp.shape
    r0, r1 = int(seg.q_tiles[0]) * bm, (int(seg.q_tiles[0]) + len(seg)) * bm
    n = len(seg) * sp.parts
    qc = _flat(qp[:, :, r0:r1].view(b, h, n, sp.rows, d))
    kc, vc = (_flat(_rows_view(x, sp.key0, n, sp.width, sp.step)) for x in (kp, vp))
    o, lse = _FLASH(qc, kc, vc, 0.0, False, attn_mask=sp.bias, scale=scale)
    # The kernel's lse is laid out [batch, rows, heads]: reshape, not view.
    lse = lse.reshape(b, h, n, sp.rows)
    empty = sp.blocked.all(-1)
    if bool(empty.any()):
        lse = lse.masked_fill(empty, float("-inf"))
    op[:, :, r0:r1] = o.reshape(b, h, -1, d)
    lp[:, :, r0:r1] = lse.reshape(b, h, -1)


def _backward_fused(t: dict, seg0: Segment, block, scale: float) -> None:
    bn = block[1]
    b, h, _, d = t["q"].shape
    # The kernel returns dK/dV per query tile ([n, width*BN, D] each); chunks bound that memory.
    budget = FUSED_CHUNK_BYTES_SERIAL if torch.get_num_threads() == 1 else FUSED_CHUNK_BYTES
    for seg in _chunks(seg0, 2 * b * h * bn * d * t["q"].element_size(), budget):
        _backward_fused_chunk(t, seg, block, scale)


def _backward_fused_chunk(t: dict, seg: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h = t["q"].shape[:2]
    qc, doc, oc = (_flat(_q_view(t[name], seg, bm)) for name in ("q", "do", "o"))
    kc, vc = _flat(_kv_view(t["k"], seg, bn)), _flat(_kv_view(t["v"], seg, bn))
    lc = _flat(_q_view(t["lse0"][..., None], seg, bm)).squeeze(-1)
    dq, dk, dv = _FLASH_BWD(doc, qc, kc, vc, oc, lc, 0.0, False, attn_mask=seg.bias(qc.dtype), scale=scale)
    _put_rows(t["dq"], seg, bm, dq.unflatten(0, (b, h)))
    _add_keys(t["dk"], seg, bn, dk.unflatten(0, (b, h)))
    _add_keys(t["dv"], seg, bn, dv.unflatten(0, (b, h)))


#: Query tiles per step of the in-place affine backward (per head): the step's ``[n, BM,
#: width*BN]`` probabilities stay cache-sized (16K sliding window, 2 threads: 32-64 best).
AFFINE_BWD_TILES = 32
#: ... and fewer when one such score buffer would exceed this many bytes (wide key windows).
AFFINE_BWD_BYTES = 4 << 20


def _window(x: torch.Tensor, tile: int, n: int, step: int, tiles: int, bn: int) -> torch.Tensor:
    """``[n, tiles*BN, D]`` view of ``x [L, D]``: item ``i`` is key tiles ``tile + i*step .. + tiles``."""
    d = x.shape[1]
    return x.as_strided((n, tiles * bn, d), (step * bn * d, d, 1), x.storage_offset() + tile * bn * d)


def _column_biases(seg: Segment, bn: int, dtype: torch.dtype) -> list[tuple[int, torch.Tensor]]:
    """``(w, bias [1 or n, BM, BN])`` (0 / -inf) for the key-tile offsets ``w`` of ``seg`` that need a mask.

    Adding a bias is several times faster than ``masked_fill_`` with a broadcast mask on CPU.
    """
    key = ("columns", dtype)
    if key not in seg._cache:
        out = []
        bias = seg.bias(dtype)
        if bias is not None:
            for w in range(seg.width):
                cols = slice(w * bn, (w + 1) * bn)
                if bool(seg.blocked[:, :, cols].any()):
                    out.append((w, bias[0, :, :, cols]))
        seg._cache[key] = out
    return seg._cache[key]


@torch.no_grad()
def _backward_affine(t: dict, seg: Segment, block, scale: float) -> None:
    """Backward of an affine segment, with dK/dV accumulated in place.

    Per head and step of :data:`AFFINE_BWD_TILES` query tiles: ``P`` and ``dS`` over the
    whole key window are one batched matmul each (``[n, BM, width*BN]`` against an
    overlapping strided view of K/V, no copy), and ``dQ`` one more. For a fixed key-tile
    offset ``w`` the query tiles of a segment reach distinct key tiles, so ``dK``/``dV``
    take one ``baddbmm_`` per offset straight into their strided tiles: no per-tile key
    buffers to zero, hold and add back (what torch's fused CPU backward needs). With
    ``step == 0`` every query tile reaches the same key tiles, and their contributions
    are one ``addmm_`` over all rows. ``P`` is computed in base 2 (``exp2`` of scores
    scaled by ``log2 e``): torch's ``exp2`` is about 2.7x faster than its ``exp`` on CPU
    and as exact. The step's two score buffers are allocated once, so no step faults in
    fresh pages. Needs ``t["lse"]`` (+inf on rows with no allowed key) and ``t["delta"]``
    (``rowsum(dO * O) - dlse``); handles any ``dlse``.
    """
    bm, bn = block
    nb, hc, _, d = t["q"].shape
    if len(seg) < nb * hc:
        # Short segments (split rows, edges): fewer steps when the heads are the batch.
        _backward_affine_by_tile(t, seg, block, scale)
        return
    lo0, step = seg.affine
    width, m0 = seg.width, int(seg.q_tiles[0])
    columns = _column_biases(seg, bn, t["q"].dtype)
    per_tile = bm * width * bn * t["q"].element_size()
    chunk = max(1, min(AFFINE_BWD_TILES, len(seg), AFFINE_BWD_BYTES // per_tile))
    p_buf = t["q"].new_empty(chunk, bm, width * bn)
    ds_buf = torch.empty_like(p_buf)
    for b in range(nb):
        for h in range(hc):
            q, do, k, v = (t[name][b, h] for name in ("q", "do", "k", "v"))
            dq, dk, dv = (t[name][b, h] for name in ("dq", "dk", "dv"))
            lse2, delta = t["lse2"][b, h], t["delta"][b, h]
            for a in range(0, len(seg), chunk):
                n = min(chunk, len(seg) - a)
                rows = slice((m0 + a) * bm, (m0 + a + n) * bm)
                qc, doc = q[rows].view(n, bm, d), do[rows].view(n, bm, d)
                tile = lo0 + step * a
                kw, vw = _window(k, tile, n, step, width, bn), _window(v, tile, n, step, width, bn)
                biases = [(w, bias if bias.shape[0] == 1 else bias[a : a + n]) for w, bias in columns]
                p, ds = _probs_and_ds(
                    qc, doc, kw, vw, lse2[rows].view(n, bm, 1), delta[rows].view(n, bm, 1), biases, bn, scale,
                    p_buf[:n], ds_buf[:n],
                )  # fmt: skip
                if seg.merge:
                    dq[rows].view(n, bm, d).baddbmm_(ds, kw, alpha=scale)
                else:
                    torch.bmm(ds, kw, out=dq[rows].view(n, bm, d))
                    dq[rows].mul_(scale)
                if step == 0 or n == 1:
                    span = slice(tile * bn, (tile + width) * bn)
                    dv[span].addmm_(p.view(-1, width * bn).t(), doc.reshape(-1, d))
                    dk[span].addmm_(ds.view(-1, width * bn).t(), qc.reshape(-1, d), alpha=scale)
                    continue
                for w in range(width):
                    cols = slice(w * bn, (w + 1) * bn)
                    _window(dv, tile + w, n, step, 1, bn).baddbmm_(p[:, :, cols].transpose(1, 2), doc)
                    _window(dk, tile + w, n, step, 1, bn).baddbmm_(ds[:, :, cols].transpose(1, 2), qc, alpha=scale)


_LOG2E = 1.4426950408889634


def _probs_and_ds(qc, doc, kw, vw, lse2, delta, biases, bn: int, scale: float, p_out, ds_out):
    """One backward step's ``P`` and ``dS`` (``[batch, rows, width*BN]``), written into ``p_out`` and ``ds_out``.

    ``P = exp2(scale * log2(e) * Q K^T - lse2)`` with the additive ``biases`` ``(w, 0/-inf)`` on
    the key-tile columns ``w`` that need a mask, and ``dS = P * (dO V^T - delta)``.
    """
    p = torch.bmm(qc, kw.transpose(1, 2), out=p_out).mul_(scale * _LOG2E)
    p.sub_(lse2)
    for w, bias in biases:
        p[:, :, w * bn : (w + 1) * bn].add_(bias)
    p.exp2_()
    ds = torch.bmm(doc, vw.transpose(1, 2), out=ds_out)
    ds.sub_(delta).mul_(p)
    return p, ds


def _backward_affine_by_tile(t: dict, seg: Segment, block, scale: float) -> None:
    """:func:`_backward_affine` with the (batch, head) pairs as the matmul batch, one query tile per step.

    ``x[:, :, rows]`` of a ``[B, h, L, D]`` buffer is a ``[B*h, rows, D]`` view, so every step is
    the same handful of batched matmuls whatever the number of heads.
    """
    bm, bn = block
    nb, hc, _, d = t["q"].shape
    bh = nb * hc
    lo0, step = seg.affine
    width, m0 = seg.width, int(seg.q_tiles[0])
    columns = _column_biases(seg, bn, t["q"].dtype)
    q, do, k, v, dq, dk, dv = (t[name] for name in ("q", "do", "k", "v", "dq", "dk", "dv"))
    p_buf = q.new_empty(bh, bm, width * bn)
    ds_buf = torch.empty_like(p_buf)
    for i in range(len(seg)):
        rows = slice((m0 + i) * bm, (m0 + i + 1) * bm)
        keys = slice((lo0 + step * i) * bn, (lo0 + step * i + width) * bn)
        qc, doc = q[:, :, rows].view(bh, bm, d), do[:, :, rows].view(bh, bm, d)
        kw, vw = k[:, :, keys].view(bh, width * bn, d), v[:, :, keys].view(bh, width * bn, d)
        biases = [(w, bias[0] if bias.shape[0] == 1 else bias[i]) for w, bias in columns]
        lse2, delta = t["lse2"][:, :, rows].reshape(bh, bm, 1), t["delta"][:, :, rows].reshape(bh, bm, 1)
        p, ds = _probs_and_ds(qc, doc, kw, vw, lse2, delta, biases, bn, scale, p_buf, ds_buf)
        # beta = 0 ignores what the rows held (they are not initialised for writing segments).
        dq[:, :, rows].view(bh, bm, d).baddbmm_(ds, kw, beta=1 if seg.merge else 0, alpha=scale)
        dv[:, :, keys].view(bh, width * bn, d).baddbmm_(p.transpose(1, 2), doc)
        dk[:, :, keys].view(bh, width * bn, d).baddbmm_(ds.transpose(1, 2), qc, alpha=scale)


def _backward_math(t: dict, seg0: Segment, block, scale: float) -> None:
    bm, bn = block
    b, h = t["q"].shape[:2]
    for seg in _chunks(seg0, b * h * bm * bn * t["q"].element_size()):
        qc = _q_view(t["q"], seg, bm) * scale
        kc, vc = _kv_view(t["k"], seg, bn), _kv_view(t["v"], seg, bn)
        doc = _q_view(t["do"], seg, bm)
        p = _scores(qc, kc, seg)
        p.sub_(_q_view(t["lse"][..., None], seg, bm)).exp_()
        _add_keys(t["dv"], seg, bn, torch.matmul(p.transpose(-1, -2), doc))
        ds = torch.matmul(doc, vc.transpose(-1, -2))
        ds.sub_(_q_view(t["delta"][..., None], seg, bm)).mul_(p)
        _put_rows(t["dq"], seg, bm, torch.matmul(ds, kc).mul_(scale))
        # qc carries the scale, so this is scale * dS^T Q.
        _add_keys(t["dk"], seg, bn, torch.matmul(ds.transpose(-1, -2), qc))


# torch's fused CPU flash-attention kernels (internal aten ops); without them the math path runs.
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_fused() -> bool:
    return KERNEL == "fused" and _FLASH is not None and _FLASH_BWD is not None


@dataclass(frozen=True)
class _Heads:
    """One head group's query heads and the key/value head each reads (None = all, unchanged)."""

    q: list[int] | None
    kv: list[int] | None
    count: int

    @staticmethod
    def of(sched: Schedule, heads: int, group_size: int) -> _Heads:
        hs = sched.heads
        if hs == tuple(range(heads)):
            return _Heads(None, None if group_size == 1 else _kv_heads(hs, group_size), len(hs))
        return _Heads(list(hs), _kv_heads(hs, group_size), len(hs))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan, scale: float):
    """Attention restricted to ``plan``, on CPU.

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, Hkv, Lk, D]`` with ``Hkv`` dividing ``H``.
        plan: the pattern's block plan at ``(Lq, Lk, H)``; tiles marked 3 (``route``) are
            decided from ``q`` and ``k`` at this call.
        scale: softmax scale.

    Returns:
        ``(out, lse)``: ``out`` ``[B, H, Lq, D]`` in ``q``'s dtype, ``lse`` ``[B, H, Lq]`` float32
        (``-inf`` and a zero output for rows with no allowed key).
    """
    b, h, lq, d = q.shape
    dt = _compute_dtype(q.dtype)
    units, work = _units(plan, q, k)
    # One unit over every head and batch element hands its buffers out directly, without a final copy.
    single = len(units) == 1 and units[0][0] == slice(None) and work is None
    # Gathered route work merges into the outputs afterwards: keep them in the compute dtype until then.
    out = None if single else torch.zeros(b, h, lq, d, dtype=q.dtype if work is None else dt)
    lse = None if single else torch.full((b, h, lq), float("-inf"), dtype=torch.float32 if work is None else dt)
    bm, bn = plan.block
    q_inv, k_inv = _inverses(plan)
    lq_pad, lk_pad = plan.n_q_tiles * bm, plan.n_kv_tiles * bn
    run = _forward_fused if _use_fused() else _forward_math
    for bs, sched, merge in units:
        hd = _Heads.of(sched, h, h // k.shape[1])
        qb, kb, vb = q[bs], k[bs], v[bs]
        nb = qb.shape[0]
        qp = _to_tiles(qb, hd.q, plan.q_order, q_inv is None, lq_pad, dt)
        kp = _to_tiles(kb, hd.kv, plan.kv_order, k_inv is None, lk_pad, dt)
        vp = _to_tiles(vb, hd.kv, plan.kv_order, k_inv is None, lk_pad, dt)
        # Every covered query tile is written by exactly one segment; only the others need clearing.
        op = torch.empty(nb, hd.count, lq_pad, d, dtype=dt)
        lp = torch.empty(nb, hd.count, lq_pad, dtype=dt)
        idle = sched.idle_q_tiles
        if idle.numel():
            op.view(nb, hd.count, -1, bm, d)[:, :, idle] = 0
            lp.view(nb, hd.count, -1, bm)[:, :, idle] = float("-inf")
        for seg in sched.segments:
            run(qp, kp, vp, op, lp, seg, plan.block, scale)
        if single:
            out = _from_tiles(op, lq, q_inv).to(q.dtype).contiguous()
            lse = _from_tiles(lp, lq, q_inv).to(torch.float32).contiguous()
        elif merge:
            from patterndsl.runtime import cpu_gather

            rows = torch.arange(lq)
            cpu_gather.merge_rows(out, lse, bs, hd.q, rows, _from_tiles(op, lq, q_inv), _from_tiles(lp, lq, q_inv))
        else:
            _put(out, bs, hd.q, _from_tiles(op, lq, q_inv))
            _put(lse, bs, hd.q, _from_tiles(lp, lq, q_inv))
    if work is not None:
        from patterndsl.runtime import cpu_gather

        cpu_gather.forward(q, k, v, out, lse, work, scale)
        out, lse = out.to(q.dtype), lse.to(torch.float32)
    return out, lse


def _put(dst: torch.Tensor, bs: slice, heads: list[int] | None, value: torch.Tensor) -> None:
    """``dst[bs, heads] = value`` (every head when ``heads`` is None), cast to ``dst``'s dtype."""
    if heads is None:
        dst[bs] = value.to(dst.dtype)
    else:
        dst[bs, heads] = value.to(dst.dtype)


def _route_static_schedules(plan: BlockPlan) -> tuple[Schedule, ...]:
    """Schedules of what never depends on the data: static groups, and the static tiles of dynamic groups."""

    def build(plan: BlockPlan) -> tuple[Schedule, ...]:
        from patterndsl.runtime import dynamic

        dp = dynamic.dynamic_plan(plan)
        out = []
        for sched, dg in zip(schedules(plan), dp.groups, strict=True):
            if dg is not None:
                row_ptr, cols, state = dynamic.static_lists(dg, plan)
                segs = schedule(row_ptr, cols, state, plan, dynamic.static_mask_fn(dg, plan))
                sched = Schedule(tuple(dg.group.heads), segs, _idle(segs, plan.n_q_tiles))
            out.append(sched)
        return tuple(out)

    return _derived(plan, "route_static", build)


def _take(src: torch.Tensor, bs: slice, heads: list[int] | None) -> torch.Tensor:
    """``src[bs, heads]`` (every head when ``heads`` is None)."""
    return src[bs] if heads is None else src[bs, heads]


def _units(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor):
    """What runs: ``(batch slice, schedule)`` pairs covering every (batch element, head) once, and gathered work.

    A static plan runs each head group over the whole batch. With ``route``, the choice is
    made from ``q`` and ``k`` here and merged with the static tiles
    (:mod:`patterndsl.runtime.dynamic`): each (batch element, key-value head) of a dynamic
    head group gets its own schedule, plus the blocks that run gathered
    (:mod:`patterndsl.runtime.cpu_gather`); static head groups still run over the whole batch.

    Returns:
        ``(units, work)``: units are ``(batch slice, schedule, merge)``, where ``merge`` units add
        to rows earlier units wrote (log-sum-exp merge forward, sums backward); ``work`` is None
        for static plans, else the gathered work items.
    """
    if not any(ir.is_dynamic(g.node) for g in plan.groups):
        return [(slice(None), sched, False) for sched in schedules(plan)], None
    from patterndsl.runtime import cpu_gather, dynamic

    dp = dynamic.dynamic_plan(plan)
    selections = dynamic.select_all(dp, q, k)
    # Static head groups and the static tiles of dynamic groups first (they write every row),
    # then the run-time tiles of each (batch element, kv head), merged by log-sum-exp.
    units = [(slice(None), sched, False) for sched in _route_static_schedules(plan)]
    lists = dynamic.tile_lists(dp, selections, q.shape[1] // k.shape[1])
    for item in lists:
        if not item.cols.numel():
            continue
        mask_fn = dynamic.tile_mask_fn(dp, item, selections)
        segs = schedule(item.row_ptr, item.cols, item.state, plan, mask_fn)
        sched = Schedule(item.heads, segs, _idle(segs, plan.n_q_tiles))
        units.append((slice(item.batch, item.batch + 1), sched, True))
    return units, cpu_gather.plan_work(lists, selections, plan.q_len, plan.block_m)


def backward(q, k, v, out, lse, dout, plan: BlockPlan, scale: float, dlse=None):
    """Gradients of :func:`forward` through the same plan.

    Args:
        q, k, v, out, lse: the forward's inputs and outputs.
        dout: gradient of ``out``.
        plan: the forward's plan.
        scale: the forward's scale.
        dlse: gradient of ``lse`` (``[B, H, Lq]``) or None.

    Returns:
        ``(dq, dk, dv)`` in the dtypes and shapes of ``q``, ``k``, ``v`` (``dk``/``dv`` summed
        over the query heads that share a key/value head).
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dt = _compute_dtype(q.dtype)
    bm, bn = plan.block
    q_inv, k_inv = _inverses(plan)
    # One head group without grouped-query sharing hands its buffers out directly.
    direct = len(plan.groups) == 1 and h == hkv and not ir.is_dynamic(plan.groups[0].node)
    if not direct:
        dq = torch.zeros_like(q)
        dk_acc = torch.zeros(b, hkv, lk, d, dtype=dt)
        dv_acc = torch.zeros(b, hkv, lk, d, dtype=dt)
    q_id, k_id = q_inv is None, k_inv is None
    lq_pad, lk_pad = plan.n_q_tiles * bm, plan.n_kv_tiles * bn
    empty = lse == float("-inf")
    # Affine segments (and the math kernel) need delta = rowsum(dO * O) and lse with +inf on
    # rows with no allowed key (P is then exactly 0, never NaN).
    # Row dot products as one batched matmul: no [B, H, Lq, D] temporary (4x faster than mul + sum).
    delta = torch.bmm(dout.to(dt).reshape(-1, 1, d), out.to(dt).reshape(-1, d, 1)).view(b, h, lq)
    if dlse is not None:
        # d lse / d s = P, so a gradient on lse shifts delta: dS = P * (dP - (delta - dlse)).
        delta = delta - dlse.to(dt)
    lse_inf = lse.to(dt).masked_fill(empty, float("inf"))
    extra = {"delta": delta, "lse": lse_inf, "lse2": lse_inf * _LOG2E}
    # Gathered segments run torch's fused kernel, which computes delta itself and cannot take a
    # gradient on lse; any finite lse gives it P = 0 on rows whose scores are all -inf.
    fused = _use_fused() and (dlse is None or not bool(dlse.any()))
    if fused:
        extra["lse0"] = lse.to(dt).masked_fill(empty, 0.0)
    units, work = _units(plan, q, k)
    if work is not None:
        direct = False
        dq = torch.zeros(q.shape, dtype=dt)
    for bs, sched, merge in units:
        hd = _Heads.of(sched, h, h // hkv)
        nb = q[bs].shape[0]
        t = {
            "q": _to_tiles(q[bs], hd.q, plan.q_order, q_id, lq_pad, dt),
            "do": _to_tiles(dout[bs], hd.q, plan.q_order, q_id, lq_pad, dt),
            "k": _to_tiles(k[bs], hd.kv, plan.kv_order, k_id, lk_pad, dt),
            "v": _to_tiles(v[bs], hd.kv, plan.kv_order, k_id, lk_pad, dt),
        }
        gathered = any(seg.affine is None for seg in sched.segments)
        if fused and gathered:
            t["o"] = _to_tiles(out[bs], hd.q, plan.q_order, q_id, lq_pad, dt)
        for name, value in extra.items():
            t[name] = _to_tiles(value[bs][..., None], hd.q, plan.q_order, q_id, lq_pad, dt)[..., 0]
        # dK/dV accumulate over query tiles; dQ rows are written once per covered tile.
        t["dk"], t["dv"] = torch.zeros(t["k"].shape, dtype=dt), torch.zeros(t["v"].shape, dtype=dt)
        t["dq"] = torch.empty(t["q"].shape, dtype=dt)
        if sched.idle_q_tiles.numel():
            t["dq"].view(nb, hd.count, -1, bm, d)[:, :, sched.idle_q_tiles] = 0
        for seg in sched.segments:
            if seg.affine is not None:
                _backward_affine(t, seg, plan.block, scale)
            else:
                (_backward_fused if fused else _backward_math)(t, seg, plan.block, scale)
        dq_g = _from_tiles(t["dq"], lq, q_inv)
        dk_g, dv_g = _from_tiles(t["dk"], lk, k_inv), _from_tiles(t["dv"], lk, k_inv)
        if direct:
            return tuple(g.to(x.dtype).contiguous() for g, x in ((dq_g, q), (dk_g, k), (dv_g, v)))
        if merge:
            _put(dq, bs, hd.q, _take(dq, bs, hd.q) + dq_g)
        else:
            _put(dq, bs, hd.q, dq_g)
        # Query heads sharing a key/value head add their contributions.
        if hd.kv is None:
            dk_acc[bs] += dk_g
            dv_acc[bs] += dv_g
            continue
        idx = torch.tensor(hd.kv, dtype=torch.int64)
        dk_acc[bs].index_add_(1, idx, dk_g)
        dv_acc[bs].index_add_(1, idx, dv_g)
    if work is not None:
        from patterndsl.runtime import cpu_gather

        grads = {"dq": dq, "dk": dk_acc, "dv": dv_acc}
        cpu_gather.backward(q, k, v, out, lse, dout, dlse, grads, work, scale)
    return dq.to(q.dtype), dk_acc.to(k.dtype), dv_acc.to(v.dtype)
