"""Stage 4 (block plan) for ``within(SEG, P)`` at a call: exact tile states as torch ops on the inputs' device.

Comes in: the segment ids ``SEG`` of every batch element (``[B, Lk]``, any device), the body ``P``,
the sizes and tiles. Goes out: int8 tile states ``[B, nqb, nkb]`` (0 empty, 1 partial, 2 full),
exact, on ``SEG``'s device, never an ``Lq x Lk`` tensor and never a loop over documents.

The body must be built with ``| & ~ -`` from primitives this module knows how to cut
(:func:`cuts_of`: ``full``, ``empty``, ``causal``, undilated ``window``, ``sink``, ``global``,
``blocks``); other bodies return None from :func:`cuts_of` and are planned by
:mod:`patterndsl.analysis.inputplan`'s host path.

How (cost ``O(B * Lk + boxes)``, boxes at most ``B * (nqb * nkb + Lk)``):

* runs: where ``SEG`` changes, their starts (``nonzero``) and ends; a run never crosses a
  batch element (the rows are laid end to end and each row starts a run);
* boxes: every run meets a rectangle of query tiles by key tiles (their counts from the run's
  ends: no search); each (run, query tile, key tile) is one box ``[qa, qb] x [ka, kb]`` in the
  run's own coordinates;
* each box is classified exactly without element-wise work: its sides are cut where a
  threshold (``sink(n)``: ``k = n``; ``global(n)``: ``q = n``, ``k = n``) or a block edge
  (``blocks(s)``) falls inside it, so on every sub-box those primitives are constant and what is
  left (the bands: ``causal``, ``window``) depends only on the diagonal ``d = q - k``. A sub-box
  holds every diagonal of ``[qa - kb, qb - ka]``, so evaluating ``P`` (the reference
  :func:`patterndsl.semantics.evaluate_local`) at one point of the sub-box on each stretch of
  diagonals where no band changes (its first diagonal and every band end inside) decides the
  sub-box exactly: empty when no point is allowed, full when all are;
* a tile is partial when a non-empty box meets it, full when its one box covers it and is full.

Host synchronisation: with ``static=True`` (what a CUDA call uses) every size is a static upper
bound (``nonzero_static``, capacity-sized expansions), so nothing reads a device value on the
host; with ``static=False`` (CPU: reading a size costs nothing) the sizes are exact, so the work
is proportional to the boxes there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl import ir, primitives, semantics
from patterndsl.analysis.plan import EMPTY, FULL, PARTIAL
from patterndsl.primitives.common import BIG

#: Boxes classified per chunk (bounds the memory of the evaluation points).
CHUNK_BOXES = 1 << 16
#: Most evaluation points per box (sub-boxes x diagonal stretches); larger bodies use the host path.
MAX_POINTS = 256


@dataclass(frozen=True)
class Cuts:
    """Where a body's primitives change inside a segment.

    Attributes:
        q: query positions (segment coordinates) where a threshold starts a new sub-range.
        k: the same for keys.
        blocks: block sizes (both sides are cut at their multiples).
        diagonals: diagonals ``d = q - k`` at which some band's truth changes (its ``lo`` and ``hi + 1``).
    """

    q: tuple[int, ...]
    k: tuple[int, ...]
    blocks: tuple[int, ...]
    diagonals: tuple[int, ...]

    def sides(self, bm: int, bn: int) -> tuple[int, int]:
        """Static bounds on the sub-ranges of a box side at most ``bm`` (queries) / ``bn`` (keys) long."""
        nq = 1 + len(self.q) + sum((bm - 1) // s + 1 for s in self.blocks)
        nk = 1 + len(self.k) + sum((bn - 1) // s + 1 for s in self.blocks)
        return nq, nk

    def points(self, bm: int, bn: int) -> int:
        nq, nk = self.sides(bm, bn)
        return nq * nk * (1 + len(self.diagonals))


def cuts_of(body: ir.Node) -> Cuts | None:
    """The cuts of ``body``, or None when a primitive in it is not one this module can cut."""
    q, k, blocks, diagonals = set(), set(), set(), set()
    for node in ir.walk(body):
        if not isinstance(node, ir.Prim):
            continue
        name = node.name
        if name in ("full", "empty"):
            continue
        if name == "sink":
            k.add(node.arg("n"))
        elif name == "global":
            q.add(node.arg("n"))
            k.add(node.arg("n"))
        elif name == "blocks":
            blocks.add(node.arg("size"))
        elif name in ("causal", "window"):
            lo, hi, mod = primitives.lookup(name).band(node, None)
            if mod != 1:
                return None
            diagonals.update(d for d in (lo, hi + 1) if -BIG < d < BIG)
        else:
            return None
    return Cuts(tuple(sorted(q)), tuple(sorted(k)), tuple(sorted(blocks)), tuple(sorted(diagonals)))


def supported(body: ir.Node, block: tuple[int, int]) -> bool:
    """Whether :func:`within_states` plans ``within(SEG, body)`` at tiles ``block``."""
    cuts = cuts_of(body)
    return cuts is not None and cuts.points(*block) <= MAX_POINTS


def within_states(
    seg: torch.Tensor,
    body: ir.Node,
    q_len: int,
    block: tuple[int, int],
    head: int = 0,
    static: bool = False,
    work: dict | None = None,
) -> torch.Tensor:
    """Exact tile states of ``within(SEG, body)`` for every batch element.

    Args:
        seg: ``[B, Lk]`` integer segment ids (any device).
        body: the pattern inside (:func:`supported`).
        q_len: ``Lq`` (queries are end-aligned: query ``i`` is at position ``i + Lk - Lq``).
        block: ``(BM, BN)``.
        head: the head the body is evaluated for.
        static: sizes from static upper bounds only (no host synchronisation), else exact sizes.
        work: when given (and not ``static``), ``work["boxes"]`` grows by the boxes classified.

    Returns:
        int8 ``[B, nqb, nkb]`` on ``seg``'s device.
    """
    cuts = cuts_of(body)
    assert cuts is not None, "within_states needs a body cuts_of accepts"
    dev = seg.device
    count, kv_len = seg.shape
    bm, bn = block
    nqb, nkb = -(-q_len // bm), -(-kv_len // bn)
    off = kv_len - q_len
    total = count * kv_len
    # Runs: starts where the value changes or a row begins; row-local start/end, row, length.
    flat = seg.reshape(-1)
    change = torch.ones(total, dtype=torch.bool, device=dev)
    if total > 1:
        torch.ne(flat[1:], flat[:-1], out=change[1:])
    change.view(count, kv_len)[:, 0] = True
    gstart = _compact(change, total, static)
    valid_run = gstart >= 0
    gstart = gstart.clamp(min=0)
    # A run ends where the next one starts (padding, when static, comes after every real run).
    follows = torch.cat([valid_run[1:], torch.zeros(1, dtype=torch.bool, device=dev)])
    gend = torch.where(follows, torch.roll(gstart, -1), total)
    row = torch.div(gstart, kv_len, rounding_mode="floor")
    s = gstart - row * kv_len
    e = torch.minimum(gend - row * kv_len, torch.full_like(gend, kv_len))
    length = e - s
    # Query tiles [qlo_t, qhi_t] of the run (the row's first run also owns positions below 0).
    q_first = torch.where(s == 0, 0, torch.div((s - off).clamp(min=0), bm, rounding_mode="floor"))
    q_last = torch.div(e - 1 - off, bm, rounding_mode="floor")
    qn = (q_last - q_first + 1).clamp(min=0)
    k_first = torch.div(s, bn, rounding_mode="floor")
    kn = torch.div(e - 1, bn, rounding_mode="floor") - k_first + 1
    per_run = torch.where(valid_run, qn * kn, 0)
    cap = count * (nqb * nkb + kv_len)
    run, inner, live = _expand(per_run, cap, static)
    if work is not None and not static:
        work["boxes"] = work.get("boxes", 0) + len(run)
    kr = kn[run].clamp(min=1)
    m = q_first[run] + torch.div(inner, kr, rounding_mode="floor")
    n = k_first[run] + inner % kr
    rs, re = s[run], e[run]
    qlo = m * bm + off
    qa = torch.where(rs == 0, qlo, torch.maximum(qlo, rs)) - rs
    qb = torch.minimum(qlo + bm - 1, re - 1) - rs
    klo = n * bn
    ka = torch.maximum(klo, rs) - rs
    kb = torch.minimum(klo + bn - 1, re - 1) - rs
    state = _classify(body, cuts, (qa, qb, ka, kb, length[run]), block, head)
    # Full only when the box is its tile's only box (covers it all) and full.
    rows = torch.clamp(q_len - m * bm, max=bm)
    cols = torch.clamp(kv_len - n * bn, max=bn)
    covers = (qb - qa + 1) * (kb - ka + 1) == rows * cols
    cell = (row[run] * nqb + m) * nkb + n
    dummy = count * nqb * nkb
    out = torch.zeros(dummy + 1, dtype=torch.int8, device=dev)
    out[torch.where(live & (state > EMPTY), cell, dummy)] = PARTIAL
    out[torch.where(live & (state == FULL) & covers, cell, dummy)] = FULL
    return out[:dummy].view(count, nqb, nkb)


def classify(body: ir.Node, box, width: tuple[int, int], head: int = 0) -> torch.Tensor:
    """Exact int8 states of ``body`` on boxes ``(qa, qb, ka, kb, length)`` in segment coordinates.

    Args:
        body: a pattern :func:`cuts_of` accepts.
        box: int64 tensors; each box at most ``width`` ``(queries, keys)`` long (block cuts are
            counted from it: a body with ``blocks`` needs a small width).
        width: the longest box sides.
        head: the head the body is evaluated for.
    """
    cuts = cuts_of(body)
    assert cuts is not None, "classify needs a body cuts_of accepts"
    return _classify(body, cuts, box, width, head)


def _compact(mask: torch.Tensor, cap: int, static: bool) -> torch.Tensor:
    """Indices of ``mask``'s true entries: exactly that many, or ``cap`` entries padded with -1."""
    if static:
        return torch.nonzero_static(mask, size=cap, fill_value=-1).reshape(-1)
    return torch.nonzero(mask).reshape(-1)


