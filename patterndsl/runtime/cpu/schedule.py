"""Runtime stage, CPU executor: scheduling, from tile lists to segments that run as one step each.

Comes in: one head group's CSR tile lists (from the static :class:`BlockPlan`, or chosen at run
time for ``route``), the plan's sizes and a function giving the element mask of partial tiles,
plus the :class:`~patterndsl.runtime.cpu.tuning.CpuOptions` that shape the cut. Goes out: a
tuple of :class:`Segment` (cached per plan and options as a :class:`Schedule`). Query tiles
whose key tiles are one contiguous run of the same width, translated by a constant step from
one query tile to the next (sliding windows, blocks, neighbourhoods), form an *affine segment*
that later runs over strided views of Q/K/V; the other query tiles are *gathered* into buckets
of similar width (narrower rows padded with fully masked tiles). Rows that are loose give up
their long runs of full tiles, or are cut into their contiguous runs, as further affine
segments marked ``merge`` (merged by log-sum-exp). Full tiles get no mask; partial tiles (and
key tails) get the pattern's element mask from :func:`patterndsl.semantics.evaluate`, stored
once for the whole segment when every tile has the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from patterndsl import ir, semantics
from patterndsl.analysis.plan import FULL, PARTIAL, BlockPlan, HeadGroup
from patterndsl.runtime.cpu.tuning import CpuOptions, resolve
from patterndsl.runtime.plans import per_plan


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
    options: CpuOptions | None = None,
) -> tuple[Segment, ...]:
    """Group the non-empty tiles of one head group into segments.

    Args:
        row_ptr, cols, state: CSR tile lists (as in :class:`~patterndsl.analysis.plan.TileList`);
            they may come from the static plan or be chosen at run time.
        plan: the plan (tile sizes and lengths).
        tile_mask: ``f(q_tiles [P], kv_tiles [P]) -> bool [P, BM, BN]``, the allowed pairs of
            tiles that need masking.
        options: the executor options (``min_affine``, ``wide_min``, ``split_runs``); default
            :func:`~patterndsl.runtime.cpu.tuning.current`.

    Returns:
        Segments covering every query tile with at least one key tile, each once.
    """
    counts = (row_ptr[1:] - row_ptr[:-1]).tolist()
    starts = row_ptr[:-1].tolist()
    cols_l, state_l = cols.tolist(), state.tolist()
    rows = {m: cols_l[s : s + c] for m, (c, s) in enumerate(zip(counts, starts, strict=True)) if c}
    opts = resolve(options)
    runs, loose = _affine_runs(rows, opts.min_affine)
    wide: dict[int, list[int]] = {}
    if opts.wide_min:
        # Loose rows with a long run of full tiles: that run goes alone (no mask, no copy) and
        # is merged by log-sum-exp; the rest of the row is scheduled again like any row.
        rest = {}
        for m in sorted(m for group in loose.values() for m in group):
            a, b = _full_run(cols_l, state_l, starts[m], counts[m])
            if b - a >= opts.wide_min:
                wide[m] = cols_l[a:b]
                rows[m] = cols_l[starts[m] : a] + cols_l[b : starts[m] + counts[m]]
            if rows[m]:
                rest[m] = rows[m]
        if wide:
            more, loose = _affine_runs(rest, opts.min_affine)
            runs += more
    segments = [(*_affine_tiles(*run), None, False) for run in runs]
    if opts.split_runs:
        # Loose rows made of a few contiguous runs (box-ordered neighborhoods): run index r of
        # every such row is scheduled as affine segments over strided views (no copy); index 0
        # writes, the others merge by log-sum-exp.
        pieces: dict[int, dict[int, list[int]]] = {}
        keep: dict[int, list[int]] = {}
        for width, group in loose.items():
            for m in group:
                parts = _contiguous_runs(rows[m])
                if len(parts) > 1 and min(len(p) for p in parts) >= opts.split_runs:
                    for r, part in enumerate(parts):
                        pieces.setdefault(r, {})[m] = part
                else:
                    keep.setdefault(width, []).append(m)
        loose = keep
        for r in sorted(pieces):
            split_runs, _ = _affine_runs(pieces[r], 1)
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
    wide_runs, _ = _affine_runs(wide, 1)
    segments += [(*_affine_tiles(*run), None, True) for run in wide_runs]
    # Tile states looked up by (query tile, key tile) through the sorted CSR keys: memory stays
    # O(non-empty tiles), not O(nqb x nkb).
    tile_rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    states = _TileStates(tile_rows * plan.n_kv_tiles + cols, state.to(torch.int8), plan.n_kv_tiles)
    return tuple(
        Segment(qt, kt, aff, _blocked(qt, kt, states, plan, tile_mask, pad), merge)
        for qt, kt, aff, pad, merge in segments
    )


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


def _contiguous_runs(tiles: list[int]) -> list[list[int]]:
    """``tiles`` (sorted) cut into maximal runs of consecutive tiles."""
    out = [[tiles[0]]]
    for t in tiles[1:]:
        if t == out[-1][-1] + 1:
            out[-1].append(t)
        else:
            out.append([t])
    return out


def _affine_runs(rows: dict[int, list[int]], min_tiles: int):
    """Equal-width runs of query tiles with contiguous key tiles translated by a constant step.

    Args:
        rows: query tile -> its sorted key tiles (non-empty), any query tiles.
        min_tiles: runs of fewer query tiles are loose (``CpuOptions.min_affine`` for first runs).

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
    for m0, n, _, _, width in runs:
        if n < min_tiles:
            loose.setdefault(width, []).extend(range(m0, m0 + n))
    return [r for r in runs if r[1] >= min_tiles], loose


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
    ctx = plan.sizes
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


def derived(plan: BlockPlan, what: tuple, build):
    """``build(plan)`` once per (plan, ``what``), kept while the plan lives."""
    return per_plan(plan, ("cpu", *what), lambda: build(plan))


def _build_schedules(plan: BlockPlan, opts: CpuOptions) -> tuple[Schedule, ...]:
    out = []
    for group in plan.groups:
        if ir.is_dynamic(group.node):
            # Decided per call from the data (see units.units).
            out.append(None)
            continue
        tl = group.tiles
        segs = schedule(tl.row_ptr, tl.cols, tl.state, plan, _tile_mask_fn(plan, group), opts)
        out.append(Schedule(tuple(group.heads), segs, idle(segs, plan.n_q_tiles)))
    return tuple(out)


def idle(segments: tuple[Segment, ...], n_q_tiles: int) -> torch.Tensor:
    """Query tiles no writing segment covers (zeroed first; ``merge`` segments add to them)."""
    covered = torch.zeros(n_q_tiles, dtype=torch.bool)
    for seg in segments:
        if not seg.merge:
            covered[seg.q_tiles] = True
    return torch.nonzero(~covered).flatten()


def schedules(plan: BlockPlan, options: CpuOptions | None = None) -> tuple[Schedule | None, ...]:
    """The schedule of every head group of a plan.

    Args:
        plan: the block plan.
        options: executor options (default: the current ones); schedules are built once per plan
            and value of the options they depend on.

    Returns:
        One :class:`Schedule` per head group, None for groups with ``route`` (scheduled per call).
    """
    opts = resolve(options)
    return derived(plan, ("schedules", opts.schedule_key()), lambda p: _build_schedules(p, opts))
