"""Runtime stage: reading a paged key/value cache on the CPU without copying it (LANGUAGE.md section 9, issue 14).

Comes in: the ragged executor's row tile (:class:`patterndsl.runtime.ragged.Tile`), the element's block table
row and the pages ``[pages, kv_heads, page_size, head_dim]``. Goes out: ``(o, lse)`` of the tile, or the
tile's keys and values gathered as ``[kv_heads, n, head_dim]``.

Why: a decoding step reads every key its rows reach once; gathering those keys into a contiguous buffer
first (then transposing the pages' head dimension out of the way) read and wrote them twice more, which made
paged calls 3-5x SDPA's. Two ways around it:

- a tile whose keys lie on a few runs of *consecutive* physical pages (what a
  :class:`~patterndsl.PagedKVCache` holds for a sequence appended alone, a shared prompt's pages then the
  element's own, any cache laid out in order) reads them in place, run by run: the pages of a run are one
  matrix ``[pages * kv_heads * page_size, head_dim]`` whose rows interleave the key-value heads page by
  page, so one matrix product of every query head with every row gives the scores, of which each head
  keeps its own key-value head's rows (a strided view), and the output is one product of the
  probabilities, zero outside each head's own rows, with the value rows: the cache is read once, as SDPA
  reads it, at ``kv_heads`` times the (small, at few rows) multiply count; a float32 tile on one such run
  (a decoding step over pages in order) runs the same product in torch's fused flash kernel, under an
  additive mask kept on the tile that keeps each head's own rows;
- otherwise the positions are gathered by one ``index_select`` of rows of the flattened pages.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict

import torch

from patterndsl.runtime.cpu.tuning import FLASH

#: Query rows per key-value head up to which the in-place product is used (decoding steps and short chunks).
MAX_ROWS = 64
#: Runs of consecutive physical pages per row tile up to which the tile is read in place.
MAX_PIECES = 16
#: Elements up to which the fused path's mask is kept on its tile (past it, about 128K keys of 8 query heads over
#: 2 key-value heads, it is built per call: the tile lists of recent calls stay small).
MAX_KEPT_MASK = 1 << 20
#: Block tables whose pages were found within the cache, per table tensor (every layer of a model's decoding
#: step passes the same table at the same lengths): the check is skipped while the table is unchanged.
MAX_CHECKED = 16
_CHECKED: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def _checked_key(table: torch.Tensor, n_pages: int, ps: int) -> tuple:
    # ``_version`` counts the in-place writes through torch to the tensor and every view of it.
    return (table._version, tuple(table.shape), n_pages, ps)


def checked(table: torch.Tensor, n_pages: int, ps: int, kv_lengths) -> bool:
    """Whether :func:`remember` saw this very table tensor, unchanged since, with the same cache and lengths.

    Unchanged means the same version *and* the same values as the copy kept then: a write through memory the
    tensor shares (``table.numpy()``, DLPack, ``data_ptr``) does not count as a version, and a page out of the
    cache must never be read, so the values are compared too (one ``torch.equal`` over the small table, far
    cheaper than the check it skips).
    """
    with _LOCK:
        got = _CHECKED.get(id(table))
    return (
        got is not None
        and got[0]() is table
        and got[1] == _checked_key(table, n_pages, ps)
        and (got[3] is None or got[3] == tuple(kv_lengths))
        and torch.equal(got[2], table)
    )


def remember(table: torch.Tensor, n_pages: int, ps: int, kv_lengths) -> None:
    """Note that ``table``'s pages reached by ``kv_lengths`` (None: every entry, so any lengths) lie within a cache
    of ``n_pages`` pages of ``ps``."""
    if table.is_inference():
        return  # inference tensors keep no version counter
    lengths = None if kv_lengths is None else tuple(kv_lengths)
    with _LOCK:
        _CHECKED[id(table)] = (weakref.ref(table), _checked_key(table, n_pages, ps), table.clone(), lengths)
        _CHECKED.move_to_end(id(table))
        while len(_CHECKED) > MAX_CHECKED:
            _CHECKED.popitem(last=False)


def finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, by one sum (a NaN or infinity makes it non-finite; a finite sum
    that overflows only says False where True was due, which sends the caller down its exact path)."""
    return math.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item())