def _expand(counts: torch.Tensor, cap: int, static: bool):
    """``(owner, inner, live)``: ``owner`` repeats ``i`` ``counts[i]`` times, ``inner`` counts ``0..counts[i]-1``.

    With ``static`` the result has ``cap`` entries (``live`` marks the real ones); else exactly
    ``counts.sum()``.
    """
    ends = counts.cumsum(0)
    size = cap if static else int(ends[-1]) if len(ends) else 0
    idx = torch.arange(size, device=counts.device)
    owner = torch.searchsorted(ends, idx, right=True).clamp(max=max(len(counts) - 1, 0))
    inner = idx - (ends - counts)[owner]
    live = idx < ends[-1] if len(ends) else torch.zeros(size, dtype=torch.bool, device=counts.device)
    return owner, inner, live


def _sides(a: torch.Tensor, b: torch.Tensor, thresholds: tuple[int, ...], blocks: tuple[int, ...], width: int):
    """Sub-ranges of ``[a, b]`` cut at ``thresholds`` and block multiples.

    Returns ``(first, last)``, each ``[N, C]``; unused ones have ``first > last``.
    """
    cand = [a[:, None]]
    if thresholds:
        cand.append(torch.tensor(thresholds, dtype=a.dtype, device=a.device).expand(len(a), -1))
    for size in blocks:
        steps = torch.arange(1, (width - 1) // size + 2, dtype=a.dtype, device=a.device)
        cand.append((torch.div(a, size, rounding_mode="floor")[:, None] + steps) * size)
    starts = torch.cat(cand, 1)
    inside = (starts > a[:, None]) & (starts <= b[:, None])
    inside[:, 0] = True
    starts = torch.where(inside, starts, b[:, None] + 1).sort(1).values
    last = torch.cat([starts[:, 1:], b[:, None] + 1], 1) - 1
    return starts, last


def _classify(body: ir.Node, cuts: Cuts, box, block, head: int) -> torch.Tensor:
    """int8 exact states of ``body`` on boxes ``(qa, qb, ka, kb, length)`` in segment coordinates."""
    qa, qb, ka, kb, length = box
    out = torch.empty(len(qa), dtype=torch.int8, device=qa.device)
    diag = torch.tensor(cuts.diagonals, dtype=qa.dtype, device=qa.device)
    for lo in range(0, len(qa), CHUNK_BOXES):
        sl = slice(lo, lo + CHUNK_BOXES)
        qf, ql = _sides(qa[sl], qb[sl], cuts.q, cuts.blocks, block[0])
        kf, kl = _sides(ka[sl], kb[sl], cuts.k, cuts.blocks, block[1])
        qf, ql = qf[:, :, None, None], ql[:, :, None, None]
        kf, kl = kf[:, None, :, None], kl[:, None, :, None]
        dlo, dhi = qf - kl, ql - kf
        # Points: the first diagonal of each sub-box and every band end inside its diagonals.
        ends = diag.expand(*dlo.shape[:-1], len(diag))
        d = torch.cat([dlo, ends], -1)
        inside = torch.cat([torch.ones_like(dlo, dtype=torch.bool), (ends > dlo) & (ends <= dhi)], -1)
        valid = (qf <= ql) & (kf <= kl) & inside
        # A point of the sub-box on diagonal d: the key as far left as the queries allow.
        k = torch.minimum(torch.maximum(qf - d, kf), kl)
        q = k + d
        allowed = semantics.evaluate_local(body, q, k, head, length[sl, None, None, None])
        nonempty = (allowed & valid).flatten(1).any(1)
        full = (allowed | ~valid).flatten(1).all(1)
        out[sl] = nonempty.to(torch.int8) + (full & nonempty).to(torch.int8)
    return out
