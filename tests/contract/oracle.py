"""Independent oracle for the contract suite: LANGUAGE.md re-derived by hand, in plain numpy/torch loops.

Nothing here imports patterndsl internals or the project's own test helpers; every rule is
written from the contract text (sections 2 and 6), so that a disagreement between this
file and the product points at one of the two reading the contract differently.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def positions(lq: int, lk: int) -> tuple[np.ndarray, np.ndarray]:
    """End-aligned query and key positions as broadcastable grids.

    Args:
        lq, lk: query and key lengths.

    Returns:
        ``(q, k)`` int64 arrays of shapes ``[lq, 1]`` and ``[1, lk]`` with ``q = i + lk - lq``.
    """
    q = np.arange(lq, dtype=np.int64)[:, None] + (lk - lq)
    k = np.arange(lk, dtype=np.int64)[None, :]
    return q, k


def full_like(q, k):
    """The broadcast shape of ``q`` and ``k`` filled with ``True``."""
    return np.broadcast_to(np.ones((), bool), np.broadcast_shapes(q.shape, k.shape)).copy()


# Static primitives, one function per row of the section 2 table, on position arrays.
def causal(q, k):
    """``k <= q``."""
    return k <= q


def window(q, k, before, after=0, dilation=1):
    """``(q - k) % dilation == 0`` and ``q - before*dilation <= k <= q + after*dilation``."""
    return ((q - k) % dilation == 0) & (q - before * dilation <= k) & (k <= q + after * dilation)


def strided(q, k, stride):
    """``(q - k) % stride == 0``."""
    return (q - k) % stride == 0


def blocks(q, k, size):
    """``q // size == k // size``."""
    return q // size == k // size


def summary(q, k, stride, width=1):
    """``k % stride >= stride - width``."""
    return full_like(q, k) & (k % stride >= stride - width)


def sink(q, k, n):
    """``k < n``."""
    return full_like(q, k) & (k < n)


def global_(q, k, n):
    """``q < n`` or ``k < n``."""
    return (q < n) | (k < n)


def landmarks(q, k, every):
    """``k % every == every - 1``."""
    return full_like(q, k) & (k % every == every - 1)


def to_mask(fn, lq: int, lk: int | None = None, heads: int = 1) -> torch.Tensor:
    """Dense ``[heads, lq, lk]`` mask of a rule written as ``fn(q, k, h, Lq, Lk)`` on arrays.

    Args:
        fn: the rule; ``h`` is an int.
        lq, lk, heads: sizes (``lk`` defaults to ``lq``).

    Returns:
        A bool tensor.
    """
    lk = lq if lk is None else lk
    q, k = positions(lq, lk)
    out = np.zeros((heads, lq, lk), bool)
    for h in range(heads):
        out[h] = np.broadcast_to(fn(q, k, h, lq, lk), (lq, lk))
    return torch.from_numpy(out)


# Grids: row-major, last axis fastest.
def coords(pos: np.ndarray, extents: tuple[int, ...]) -> list[np.ndarray]:
    """Grid coordinates of flattened positions.

    Args:
        pos: positions (any shape).
        extents: axis lengths in layout order.

    Returns:
        One array per axis, same shape as ``pos``.
    """
    out = []
    rest = pos
    for n in reversed(extents):
        out.append(rest % n)
        rest = rest // n
    return out[::-1]


