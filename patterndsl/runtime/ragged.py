"""Runtime stage: ragged batches and paged key/value caches (LANGUAGE.md section 9), CPU executor.

Comes in: ``q`` ``[B, H, Lq, D]``; ``k``, ``v`` either ``[B, Hkv, Lk, D]`` or paged
``[pages, Hkv, page_size, D]``; the op's ``data`` list ``[kv_lengths, q_lengths]`` (int64 ``[B]``)
or ``[kv_lengths, q_lengths, block_table]`` (int64 ``[B, max_pages]``, ``-1`` for a page that
is not held); a plan key from :func:`register`. Goes out: ``(out, lse)`` and the gradients, each
batch element computed as its own problem (``Lk = kv_lengths[b]``, ``Lq = q_lengths[b]``, queries
end-aligned); rows ``i >= q_lengths[b]`` are zeros with ``lse = -inf`` and get zero gradients.

How: a *frame* places element ``b`` in a block plan. For a pattern whose meaning depends only
on the positions (:func:`position_only`: no layout, route, inputs or size-reading predicate),
one plan family serves every length: the square plan at ``S`` (``Lk_b`` rounded up to a power
of two, at least one tile), in which query ``i`` of element ``b`` is row ``Lk_b - Lq_b + i``
and keys stop at ``Lk_b``; a decoding step's row reads that plan's tile list for its one row
tile and never re-plans for a new ``Lk`` (the family has one plan per doubling). Other patterns
get the exact plan at ``(Lq_b, Lk_b)`` (cached per length pair). Each row tile then gathers
only the key tiles its list names (through the block table for a paged cache: only those
positions, never the whole cache), evaluates the pattern on its partial tiles and runs an exact
two-pass softmax in float32 (float64 for float64 inputs). The backward pass recomputes the
probabilities from the saved ``lse`` and scatters ``dk``/``dv`` back through the same
positions (shared pages sum their gradients). Float32 calls of few query rows (decoding) run the native decoding
kernel over the same tile lists when it is built (:mod:`patterndsl.runtime.cpu.native.decoding`: keys read in
place through the table, the table's entries checked there), the loop above otherwise.
"""

from __future__ import annotations

import bisect
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from patterndsl import ir, semantics
from patterndsl.errors import InputError
from patterndsl.runtime import paged, plans
from patterndsl.runtime.cpu.native import decoding
from patterndsl.runtime.cpu.tuning import FLASH

_LOCK = threading.Lock()
_REGISTRY = plans.Keys("ragged plan")
#: Primitives whose meaning reads only the two positions (and the head).
#: Tiles of the CPU loop's plan family (rows, keys).
BLOCK = (64, 64)
POSITION_PRIMS = frozenset({"full", "empty", "causal", "window", "strided", "sink", "global", "where"})


def register(pattern: ir.PatternIR, block: tuple[int, int], paged: bool) -> str:
    """The key the op carries for a ragged (``paged``: paged) call of ``pattern`` with tiles ``block``."""
    spec = (pattern, (int(block[0]), int(block[1])), bool(paged))
    return _REGISTRY.register(spec, lambda s, n: f"r{n}:{s[1][0]}x{s[1][1]}:{'paged' if s[2] else 'ragged'}")


def owns(plan_key: str) -> bool:
    """True for keys made by :func:`register` (the op hands those calls here)."""
    return plan_key in _REGISTRY


def _reads_sizes(prim: ir.Prim) -> bool:
    if prim.name != "where":
        return False
    pred = prim.arg("pred")
    return any(isinstance(e, ir.Var) and e.name in ("Lq", "Lk") for e in ir.walk_expr(pred)) or any(
        isinstance(e, (ir.Coord, ir.InputRef)) for e in ir.walk_expr(pred)
    )


@functools.lru_cache(maxsize=256)
def position_only(pattern: ir.PatternIR) -> bool:
    """Whether every head's mask depends only on the query and key positions (not on ``Lq``/``Lk``)."""
    if pattern.layout is not None or pattern.inputs:
        return False
    nodes = [r.node for r in pattern.heads] + ([pattern.default] if pattern.default is not None else [])
    for node in nodes:
        for sub in ir.walk(node):
            if isinstance(sub, ir.Prim) and (sub.name not in POSITION_PRIMS or _reads_sizes(sub)):
                return False
    return True


# --------------------------------------------------------------------------- validation


