"""Paged key/value cache that frees what its pattern can no longer see (LANGUAGE.md section 9).

Comes in: a :class:`~patterndsl.api.Pattern`, the cache's geometry, then ``append`` calls with
new keys and values per batch element. Goes out: ``view()`` — ``(k, v, block_table,
kv_lengths)`` ready for ``attention(..., block_table=, kv_lengths=)`` — and the pages held.

Positions are logical: page ``p`` of an element holds positions ``p * page_size ...``, so
freeing a page never shifts a position; its table entry becomes ``-1``. Which positions stay
reachable comes from the primitives' closed forms (:func:`live_keys`): every query still to come
sits at a position ``>= t`` (the first position of the latest append; those queries attend right
after it), and each primitive's ``needed_keys`` bounds the keys queries in ``[t, inf)`` may
reach, combined through ``|`` (union of intervals), ``&`` (intersection) and ``~`` (everything).
The bound is a superset, so a freed page is never read; for ``causal & (window(w) | sink(s))``
it is exactly the sinks plus the last window, so memory stays ``O(w + page)`` however long the
generation. A ``route(...)`` may choose any of its candidates: the key blocks its ``among`` lets a
later query reach, whole (so ``route(k, among = causal & window(w))`` keeps the window widened to
the route's blocks). Patterns whose meaning reads the sizes (layouts, ``blocks``, ``random``,
inputs) keep every page (see :func:`patterndsl.runtime.ragged.position_only`).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from patterndsl import ir
from patterndsl.errors import InputError, PatternError, PatternValueError

#: Caches by ``id`` of their key pages, so a call over those pages finds the cache's block summaries.
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

#: An interval list ``[(lo, hi), ...]`` (inclusive) of key positions, or None for every key.
Intervals = list | None


def _union(a: Intervals, b: Intervals) -> Intervals:
    if a is None or b is None:
        return None
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(a + b):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _inter(a: Intervals, b: Intervals) -> Intervals:
    if a is None:
        return b
    if b is None:
        return a
    out = [(max(x0, y0), min(x1, y1)) for x0, x1 in a for y0, y1 in b if max(x0, y0) <= min(x1, y1)]
    return _union(out, [])


def _node_keys(node: ir.Node, qlo: int, env) -> Intervals:
    from patterndsl import primitives
    from patterndsl.primitives.common import BIG

    if isinstance(node, ir.Union):
        out: Intervals = []
        for item in node.items:
            out = _union(out, _node_keys(item, qlo, env))
        return out
    if isinstance(node, ir.Inter):
        out = None
        for item in node.items:
            out = _inter(out, _node_keys(item, qlo, env))
        return out
    if not isinstance(node, ir.Prim):
        return None  # a complement may reach anything
    if node.name == "route":
        return _route_keys(node, qlo, env)
    rule = primitives.lookup(node.name).needed_keys
    if rule is None:
        return None
    got = rule(node, np.array([qlo], dtype=np.int64), np.array([BIG], dtype=np.int64), None, None, env)
    if got is None:
        return None
    lo, hi = int(np.asarray(got[0]).reshape(-1)[0]), int(np.asarray(got[1]).reshape(-1)[0])
    return [(lo, hi)] if lo <= hi else []


def _route_keys(node: ir.Prim, qlo: int, env) -> Intervals:
    """A route may choose any key block that its ``among`` lets a later query reach (its candidates), and
    then allows the whole block: ``among``'s live keys widened to the route's blocks."""
    block = node.arg("block")
    if isinstance(block, tuple):
        return None  # blocks are boxes of a grid
    out = _node_keys(node.arg("among"), qlo, env)
    if out is None:
        return None
    return _union([((lo // block) * block, (hi // block) * block + block - 1) for lo, hi in out], [])


def _static(node: ir.Node) -> bool:
    """Whether ``node`` reads positions only, counting a route by its ``among`` (its candidates)."""
    from patterndsl.runtime import ragged

    for sub in ir.walk(node):
        if isinstance(sub, ir.Prim) and sub.name == "route":
            if not _static(sub.arg("among")):
                return False
        elif isinstance(sub, ir.Prim) and (sub.name not in ragged.POSITION_PRIMS or ragged._reads_sizes(sub)):
            return False
    return True


def live_keys(pattern: ir.PatternIR, heads: int, qlo: int) -> Intervals:
    """Key positions some query at a position ``>= qlo`` may attend, over every head (a superset).

    Returns:
        Inclusive intervals, or None when any key may be reached (nothing can be freed).
    """
    from patterndsl.analysis.classify import Env
    from patterndsl.sizes import Sizes

    nodes = [r.node for r in pattern.heads] + ([pattern.default] if pattern.default is not None else [])
    if pattern.layout is not None or pattern.inputs or not all(_static(n) for n in nodes):
        return None
    big = 1 << 40
    out: Intervals = []
    for h in range(heads):
        node = pattern.node_for_head(h)
        if node is None:
            continue
        out = _union(out, _node_keys(node, qlo, Env(Sizes(big, big, None, heads), h)))
        if out is None:
            return None
    return out


def _summaries(pattern: ir.PatternIR, heads: int, batch: int, kv_heads: int, head_dim: int, dtype, device):
    """The block summaries the pattern's routes score from (None without a route this cache can summarize)."""
    from patterndsl.runtime import route_decode

    if not route_decode.serves(pattern):
        return None
    prims = {p for node in pattern.nodes() for p in ir.routes(node)}
    return route_decode.BlockSummaries(sorted(prims, key=ir.sort_key), batch, kv_heads, head_dim, dtype, device)