def na_axis(x, y, n, s, d=1, r=1, is_causal=False):
    """Section 6 neighborhood rule on one axis, applied elementwise.

    Args:
        x, y: query and key coordinates (broadcastable int arrays).
        n: axis length; s, d, r: size, dilation, stride; is_causal: causal on this axis.

    Returns:
        Bool array: may the query at ``x`` see the key at ``y`` on this axis.
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.int64), np.asarray(y, np.int64))
    g = x % d
    p, t = x // d, y // d
    m = -((g - n) // d)  # ceil((n - g) / d)
    if is_causal:
        lead = np.minimum((p // r) * r + r - 1, m - 1)
        ok = (t <= p) & (lead - t < s)
    else:
        left = s // 2
        right = s // 2 + (s % 2 - 1)
        lead = np.minimum((p // r) * r + r // 2, m - 1)
        c = np.minimum(np.maximum(lead, left), m - 1 - right)
        ok = (c - left <= t) & (t <= c + right)
    return ok & (y % d == g)


def neighborhood_mask(extents, size, dilation=1, stride=1, is_causal=False) -> torch.Tensor:
    """Dense ``[1, L, L]`` neighborhood mask over a grid, axes combined with ``and``.

    Args:
        extents: grid axis lengths; size/dilation/stride/is_causal: int/bool or per-axis tuples.

    Returns:
        A bool tensor with ``L = prod(extents)``.
    """
    nd = len(extents)

    def per_axis(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd

    size, dilation, stride, is_causal = map(per_axis, (size, dilation, stride, is_causal))
    length = math.prod(extents)
    q, k = positions(length, length)
    qc, kc = coords(q, extents), coords(k, extents)
    out = full_like(q, k)
    for a in range(nd):
        out &= na_axis(qc[a], kc[a], extents[a], size[a], dilation[a], stride[a], is_causal[a])
    return torch.from_numpy(out)[None]


# Dynamic primitive: route, from the section 2 text.
def _pool(x: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":
        return x.mean(dim=-2)
    if how == "max":
        return x.max(dim=-2).values
    if how == "last":
        return x[..., -1, :]
    raise ValueError(how)


def route_ids(lq: int, lk: int, block, qblock=None, extents=None) -> tuple[np.ndarray, np.ndarray]:
    """Key block of every key and query group of every query row, as section 2 defines them.

    Args:
        lq, lk: lengths. block, qblock: ints, or per-axis tuples (boxes) when ``extents`` is given.
        extents: grid axis lengths for tuple blocks (row-major over boxes).

    Returns:
        ``(key_block_of_key [lk], group_of_query_row [lq])``.
    """
    qblock = block if qblock is None else qblock
    qpos = np.arange(lq) + (lk - lq)
    kpos = np.arange(lk)
    if extents is None:
        return kpos // block, qpos // qblock

    def box_id(pos, box):
        cs = coords(pos, extents)
        nboxes = [math.ceil(n / b) for n, b in zip(extents, box, strict=True)]
        out = np.zeros_like(pos)
        for c, b, nb in zip(cs, box, nboxes, strict=True):
            out = out * nb + c // b
        return out

    return box_id(kpos, block), box_id(qpos, qblock)


def route_choice(qt, kt, topk, kb_of, qg_of, score="mean", among=None) -> dict:
    """Which key blocks each query group gets.

    Args:
        qt: ``[batch, Hq, Lq, D]`` queries. kt: ``[batch, Hkv, Lk, D]`` keys (``Hkv`` divides ``Hq``).
        topk, score: as in ``route(...)``. kb_of, qg_of: from :func:`route_ids`.
        among: ``[Hq, Lq, Lk]`` dense ``among`` mask (``None`` = full).

    Returns:
        ``{(batch, query_head, group): set_of_key_blocks}``.
    """
    bsz, hq = qt.shape[:2]
    hkv = kt.shape[1]
    rep = hq // hkv
    q64, k64 = qt.double(), kt.double()
    choice = {}
    for b, kvh in itertools.product(range(bsz), range(hkv)):
        heads = range(kvh * rep, (kvh + 1) * rep)
        for a in sorted(set(qg_of.tolist())):
            rows = torch.from_numpy(np.nonzero(qg_of == a)[0])
            scores, cands = [], []
            for kb in sorted(set(kb_of.tolist())):
                cols = torch.from_numpy(np.nonzero(kb_of == kb)[0])
                # GQA heads share one choice, so a block is a candidate when the among
                # pattern of any head of the group allows a pair in it.
                if among is not None and not any(bool(among[h][rows][:, cols].any()) for h in heads):
                    continue
                kpool = _pool(k64[b, kvh, cols], "last" if score == "landmark" else score)
                total = 0.0
                for h in heads:
                    qpool = _pool(q64[b, h, rows], "mean" if score == "landmark" else score)
                    total += float(qpool @ kpool)
                scores.append(total)
                cands.append(kb)
            order = sorted(range(len(cands)), key=lambda i: (-scores[i], cands[i]))
            for h in heads:
                choice[(b, h, a)] = {cands[i] for i in order[:topk]}
    return choice


def route_mask(qt, kt, topk, block, score="mean", among=None, qblock=None, extents=None) -> torch.Tensor:
    """Dense ``[batch, Hq, Lq, Lk]`` mask of ``route(...)`` alone.

    Args:
        qt, kt, topk, score, among: as :func:`route_choice`; block, qblock, extents: as :func:`route_ids`.

    Returns:
        A bool tensor.
    """
    lq, lk = qt.shape[2], kt.shape[2]
    kb_of, qg_of = route_ids(lq, lk, block, qblock, extents)
    choice = route_choice(qt, kt, topk, kb_of, qg_of, score, among)
    out = torch.zeros(qt.shape[0], qt.shape[1], lq, lk, dtype=torch.bool)
    for (b, h, a), chosen in choice.items():
        rows = torch.from_numpy(qg_of == a)
        cols = torch.from_numpy(np.isin(kb_of, sorted(chosen)))
        out[b, h] |= rows[:, None] & cols[None, :]
    return out


# Block plans.
def tile_reduce(mask: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Tile states of a dense mask: 0 none allowed, 2 every existing pair allowed, 1 otherwise.

    Args:
        mask: ``[heads, Lq, Lk]`` bool. bm, bn: tile sizes.

    Returns:
        int8 ``[heads, ceil(Lq/bm), ceil(Lk/bn)]``.
    """
    h, lq, lk = mask.shape
    nq, nk = math.ceil(lq / bm), math.ceil(lk / bn)
    out = torch.zeros(h, nq, nk, dtype=torch.int8)
    for hh, a, b in itertools.product(range(h), range(nq), range(nk)):
        t = mask[hh, a * bm : (a + 1) * bm, b * bn : (b + 1) * bn]
        out[hh, a, b] = 2 if bool(t.all()) else (1 if bool(t.any()) else 0)
    return out