def _lengths(name: str, t, batch: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be an int tensor [batch], got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        raise InputError(f"{name} must be an integer tensor [batch], got dtype {str(t.dtype).replace('torch.', '')}")
    if tuple(t.shape) != (batch,):
        raise InputError(f"{name} must have shape [batch] = [{batch}], got {tuple(t.shape)}")
    if t.device != device:
        raise InputError(f"{name} is on {t.device} but q is on {device}")


def check_call(q, k, v, kv_lengths, q_lengths, block_table) -> list[torch.Tensor]:
    """Validate a ragged or paged call's lengths and table (types, shapes, devices); returns the op's ``data``.

    ``q``, ``k``, ``v`` have passed the shape checks already (the paged ones in :func:`check_paged`).
    The values are checked by :func:`check_values` inside the op, where they are real numbers also
    under ``torch.compile``.

    Raises:
        InputError: naming the argument: a wrong type, dtype, shape or device.
    """
    batch = q.shape[0]
    if block_table is not None and kv_lengths is None:
        raise InputError("a paged k/v (block_table=) needs kv_lengths= (the number of keys of each element)")
    if kv_lengths is not None:
        _lengths("kv_lengths", kv_lengths, batch, q.device)
    if q_lengths is not None:
        _lengths("q_lengths", q_lengths, batch, q.device)
    if block_table is not None:
        _table(block_table, batch, q.device)
    return call_data(q, k, kv_lengths, q_lengths, block_table)


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


_FILLED: OrderedDict = OrderedDict()
#: Lengths tensors kept for arguments left out (a decoding step's ``q_lengths``): filled once, never written.
MAX_FILLED = 64


def _filled(batch: int, value: int, device) -> torch.Tensor:
    """An int64 ``[batch]`` of ``value`` (kept: every layer of every decoding step asks for the same one; a new one
    under ``torch.compile``, which traces it)."""
    if torch.compiler.is_compiling():
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    key = (batch, value, device)
    got = _FILLED.get(key)
    if got is None:
        got = torch.full((batch,), value, dtype=torch.int64, device=device)
        with _LOCK:
            _FILLED[key] = got
            while len(_FILLED) > MAX_FILLED:
                _FILLED.popitem(last=False)
    return got


def call_data(q, k, kv_lengths, q_lengths, block_table) -> list[torch.Tensor]:
    """The op's ``data`` for arguments :func:`check_call` accepted: int64 lengths (missing ones filled in) and
    the table."""
    batch = q.shape[0]
    kvl = _filled(batch, k.shape[2], q.device) if kv_lengths is None else kv_lengths
    ql = _filled(batch, q.shape[2], q.device) if q_lengths is None else q_lengths
    data = [_int64(kvl), _int64(ql)]
    if block_table is not None:
        data.append(_int64(block_table))
    return data


def check_values(q, k, data) -> tuple[list[int], list[int]]:
    """The lengths and the table's values: lengths within the tensors, pages within the cache.

    Returns:
        ``(kv_lengths, q_lengths)`` as lists.

    Raises:
        InputError: naming the argument and the offending value.
    """
    lengths = check_lengths(q, k, data)
    check_table(q, k, data, lengths)
    return lengths


def check_lengths(q, k, data) -> tuple[list[int], list[int]]:
    """The lengths' values (:func:`check_values` without the table's): ``(kv_lengths, q_lengths)`` as lists."""
    lengths = data[0].tolist(), data[1].tolist()
    if not q.shape[0]:
        return lengths
    lq, paged_call = q.shape[2], len(data) > 2
    cap = data[2].shape[1] * k.shape[2] if paged_call else k.shape[2]
    for name, t, limit in (("kv_lengths", lengths[0], cap), ("q_lengths", lengths[1], lq)):
        lo, hi = min(t), max(t)
        if lo < 0 or hi > limit:
            if name == "q_lengths":
                text = f"q has {lq} queries"
            elif paged_call:
                text = f"block_table holds {data[2].shape[1]} pages of {k.shape[2]}"
            else:
                text = f"k has {k.shape[2]} positions"
            raise InputError(f"{name} holds {lo if lo < 0 else hi}, outside 0..{limit} ({text})")
    return lengths


def check_table(q, k, data, lengths) -> None:
    """The block table's values (a paged call): every page an element holds (below its ``kv_lengths``) is a page
    of the cache or -1. A table checked before and unchanged since is not checked again (:mod:`.paged`)."""
    if len(data) < 3 or not q.shape[0] or paged.checked(data[2], k.shape[0], k.shape[2], lengths[0]):
        return
    table, ps = data[2], k.shape[2]
    held = torch.arange(table.shape[1])[None, :] < ((data[0] + ps - 1) // ps)[:, None]
    bad = ((table < -1) | (table >= k.shape[0])) & held
    if bool(bad.any()):
        b, p = (int(x) for x in torch.nonzero(bad)[0])
        raise InputError(
            f"block_table[{b}, {p}] = {int(table[b, p])} is not a page of the cache (0..{k.shape[0] - 1}, "
            "or -1 for none)"
        )
    # A table whose every entry is a page or -1 (what a PagedKVCache hands out) holds for any lengths: the
    # next step's new lengths skip the check.
    whole = bool(((table >= -1) & (table < k.shape[0])).all())
    paged.remember(table, k.shape[0], ps, None if whole else lengths[0])


def _table(t, batch: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise InputError(f"block_table must be an int tensor [batch, max_pages], got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16):
        raise InputError(f"block_table must be an integer tensor, got dtype {str(t.dtype).replace('torch.', '')}")
    if t.dim() != 2 or t.shape[0] != batch:
        raise InputError(f"block_table must have shape [batch, max_pages] with batch = {batch}, got {tuple(t.shape)}")
    if t.device != device:
        raise InputError(f"block_table is on {t.device} but q is on {device}")


def check_paged(q, k, v) -> None:
    """Shapes of a paged call: ``q [B, H, Lq, D]``, ``k``/``v`` ``[pages, Hkv, page_size, D]``."""
    for name, t in (("k", k), ("v", v)):
        if t.shape[:3] != k.shape[:3]:
            raise InputError(
                f"paged k and v must have the same [pages, kv_heads, page_size], got {tuple(k.shape)} "
                f"and {tuple(v.shape)}"
            )
        if t.shape[2] < 1:
            raise InputError(f"paged {name} must have page_size >= 1, got shape {tuple(t.shape)}")
    if k.shape[3] != q.shape[3]:
        raise InputError(f"head_dim differs: q has {q.shape[3]}, k has {k.shape[3]}")
    h, hkv = q.shape[1], k.shape[1]
    if hkv < 1 or h % hkv:
        raise InputError(f"paged k/v have {hkv} kv heads, which does not divide the {h} query heads")


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    """Where batch element ``b`` sits in a plan: its query ``i`` is plan row ``row0 + i``; keys stop at ``kv_len``."""

    plan: object
    row0: int
    q_len: int
    kv_len: int
    ctx: semantics.Context


def family_size(kv_len: int, bn: int) -> int:
    """The plan family's size for ``kv_len`` keys: a power of two, at least one tile."""
    s = max(bn, 1)
    while s < kv_len:
        s *= 2
    return s


@functools.cache
def _identity_key(pattern: ir.PatternIR, block) -> str:
    return plans.register(pattern, block, "identity")


def frame(pattern: ir.PatternIR, block, heads: int, q_len: int, kv_len: int, square: bool) -> Frame:
    """The :class:`Frame` of an element with ``q_len`` queries over ``kv_len`` keys."""
    key = _identity_key(pattern, block)
    if square and q_len <= kv_len:
        s = family_size(kv_len, block[1])
        return Frame(plans.get(key, s, s, heads), kv_len - q_len, q_len, kv_len, semantics.Context(s, s, None))
    plan = plans.get(key, q_len, kv_len, heads)
    return Frame(plan, 0, q_len, kv_len, semantics.Context(q_len, kv_len, pattern.layout))


@dataclass
class Tile:
    """One row tile's work: element rows ``i0:i1``, key positions ``keys``, allowed ``[Hg or 1, n, nk]``."""

    i0: int
    i1: int
    keys: torch.Tensor
    allowed: torch.Tensor | None  # None: every pair allowed
    runs: tuple[tuple[int, int], ...] = ()  # ``keys`` as runs of positions [start, stop)
    _biases: dict = field(default_factory=dict)

    @functools.cached_property
    def empty(self) -> torch.Tensor | None:
        """Bool ``[Hg or 1, n]``: rows with no allowed key (None when there are none)."""
        if self.allowed is None:
            return None
        rows = ~self.allowed.any(-1)
        return rows if bool(rows.any()) else None

    def bias(self, share: int) -> torch.Tensor:
        """The additive float32 mask for the fused kernel, ``[1, Hkv or 1, share * n, nk]``, kept per tile."""
        got = self._biases.get(share)
        if got is None:
            a = self.allowed
            n, nk = a.shape[1], a.shape[2]
            rows = (
                a.expand(share, n, nk).reshape(1, 1, share * n, nk)
                if a.shape[0] == 1
                else a.reshape(1, -1, share * n, nk)
            )
            got = self._biases[share] = torch.zeros(rows.shape).masked_fill_(~rows, float("-inf"))
        return got


@dataclass(frozen=True)
class RowTile:
    """A plan row tile's key tiles, kept per plan: ``cols`` (ascending, a Python list for cutting at a
    length), whether they are one run, and the partial ones' indices into the list."""

    cols: list[int]
    run: bool
    partial: list[int]


def _row_tile(plan, g: int, m: int) -> RowTile:
    rows = plans.per_plan(plan, ("ragged-rows", g), dict)
    got = rows.get(m)
    if got is None:
        tl = plan.groups[g].tiles
        a, b = int(tl.row_ptr[m]), int(tl.row_ptr[m + 1])
        cols = tl.cols[a:b].tolist()
        partial = torch.nonzero(tl.state[a:b] != 2).flatten().tolist()
        got = rows[m] = RowTile(cols, bool(cols) and cols[-1] - cols[0] + 1 == len(cols), partial)
    return got


def _runs(cols: list[int], bn: int, kv_len: int) -> tuple[tuple[int, int], ...]:
    """Key tiles ``cols`` (ascending) as runs of positions ``[start, stop)``, cut at ``kv_len``."""
    out = []
    for c in cols:
        if out and out[-1][1] == c * bn:
            out[-1][1] = min(c * bn + bn, kv_len)
        else:
            out.append([c * bn, min(c * bn + bn, kv_len)])
    return tuple((a, z) for a, z in out)


def row_tiles(fr: Frame, gr: Group):
    """The row tiles of head group ``gr`` in frame ``fr``: :class:`Tile` s with their keys and masks."""
    plan = fr.plan
    bm, bn = plan.block
    if fr.q_len == 0 or fr.kv_len == 0:
        return
    last_tile = (fr.kv_len - 1) // bn
    for m in range(fr.row0 // bm, (fr.row0 + fr.q_len - 1) // bm + 1):
        rt = _row_tile(plan, gr.index, m)
        n = bisect.bisect_right(rt.cols, last_tile)
        if not n:
            continue
        cols = rt.cols[:n]
        r0, r1 = max(m * bm, fr.row0), min((m + 1) * bm, fr.row0 + fr.q_len)
        # Tile t of the row's list starts at offset t * BN of ``keys`` (only the last tile can be cut short).
        if rt.run:
            keys = torch.arange(cols[0] * bn, min((cols[-1] + 1) * bn, fr.kv_len))
        else:
            keys = (torch.tensor(cols)[:, None] * bn + torch.arange(bn)).flatten()
            keys = keys[keys < fr.kv_len]
        allowed = None
        partial = [t for t in rt.partial if t < n]
        if partial:
            # The pattern is evaluated on the partial tiles' columns only; full tiles allow every pair.
            if len(partial) == 1:
                idx = torch.arange(partial[0] * bn, min(partial[0] * bn + bn, keys.numel()))
            else:
                idx = (torch.tensor(partial)[:, None] * bn + torch.arange(bn)).flatten()
                idx = idx[idx < keys.numel()]
            sub = semantics.evaluate(gr.node, torch.arange(r0, r1)[:, None], keys[idx][None, :], gr.hidx, fr.ctx)
            if idx.numel() == keys.numel():
                allowed = sub if sub.dim() == 3 else sub[None]
            else:
                allowed = torch.ones(sub.shape[0] if sub.dim() == 3 else 1, r1 - r0, keys.numel(), dtype=torch.bool)
                allowed[..., idx] = sub
        yield Tile(r0 - fr.row0, r1 - fr.row0, keys, allowed, _runs(cols, bn, fr.kv_len))


# --------------------------------------------------------------------------- key access


class Keys:
    """Reads key/value rows of one batch element: slices of ``[B, Hkv, Lk, D]`` or gathers through a page table."""

    def __init__(self, k, v, b: int, table: torch.Tensor | None):
        self.k, self.v, self.b, self.table = k, v, b, table

    def _where(self, pos: torch.Tensor):
        ps = self.k.shape[2]
        page = self.table[self.b, pos // ps]
        return page, pos % ps

    def get(self, tile: Tile):
        """``(K, V)`` ``[Hkv, n, D]`` at the tile's key positions (views for one unpaged run, else copies of
        those positions only); checks that no allowed pair reads a missing page."""
        parts = [self._run(a, z, tile) for a, z in tile.runs]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([kk for kk, _ in parts], 1), torch.cat([vv for _, vv in parts], 1)

    def _run(self, a: int, z: int, tile: Tile):
        if self.table is None:
            return self.k[self.b, :, a:z], self.v[self.b, :, a:z]
        ps = self.k.shape[2]
        p0, p1 = a // ps, (z - 1) // ps + 1
        phys = self.table[self.b, p0:p1]
        missing = phys < 0
        if bool(missing.any()):
            self._check_missing(tile, missing, p0, a, z)
            phys = phys.clamp(min=0)
        pos = torch.arange(a, z)
        kk = paged.flat_rows(self.k, phys[pos // ps - p0], pos % ps)
        vv = paged.flat_rows(self.v, phys[pos // ps - p0], pos % ps)
        if kk is not None and vv is not None:
            # The run's rows only, one copy (masked: a page not held reads as zeros).
            if bool(missing.any()):
                gone = missing[pos // ps - p0][None, :, None]
                kk, vv = kk.masked_fill(gone, 0.0), vv.masked_fill(gone, 0.0)
            return kk, vv
        # Whole pages are gathered (contiguous copies), then the run is sliced out of them.
        kk, vv = (x.index_select(0, phys) for x in (self.k, self.v))
        if bool(missing.any()):
            kk, vv = (x.masked_fill(missing[:, None, None, None], 0.0) for x in (kk, vv))
        kk, vv = (x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[3]) for x in (kk, vv))
        off = a - p0 * ps
        return kk[:, off : off + z - a], vv[:, off : off + z - a]

    def _check_missing(self, tile: Tile, missing: torch.Tensor, p0: int, a: int, z: int) -> None:
        ps = self.k.shape[2]
        pos = torch.arange(a, z)
        lost = missing[pos // ps - p0]
        if tile.allowed is not None:
            base = 0
            for ra, rz in tile.runs:
                if ra == a:
                    break
                base += rz - ra
            lost = lost & tile.allowed.any(0).any(0)[base : base + z - a]
        if bool(lost.any()):
            raise InputError(
                f"block_table has no page (-1) for key position {int(pos[lost][0])} of batch element {self.b}, "
                "which the pattern lets a query attend"
            )

    def add(self, dk, dv, pos: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> None:
        """Accumulate ``gk``/``gv`` ``[Hkv, n, D]`` into ``dk``/``dv`` at positions ``pos``."""
        if self.table is None:
            dk[self.b].index_add_(1, pos, gk.to(dk.dtype))
            dv[self.b].index_add_(1, pos, gv.to(dv.dtype))
            return
        page, off = self._where(pos)
        ok = page >= 0
        page, off = page[ok], off[ok]
        heads = torch.arange(dk.shape[1])[:, None]
        dk.index_put_((page[None, :], heads, off[None, :]), gk[:, ok].to(dk.dtype), accumulate=True)
        dv.index_put_((page[None, :], heads, off[None, :]), gv[:, ok].to(dv.dtype), accumulate=True)


# --------------------------------------------------------------------------- forward / backward


def _spec(plan_key: str):
    return _REGISTRY.spec(plan_key)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Work(list):
    """A call's kept tile lists (:func:`_work`): ``[(b, [(group, [tile, ...]), ...]), ...]``, with ``native``, the
    native decoding kernel's :class:`~patterndsl.runtime.cpu.native.decoding.Program` of them once built (False:
    the kernel does not take them)."""

    native: object = None


_WORK: OrderedDict = OrderedDict()
#: Calls whose tile lists are kept (every layer of a model's step repeats the same lengths).
MAX_WORK = 16
#: Query rows up to which a call's tile lists and masks are kept (decoding, short chunks).
WORK_ROWS = 1024


def _work(plan_key: str, q, k, data, lengths=None):
    """Per element with work: ``(b, [(group, [tile, ...]), ...])``, kept per lengths for small calls."""
    kvl, ql = lengths or (data[0].tolist(), data[1].tolist())
    heads, kv_heads = q.shape[1], k.shape[1]
    key = (plan_key, tuple(kvl), tuple(ql), heads, kv_heads)
    with _LOCK:
        got = _WORK.get(key)
        if got is not None:
            _WORK.move_to_end(key)
            return got
    pattern, block, _ = _spec(plan_key)
    square = position_only(pattern)
    out = []
    for b in range(q.shape[0]):
        if ql[b] == 0 or kvl[b] == 0:
            continue  # no query, or no key: zeros and lse = -inf
        fr = frame(pattern, block, heads, ql[b], kvl[b], square)
        out.append((b, [(gr, row_tiles(fr, gr)) for gr in _groups(fr.plan, heads, kv_heads)]))
    if sum(ql) > WORK_ROWS:
        return out  # generators: the tiles are made as they run
    out = Work((b, [(gr, list(tiles)) for gr, tiles in groups]) for b, groups in out)
    with _LOCK:
        _WORK[key] = out
        while len(_WORK) > MAX_WORK:
            _WORK.popitem(last=False)
    return out


def clear() -> None:
    """Forget the kept tile lists."""
    with _LOCK:
        _WORK.clear()


class Group:
    """One head group's query heads and how they read the key/value heads.

    When the group is every query head in order, ``q`` rows of the ``share`` heads reading one
    key/value head are stacked (``[Hkv, share * rows, D]``) and multiplied with that head's keys
    directly; otherwise the keys are indexed per query head and gradients summed back.
    """

    def __init__(self, index: int, node: ir.Node, heads: tuple[int, ...], total: int, kv_heads: int):
        self.index, self.heads, self.node = index, heads, node
        self.hidx = torch.tensor(heads, dtype=torch.int64)[:, None, None] if ir.uses_head(node) else heads[0]
        self.share, self.kv_heads = total // kv_heads, kv_heads
        self.all = heads == tuple(range(total))
        self.sel = slice(None) if self.all else list(heads)
        self.kvh = torch.tensor([h // self.share for h in heads], dtype=torch.int64)

    def rows(self, x: torch.Tensor, b: int, i0: int, i1: int, dt) -> torch.Tensor:
        """``x[b, heads, i0:i1]`` in ``dt``, ``[Hg, n, D]``."""
        return x[b, self.sel, i0:i1].to(dt)

    def _stack(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.kv_heads, -1, x.shape[-1])

    def mm(self, a: torch.Tensor, kv: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``a [Hg, n, X] @ kv[head]`` (``kv [Hkv, nk, Y]``; transposed: ``@ kv^T``) per query head."""
        kt = kv.transpose(-1, -2) if transpose else kv
        if self.all:
            return torch.matmul(self._stack(a), kt).view(a.shape[0], a.shape[1], -1)
        return torch.matmul(a, kt[self.kvh])

    def tmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``sum over the query heads of a key/value head of a^T @ b``: ``[Hkv, nk, Y]``."""
        if self.all:
            return torch.matmul(self._stack(a).transpose(-1, -2), self._stack(b))
        out = torch.zeros(self.kv_heads, a.shape[-1], b.shape[-1], dtype=a.dtype)
        return out.index_add_(0, self.kvh, torch.matmul(a.transpose(-1, -2), b))


def _groups(plan, heads: int, kv_heads: int) -> list[Group]:
    def build():
        return [Group(g, group.node, tuple(group.heads), heads, kv_heads) for g, group in enumerate(plan.groups)]

    return plans.per_plan(plan, ("ragged-groups", heads, kv_heads), build)


def _scores(gr: Group, qr, kk, allowed, scale):
    s = gr.mm(qr * scale, kk, transpose=True)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


def _pv(gr: Group, p, vv, allowed):
    """``p @ v`` per query head; a non-finite value at a zero weight must not reach the row (LANGUAGE.md
    section 2): a finite result is exact, otherwise it is recomputed selecting."""
    o = gr.mm(p, vv, transpose=False)
    if allowed is None or paged.finite(o):
        return o
    vh = vv[gr.kvh]
    return (p[..., None] * vh[:, None]).masked_fill(~allowed[..., None], 0.0).sum(-2)


def _tile_math(gr: Group, qr, kk, vv, t: Tile, scale: float):
    """One row tile by matmuls and an exact softmax: ``(o [Hg, n, D], lse [Hg, n])``."""
    s = _scores(gr, qr, kk, t.allowed, scale)
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = s.sub_(m).exp_()
    den = p.sum(-1, keepdim=True)
    o = _pv(gr, p, vv, t.allowed) / den.clamp(min=torch.finfo(qr.dtype).tiny)
    return o, (m + den.log()).squeeze(-1)


def _tile_fused(gr: Group, qr, kk, vv, t: Tile, scale: float):
    """One row tile by torch's fused CPU flash kernel, the heads reading one kv head stacked as rows."""
    n = t.i1 - t.i0
    bias = t.bias(gr.share) if t.allowed is not None else None
    o, lse = FLASH(
        qr.reshape(1, gr.kv_heads, gr.share * n, -1), kk[None], vv[None], 0.0, False, attn_mask=bias, scale=scale
    )
    o = o.reshape(len(gr.heads), n, -1)
    lse = lse.reshape(len(gr.heads), n)
    if t.empty is not None:
        # The kernel reports lse = 0 for rows with no allowed key; the contract says -inf.
        lse = lse.masked_fill(t.empty, float("-inf"))
    return o, lse


def _run_tile(gr: Group, q, b: int, kk, vv, t: Tile, scale: float, dt, fused: bool):
    """``(o [Hg, n, D], lse [Hg, n])`` of one row tile: the fused kernel when it applies and its result is
    finite (a non-finite one may hold a blocked pair's NaN), else the exact math path."""
    kk, vv = kk.to(dt), vv.to(dt)
    qr = gr.rows(q, b, t.i0, t.i1, dt)
    if fused and gr.all:
        o, row_lse = _tile_fused(gr, qr, kk, vv, t, scale)
        if paged.finite(o):
            return o, row_lse
    return _tile_math(gr, qr, kk, vv, t, scale)


def _single(work, batch: int, q_len: int):
    """The one group and tile of a call that is a single row tile of every head (a decoding step), or None."""
    if batch != 1 or len(work) != 1 or work[0][0] != 0 or len(work[0][1]) != 1:
        return None
    gr, tiles = work[0][1][0]
    if not gr.all or not isinstance(tiles, list) or len(tiles) != 1 or (tiles[0].i0, tiles[0].i1) != (0, q_len):
        return None
    return gr, tiles[0]


def _native(work, q, k, v, data, scale: float):
    """``(out, lse)`` by the native decoding kernel (:mod:`patterndsl.runtime.cpu.native.decoding`), or None:
    kept tile lists only (small calls), tensors and options it serves, and a result it vouches for (the kernel
    checks the table's entries itself: one outside the cache hands the call back to :func:`check_table`)."""
    if not isinstance(work, Work) or not decoding.serves(q, k, v):
        return None
    prog = work.native
    if prog is None:
        prog = work.native = decoding.program(work, q.shape[0], q.shape[1], k.shape[1], q.shape[2]) or False
    table = data[2] if len(data) > 2 else None
    return decoding.forward(prog, q, k, v, data[0], table, scale) if prog else None


def forward(q, k, v, plan_key: str, data, scale: float, lengths=None):
    """``(out, lse)`` of a ragged or paged call (see the module docstring). ``lengths``: from
    :func:`check_lengths` (the table's values are then checked here), or None (everything checked already)."""
    work = _work(plan_key, q, k, data, lengths)
    got = _native(work, q, k, v, data, scale)
    if got is not None:
        return got
    if lengths is not None:
        check_table(q, k, data, lengths)
    from patterndsl.runtime import op  # (op imports this module)

    q, k, v = op.unit_stride(q, k, v)
    b_, h, lq, _ = q.shape
    dt = _compute_dtype(q.dtype)
    table = data[2] if len(data) > 2 else None
    fused = FLASH is not None and q.dtype == torch.float32
    single = _single(work, b_, lq)
    if single is not None:
        # A decoding step: the tile's result is the whole output, no buffers to fill.
        gr, t = single
        got = None if table is None else paged.in_place(gr, q, 0, k, v, table[0], t, scale, dt)
        o, row_lse = got if got is not None else _run_tile(gr, q, 0, *Keys(k, v, 0, table).get(t), t, scale, dt, fused)
        o = o.view(1, h, lq, -1)
        return (o if o.dtype == q.dtype else o.to(q.dtype)), row_lse.view(1, h, lq)
    out = torch.zeros(b_, h, lq, v.shape[3], dtype=dt)
    lse = torch.full((b_, h, lq), float("-inf"), dtype=dt)
    for b, groups in work:
        keys = Keys(k, v, b, table)
        for gr, tiles in groups:
            for t in tiles:
                got = None if table is None else paged.in_place(gr, q, b, k, v, table[b], t, scale, dt)
                o, row_lse = got if got is not None else _run_tile(gr, q, b, *keys.get(t), t, scale, dt, fused)
                out[b, gr.sel, t.i0 : t.i1] = o
                lse[b, gr.sel, t.i0 : t.i1] = row_lse
    return out.to(q.dtype), lse


def backward(q, k, v, out, lse, dout, dlse, plan_key: str, data, scale: float, lengths=None):
    """``(dq, dk, dv)`` of a ragged or paged call; ``dk``/``dv`` shaped like ``k``/``v`` (paged or not)."""
    dt = _compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt)
    dk = torch.zeros(k.shape, dtype=dt)
    dv = torch.zeros(v.shape, dtype=dt)
    table = data[2] if len(data) > 2 else None
    for b, groups in _work(plan_key, q, k, data, lengths):
        keys = Keys(k, v, b, table)
        for gr, tiles in groups:
            for t in tiles:
                kk, vv = keys.get(t)
                kk, vv = kk.to(dt), vv.to(dt)
                qr = gr.rows(q, b, t.i0, t.i1, dt)
                do = gr.rows(dout, b, t.i0, t.i1, dt)
                rl = gr.rows(lse[..., None], b, t.i0, t.i1, dt)
                gone = rl == float("-inf")
                p = _scores(gr, qr, kk, t.allowed, scale).sub_(rl.masked_fill(gone, 0.0)).exp_()
                p = p.masked_fill(gone, 0.0)
                delta = (do * gr.rows(out, b, t.i0, t.i1, dt)).sum(-1, keepdim=True)
                dp = gr.mm(do, vv, transpose=True)
                ds = p * (dp - delta + gr.rows(dlse[..., None], b, t.i0, t.i1, dt))
                dq[b, gr.sel, t.i0 : t.i1] += gr.mm(ds, kk, transpose=False) * scale
                keys.add(dk, dv, t.keys, gr.tmm(ds, qr) * scale, gr.tmm(p, do))
    return dq, dk, dv


def element_keys(k, v, table, b: int, kv_len: int, live=None):
    """Element ``b``'s keys and values ``[1, Hkv, kv_len, D]``: a slice, or its pages gathered through the table.

    A page not held (``-1``) reads as zeros when ``live`` (inclusive intervals of the key positions the
    element's queries may reach, :func:`patterndsl.kvcache.live_keys`) shows that no query reaches it.

    Raises:
        InputError: a page not held that a query may reach.
    """
    if table is None:
        return k[b : b + 1, :, :kv_len], v[b : b + 1, :, :kv_len]
    ps = k.shape[2]
    phys = table[b, : -(-kv_len // ps)]
    missing = phys < 0
    if bool(missing.any()):
        for p in torch.nonzero(missing).flatten().tolist():
            if live is None or any(lo <= p * ps + ps - 1 and p * ps <= hi for lo, hi in live):
                raise InputError(
                    f"block_table has no page (-1) for key position {p * ps} of batch element {b}, which a query of "
                    "this call may attend (a route(...) may choose any of its candidate blocks)"
                )
        phys = phys.clamp(min=0)
    kb, vb = (x[phys].transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])[:, :, :kv_len] for x in (k, v))
    if bool(missing.any()):
        gone = missing.repeat_interleave(ps)[:kv_len]
        kb, vb = (x.masked_fill(gone[:, None], 0.0) for x in (kb, vb))
    return kb, vb


def add_element_keys(dk, dv, table, b: int, kv_len: int, gk: torch.Tensor, gv: torch.Tensor) -> None:
    """Add element ``b``'s key/value gradients ``[Hkv, kv_len, D]`` into ``dk``/``dv`` (through the table)."""
    if table is None:
        dk[b, :, :kv_len] += gk
        dv[b, :, :kv_len] += gv
        return
    pos = torch.arange(kv_len, device=gk.device)
    ps = dk.shape[2]
    page, off = table[b, pos // ps].to(gk.device), pos % ps
    heads = torch.arange(dk.shape[1], device=gk.device)[:, None]
    dk.index_put_((page[None, :], heads, off[None, :]), gk.to(dk.dtype), accumulate=True)
    dv.index_put_((page[None, :], heads, off[None, :]), gv.to(dv.dtype), accumulate=True)


def per_element(q, k, v, data, run, pattern=None):
    """A call run element by element on its own unpadded problem (``route`` patterns), differentiable.

    ``run(q_b, k_b, v_b, b, kv_len)`` returns ``(out, lse)`` of element ``b`` (``[1, H, Lq_b, D]``); the element's
    keys are :func:`element_keys` (pages freed by a :class:`patterndsl.PagedKVCache` of ``pattern`` read
    as zeros: no query of the call reaches them). Rows past ``q_lengths[b]`` are zeros with ``lse = -inf``.
    """
    from patterndsl.kvcache import live_keys

    check_values(q, k, data)
    kvl, ql = data[0].tolist(), data[1].tolist()
    table = data[2] if len(data) > 2 else None
    b_, h, lq, _ = q.shape
    outs, lses = [], []
    for b in range(b_):
        out = q.new_zeros(1, h, lq, v.shape[3])
        lse = torch.full((1, h, lq), float("-inf"), dtype=_compute_dtype(q.dtype), device=q.device)
        if ql[b] and kvl[b]:
            live = None if table is None or pattern is None else live_keys(pattern, h, kvl[b] - ql[b])
            kb, vb = element_keys(k, v, table, b, kvl[b], live)
            o, l_ = run(q[b : b + 1, :, : ql[b]], kb, vb, b, kvl[b])
            out = torch.cat([o, out[:, :, ql[b] :]], 2)
            lse = torch.cat([l_.to(lse.dtype), lse[:, :, ql[b] :]], 2)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def forward_op(q, k, v, plan_key: str, data, scale: float, backend: str):
    """The op's forward for a ragged key: the CPU loop below, or the ragged Triton kernels."""
    lengths = check_lengths(q, k, data)
    if backend == "triton":
        from patterndsl.runtime import triton_ragged

        check_table(q, k, data, lengths)
        out, lse = triton_ragged.forward(q, k, v, _spec(plan_key)[0], data, scale)
    else:
        out, lse = forward(q, k, v, plan_key, data, scale, lengths)
    return out.contiguous(), lse.contiguous()


def backward_op(dout, dlse, q, k, v, out, lse, plan_key: str, data, scale: float, backend: str):
    """The op's backward for a ragged key."""
    if backend == "triton":
        from patterndsl.runtime import triton_ragged

        grads = triton_ragged.backward(q, k, v, out, lse, dout, dlse, _spec(plan_key)[0], data, scale)
    else:
        grads = backward(q, k, v, out, lse, dout, dlse, plan_key, data, scale)
    return tuple(g.to(x.dtype).contiguous() for g, x in zip(grads, (q, k, v), strict=True))