def owner(k, v, kv_lengths: list[int]):
    """The :class:`PagedKVCache` whose current pages ``k``/``v`` are (see :meth:`PagedKVCache.current`), or None."""
    cache = _OWNERS.get(id(k))
    return cache if cache is not None and cache.current(k, v, kv_lengths) else None


class PagedKVCache:
    """A paged key/value cache for decoding with a pattern.

    Args:
        pattern: the :class:`~patterndsl.Pattern` the cache serves (it decides what is freed).
        num_pages, page_size, kv_heads, head_dim: the geometry; ``k``/``v`` are
            ``[num_pages, kv_heads, page_size, head_dim]``.
        dtype, device: of the stored keys and values.
        batch: number of sequences.
        heads: query heads of the attention (for patterns with ``heads`` lines; default ``kv_heads``).
    """

    def __init__(
        self,
        pattern,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype=torch.float32,
        device="cpu",
        batch: int = 1,
        heads: int | None = None,
    ):
        from patterndsl.api import Pattern, _integer

        if not isinstance(pattern, Pattern):
            raise PatternError(f"PagedKVCache needs a patterndsl.Pattern, got {type(pattern).__name__}")
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("kv_heads", kv_heads)):
            _integer(name, value)
        _integer("head_dim", head_dim)
        _integer("batch", batch)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise PatternValueError(f"dtype must be a floating torch.dtype, got {dtype!r:.60}")
        self.pattern = pattern
        self.page_size = page_size
        self.heads = kv_heads if heads is None else _integer("heads", heads)
        self.k = torch.zeros(num_pages, kv_heads, page_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free_set = set(range(num_pages))
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._lengths = [0] * batch
        self.summaries = _summaries(pattern.ir, self.heads, batch, kv_heads, head_dim, dtype, device)
        # Every value appended so far is finite (a device flag: no sync at append; see :attr:`finite`).
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self._written = self._versions()
        _OWNERS[id(self.k)] = self

    @property
    def batch(self) -> int:
        return len(self._lengths)

    def pages_in_use(self) -> int:
        """The number of physical pages held."""
        return self.k.shape[0] - len(self._free_set)

    @property
    def finite(self) -> bool:
        """Whether every key and value appended so far is finite (the Triton kernels then need no pass over the
        pages to know that no non-finite value sits beside an attended one)."""
        return bool(self._finite)

    def lengths(self) -> list[int]:
        """Each element's length (positions appended so far)."""
        return list(self._lengths)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor, rows=None) -> None:
        """Append keys/values ``[n_rows, kv_heads, n, head_dim]`` to every element (or those in ``rows``).

        Pages no later query can attend to are freed first (later queries sit at positions from
        each element's current length on), then the new positions are written.

        Raises:
            InputError: tensors of the wrong shape, dtype or device, or bad ``rows``.
            PatternError: not enough free pages.
        """
        rows = self._rows(rows)
        _, hkv, ps, d = self.k.shape
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4 or t.shape[0] != len(rows) or t.shape[1] != hkv or t.shape[3] != d:
                raise InputError(
                    f"{name} must have shape [{len(rows)}, {hkv}, n, {d}] (rows, kv_heads, new positions, head_dim), "
                    f"got {tuple(t.shape)}"
                )
            if t.device != self.k.device:
                raise InputError(f"{name} is on {t.device} but the cache is on {self.k.device}")
        if k_new.shape[2] != v_new.shape[2]:
            raise InputError(f"k_new and v_new append different counts: {k_new.shape[2]} and {v_new.shape[2]}")
        n = k_new.shape[2]
        for b in rows:
            self._evict(b, self._lengths[b])
        need = sum(-(-(self._lengths[b] + n) // ps) - len(self._pages[b]) for b in rows)
        if need > len(self._free_set):
            raise PatternError(
                f"PagedKVCache is out of pages: appending {n} positions to {len(rows)} elements needs {need} more "
                f"pages, {len(self._free_set)} of {self.k.shape[0]} are free"
            )
        for i, b in enumerate(rows):
            start = self._lengths[b]
            pages = self._pages[b]
            while len(pages) * ps < start + n:
                pages.append(self._take(b))
            pos = torch.arange(start, start + n)
            phys = torch.tensor(pages, dtype=torch.int64)[pos // ps]
            kk, vv = k_new[i].to(self.k.dtype), v_new[i].to(self.v.dtype)
            self.k[phys, :, pos % ps] = kk.transpose(0, 1)
            self.v[phys, :, pos % ps] = vv.transpose(0, 1)
            self._finite &= torch.isfinite(kk).all() & torch.isfinite(vv).all()
            if self.summaries is not None:
                self.summaries.append(b, start, kk)
            self._lengths[b] = start + n
        self._written = self._versions()

    def _versions(self):
        """The pages' version counters (None for inference tensors, which keep none: then no call trusts the
        block summaries, since a write outside :meth:`append` could not be seen)."""
        try:
            return self.k._version, self.v._version
        except RuntimeError:
            return None

    def current(self, k, v, kv_lengths: list[int]) -> bool:
        """Whether ``k``/``v`` are this cache's pages, written only by :meth:`append`, at these lengths (its
        block summaries then describe them)."""
        return (
            k is self.k
            and v is self.v
            and self._written is not None
            and self._versions() == self._written
            and list(kv_lengths) == self._lengths
        )

    def _take(self, b: int) -> int:
        """A free page for element ``b``: the one after its last page when free, so that its pages form runs of
        consecutive physical pages (read in place, :mod:`patterndsl.runtime.paged`); an element's first page is
        taken at its share of the cache (``b * num_pages // batch``) so that elements appended in step grow in
        runs of their own; otherwise the lowest free page."""
        held = [p for p in self._pages[b] if p >= 0]
        want = held[-1] + 1 if held else b * self.k.shape[0] // self.batch
        if want not in self._free_set:
            # The lowest free page: pages freed behind a window come back in order, so runs form again.
            want = min(self._free_set)
        self._free_set.discard(want)
        return want

    def _rows(self, rows) -> list[int]:
        if rows is None:
            return list(range(self.batch))
        if isinstance(rows, torch.Tensor):
            rows = rows.tolist()
        if not isinstance(rows, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            raise InputError(f"rows must be a list of batch indices, got {rows!r:.60}")
        if len(set(rows)) != len(rows) or any(not 0 <= r < self.batch for r in rows):
            raise InputError(f"rows must be distinct batch indices in 0..{self.batch - 1}, got {list(rows)}")
        return list(rows)

    def _evict(self, b: int, qlo: int) -> None:
        """Free element ``b``'s pages wholly below ``qlo`` that no query at ``>= qlo`` can attend."""
        live = live_keys(self.pattern.ir, self.heads, qlo)
        if live is None:
            return
        ps = self.page_size
        pages = self._pages[b]
        for p in range(min(len(pages), qlo // ps)):
            if pages[p] < 0:
                continue
            lo, hi = p * ps, p * ps + ps - 1
            if not any(a <= hi and lo <= z for a, z in live):
                self._free_set.add(pages[p])
                pages[p] = -1

    def view(self):
        """``(k, v, block_table, kv_lengths)`` for ``attention(q, k, v, p, block_table=..., kv_lengths=...)``.

        ``block_table`` is int64 ``[batch, max_pages]`` with ``-1`` for freed (or never held) pages.
        """
        width = max((len(p) for p in self._pages), default=0)
        table = torch.full((self.batch, max(width, 1)), -1, dtype=torch.int64)
        for b, pages in enumerate(self._pages):
            if pages:
                table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int64)
        lengths = torch.tensor(self._lengths, dtype=torch.int64)
        return self.k, self.v, table.to(self.k.device), lengths.to(self.k.device)