def flat_rows(k: torch.Tensor, pages: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor | None:
    """Rows of ``k`` (contiguous ``[pages, kv_heads, page_size, head_dim]``) at ``(pages, offsets)`` per key-value
    head as one ``index_select``: ``[kv_heads, n, head_dim]``, or None when ``k`` is not contiguous."""
    if not k.is_contiguous():
        return None
    hkv, ps, dim = k.shape[1], k.shape[2], k.shape[3]
    rows = ((pages * (hkv * ps) + offsets)[None, :] + (torch.arange(hkv) * ps)[:, None]).flatten()
    return k.view(-1, dim).index_select(0, rows).view(hkv, -1, dim)


def _pieces(table_row: torch.Tensor, runs, ps: int):
    """The tile's key runs as pieces over consecutive physical pages: ``[(first page, pages, offset, keys)]`` in
    key order (``offset`` into the piece's first page), or None past :data:`MAX_PIECES` or at a missing page."""
    out = []
    for a, z in runs:
        p0, p1 = a // ps, (z - 1) // ps + 1
        phys = table_row[p0:p1].tolist()
        if min(phys) < 0:
            return None
        if phys == list(range(phys[0], phys[0] + len(phys))):
            out.append((phys[0], len(phys), a - p0 * ps, z - a))  # one run of consecutive pages (the usual case)
            if len(out) > MAX_PIECES:
                return None
            continue
        start = 0
        for i in range(1, len(phys) + 1):
            if i < len(phys) and phys[i] == phys[i - 1] + 1:
                continue
            lo, hi = max(a, (p0 + start) * ps), min(z, (p0 + i) * ps)
            out.append((phys[start], i - start, lo - (p0 + start) * ps, hi - lo))
            start = i
            if len(out) > MAX_PIECES:
                return None
    return out


def in_place(gr, q, b: int, k, v, table_row: torch.Tensor, tile, scale: float, dt):
    """``(o [heads, n, D], lse [heads, n])`` of a row tile whose keys lie on a few runs of consecutive physical
    pages, read in place; None when the operands do not allow it, the pages are too scattered (the caller
    gathers), or the result is not finite (a non-finite value of another head's rows may meet a zero weight:
    the gathering path decides)."""
    if not tile.runs or not gr.all or k.dtype != dt or v.dtype != dt:
        return None
    if not (k.is_contiguous() and v.is_contiguous()) or k.shape[3] != v.shape[3]:
        return None
    hkv, ps, dim = k.shape[1], k.shape[2], k.shape[3]
    n_rows = (tile.i1 - tile.i0) * gr.share
    if n_rows > MAX_ROWS:
        return None
    pieces = _pieces(table_row, tile.runs, ps)
    if pieces is None:
        return None
    if FLASH is not None and dt == torch.float32 and len(pieces) == 1:
        if q.shape[0] == 1 and q.dtype == dt and q.is_contiguous() and (tile.i0, tile.i1) == (0, q.shape[2]):
            qr = q.view(hkv * n_rows, dim)  # a decoding step: every row of the call, heads ordered by kv head
        else:
            qr = gr.rows(q, b, tile.i0, tile.i1, dt).reshape(hkv * n_rows, dim)
        return _fused(gr, qr, k, v, tile, pieces[0], scale)
    qr = gr.rows(q, b, tile.i0, tile.i1, dt).reshape(hkv * n_rows, dim)  # heads ordered by kv head
    qr = qr * scale
    parts = []
    for first, count, off, length in pieces:
        # The pages are one matrix [count * hkv * ps, D] of rows interleaving the kv heads page by page.
        s_all = torch.matmul(qr, k[first : first + count].view(-1, dim).T).view(hkv, n_rows, count, hkv, ps)
        # Each query head keeps its own kv head's rows: [hkv, rows, pages, ps] -> [hkv, rows, keys].
        s = s_all.diagonal(dim1=0, dim2=3).permute(3, 0, 1, 2).reshape(hkv, n_rows, count * ps)
        parts.append(s[:, :, off : off + length])
    s = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    if tile.allowed is not None:
        allowed = tile.allowed.expand(len(gr.heads), *tile.allowed.shape[1:]).reshape(hkv, n_rows, -1)
        s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = (s - m).exp_()
    den = p.sum(-1, keepdim=True)
    o = None
    at = 0
    for first, count, off, length in pieces:
        # full[h, r, page, c, j]: row r's weight of kv head c's key j of the page (zero unless c == h).
        full = torch.zeros(hkv, n_rows, count, hkv, ps, dtype=dt)
        padded = torch.nn.functional.pad(p[:, :, at : at + length], (off, count * ps - off - length))
        full.diagonal(dim1=0, dim2=3).copy_(padded.view(hkv, n_rows, count, ps).permute(1, 2, 3, 0))
        got = torch.matmul(full.view(hkv * n_rows, -1), v[first : first + count].view(-1, dim))
        o = got if o is None else o.add_(got)
        at += length
    if not finite(o):
        return None
    o = o.view(hkv, n_rows, dim) / den.clamp(min=torch.finfo(dt).tiny)
    n = tile.i1 - tile.i0
    return o.view(len(gr.heads), n, dim), (m + den.log()).view(len(gr.heads), n)


def _bias(gr, tile, piece, hkv: int, ps: int) -> torch.Tensor:
    """The additive mask ``[1, 1, hkv * rows, count * hkv * ps]`` of a one-piece tile read by the fused kernel:
    each query row keeps its own key-value head's rows of the piece's pages, inside the piece's keys, where the
    tile allows them. Kept on the tile per piece shape (it does not depend on which physical pages)."""
    _, count, off, length = piece
    key = ("paged", count, off, length, hkv, ps, gr.share)
    got = tile._biases.get(key)
    if got is None:
        n = tile.i1 - tile.i0
        n_rows = n * gr.share
        if tile.allowed is None:
            keep = torch.ones(hkv, n_rows, length, dtype=torch.bool)
        else:
            keep = tile.allowed.expand(len(gr.heads), n, length).reshape(hkv, n_rows, length)
        keep = torch.nn.functional.pad(keep, (off, count * ps - off - length))
        full = torch.zeros(hkv, n_rows, count, hkv, ps, dtype=torch.bool)
        full.diagonal(dim1=0, dim2=3).copy_(keep.view(hkv, n_rows, count, ps).permute(1, 2, 3, 0))
        got = torch.zeros(1, 1, hkv * n_rows, count * hkv * ps).masked_fill_(
            ~full.view(1, 1, hkv * n_rows, -1), float("-inf")
        )
        if got.numel() <= MAX_KEPT_MASK:
            tile._biases[key] = got
    return got


def _fused(gr, qr, k, v, tile, piece, scale: float):
    """``(o, lse)`` of a one-piece tile by torch's fused CPU flash kernel over the piece's pages as one matrix of
    rows interleaving the key-value heads (:func:`_bias` keeps each head's own), or None when not finite."""
    first, count = piece[0], piece[1]
    hkv, ps, dim = k.shape[1], k.shape[2], k.shape[3]
    n = tile.i1 - tile.i0
    rows = hkv * ps
    kk = k.view(1, 1, -1, dim)[:, :, first * rows : (first + count) * rows]
    vv = v.view(1, 1, -1, dim)[:, :, first * rows : (first + count) * rows]
    o, lse = FLASH(qr.view(1, 1, -1, dim), kk, vv, 0.0, False, attn_mask=_bias(gr, tile, piece, hkv, ps), scale=scale)
    if not finite(o):
        return None
    lse = lse.view(len(gr.heads), n)
    if tile.empty is not None:
        # The kernel reports lse = 0 for rows with no allowed key; the contract says -inf.
        lse = lse.masked_fill(tile.empty.expand(len(gr.heads), n), float("-inf"))
    return o.view(len(gr.heads), n, dim), lse