# Attention.
def reference_attention(q, k, v, mask, scale=None):
    """Float64 softmax attention over a dense mask, with the contract's empty-row rule.

    Args:
        q: ``[B, Hq, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; mask: ``[Hq, Lq, Lk]`` or ``[B, Hq, Lq, Lk]``.
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``(out, lse)`` in float64; rows without an allowed key give zeros and ``-inf``.
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    m = mask if mask.dim() == 4 else mask[None]
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.where(m, p, torch.zeros_like(p))
    return p @ v, lse


# Small shared helpers for the contract tests.
def rand_qkv(b=1, hq=2, lq=12, lk=None, d=8, hkv=None, dtype=torch.float32, seed=0, grad=False):
    """Random ``q, k, v`` in the SDPA layout ``[batch, heads, seq, head_dim]``.

    Args:
        b, hq, lq, lk, d, hkv: sizes (``lk`` defaults to ``lq``, ``hkv`` to ``hq``).
        dtype: tensor dtype. seed: generator seed. grad: set ``requires_grad``.

    Returns:
        ``(q, k, v)``.
    """
    lk = lq if lk is None else lk
    hkv = hq if hkv is None else hkv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def expect_pattern_error(fn, *fragments: str, line: int | None = None):
    """Run ``fn`` and check it raises a ``PatternError`` (and nothing else) naming what and where.

    Args:
        fn: zero-argument callable.
        fragments: case-insensitive substrings the message must contain.
        line: when given, the message must name that source line as ``:LINE:``.

    Returns:
        The raised exception.
    """
    import pytest

    from patterndsl import PatternError

    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    assert isinstance(err, PatternError), f"expected a PatternError, got {type(err).__name__}: {err}"
    msg = str(err)
    for frag in fragments:
        assert frag.lower() in msg.lower(), f"{frag!r} not in message: {msg}"
    if line is not None:
        assert f":{line}:" in msg, f"line {line} not named in: {msg}"
    return err
