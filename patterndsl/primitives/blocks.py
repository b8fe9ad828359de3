"""The block primitives ``blocks`` and ``random``: every rule of each, for every stage.

Comes in: nothing at import but the registry. Goes out: two registered
records. ``random``'s generator is documented and defined in
:mod:`patterndsl.semantics` (:func:`~patterndsl.semantics.random_blocks`,
:func:`~patterndsl.semantics.random_table`); every rule here reads its table.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from patterndsl import semantics as sem
from patterndsl.primitives.common import fdiv, param, require
from patterndsl.primitives.rectcount import PointCounter
from patterndsl.primitives.registry import Primitive, register

# --------------------------------------------------------------------------- blocks(size)


def _blocks_classify(prim, qp, kp, env):
    size = prim.arg("size")
    # A progression whose step is at most ``size`` meets every block between its ends.
    ok = qp.isap & kp.isap & ((qp.fn == 1) | (qp.fs <= size)) & ((kp.fn == 1) | (kp.fs <= size))
    qb0, qb1 = fdiv(qp.fmin, size), fdiv(qp.fmax, size)
    kb0, kb1 = fdiv(kp.fmin, size), fdiv(kp.fmax, size)
    nonempty = (np.maximum(qb0, kb0) <= np.minimum(qb1, kb1)) & ok
    full = (qb0 == qb1) & (kb0 == kb1) & (qb0 == kb0)
    return nonempty | ~ok, full, ok


def _blocks_keys(prim, qlo, qhi, qalo, qahi, env):
    size = prim.arg("size")
    return fdiv(qlo, size) * size, fdiv(qhi, size) * size + size - 1, None, None


def _blocks_total(prim, q_len, kv_len, layout, env):
    # Queries q <= Lk - 1: a negative one sees no key, the others their whole block but the
    # last block (start last) which ends at Lk - 1.
    size = prim.arg("size")
    first, last = max(kv_len - q_len, 0), (kv_len - 1) // size * size
    return size * max(0, last - first) + (kv_len - last) * max(0, kv_len - max(first, last))


def _blocks_triton(r, p) -> str:
    size = p.arg("size")
    return f"{r.fdiv('q', str(size), r.q_nonneg)} == k // {size}"


BLOCKS = register(
    Primitive(
        "blocks",
        params=(param("size", "int"),),
        check=lambda v, s, layout: require(v["size"] >= 1, f"blocks size must be >= 1, got {v['size']}", s["size"]),
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: (
            torch.div(q, prim.arg("size"), rounding_mode="floor")
            == torch.div(k, prim.arg("size"), rounding_mode="floor")
        ),
        classify=_blocks_classify,
        needed_keys=_blocks_keys,
        candidates=None,
        cost=1,
        band=None,
        total=_blocks_total,
        count=None,  # by evaluation
        triton=_blocks_triton,
    )
)


# --------------------------------------------------------------------------- random(blocks, block, seed)


def _random_check(v, s, layout):
    require(v["blocks"] >= 0, f"random blocks must be >= 0, got {v['blocks']}", s["blocks"])
    require(v["block"] >= 1, f"random block must be >= 1, got {v['block']}", s["block"])


def _random_meaning(prim, q, k, h, ctx, selection) -> torch.Tensor:
    count, block, seed = prim.arg("blocks"), prim.arg("block"), prim.arg("seed")
    n_key_blocks = -(-ctx.kv_len // block)
    qb_lo = ctx.offset // block
    qb_hi = (ctx.kv_len - 1) // block + 1
    allowed = sem._random_allowed(seed, qb_lo, qb_hi, n_key_blocks, count).to(q.device)
    qb = torch.div(q, block, rounding_mode="floor") - qb_lo
    kb = torch.div(k, block, rounding_mode="floor")
    # Indices outside [0, Lq) x [0, Lk) are not part of the pattern; clamp for safe indexing.
    # Both sides stay unbroadcast until the lookup, which is what keeps [BM, 1] x [1, BN] cheap.
    inside = ((qb >= 0) & (qb < allowed.shape[0])) & ((kb >= 0) & (kb < n_key_blocks))
    return allowed[qb.clamp(0, allowed.shape[0] - 1), kb.clamp(0, max(n_key_blocks - 1, 0))] & inside


def _random_classify(prim, qp, kp, env):
    size = prim.arg("block")
    counter = _drawn_counter(prim.arg("seed"), prim.arg("blocks"), size, env.q_len, env.kv_len)
    qb_lo = env.offset // size
    ok = qp.isap & kp.isap & ((qp.fn == 1) | (qp.fs == 1)) & ((kp.fn == 1) | (kp.fs == 1))
    qb0, qb1 = fdiv(qp.fmin, size), fdiv(qp.fmax, size)
    kb0, kb1 = fdiv(kp.fmin, size), fdiv(kp.fmax, size)
    qb0, qb1, kb0, kb1 = np.broadcast_arrays(qb0, qb1, kb0, kb1)
    hits = counter.count(qb0 - qb_lo, qb1 - qb_lo, kb0, kb1)
    want = (qb1 - qb0 + 1) * (kb1 - kb0 + 1)
    return (hits > 0) | ~ok, (hits == want) & ok, ok


def random_pairs(prim, env) -> np.ndarray:
    """Sorted flattened ``(query block - first) * n_key_blocks + key block`` of every drawn pair (do not modify)."""
    return _drawn_pairs(prim.arg("seed"), prim.arg("blocks"), prim.arg("block"), env.q_len, env.kv_len)


@functools.lru_cache(maxsize=64)
def _drawn_pairs(seed: int, count: int, size: int, q_len: int, kv_len: int) -> np.ndarray:
    # Cached because every chunk of tile pairs and every head asks again; a pure function of its arguments.
    nkb = -(-kv_len // size)
    qb_lo = (kv_len - q_len) // size
    qb_hi = (kv_len - 1) // size + 1
    tab = sem.random_table(seed, range(qb_lo, qb_hi), nkb, count).numpy()
    rows = np.arange(qb_hi - qb_lo, dtype=np.int64)[:, None]
    pairs = np.sort((rows * nkb + tab).reshape(-1))
    pairs.flags.writeable = False
    return pairs


@functools.lru_cache(maxsize=16)
def _drawn_counter(seed: int, count: int, size: int, q_len: int, kv_len: int) -> PointCounter:
    # The drawn blocks as points (query block - first, key block), counted in the tiles' rectangles.
    nkb = -(-kv_len // size)
    pairs = _drawn_pairs(seed, count, size, q_len, kv_len)
    rows = (kv_len - 1) // size + 1 - (kv_len - q_len) // size
    return PointCounter((pairs % nkb).reshape(rows, max(0, min(count, nkb))), nkb)


def _random_candidates(engine, prim) -> np.ndarray | None:
    # The drawn blocks are few: on the identity order, list the tiles they meet directly.
    if not (engine.q.identity and engine.k.identity):
        return None
    size = prim.arg("block")
    table = random_pairs(prim, engine.env)
    nkblocks = -(-engine.env.kv_len // size)
    qb_lo = engine.env.offset // size
    qb = table // nkblocks + qb_lo
    kb = table % nkblocks
    off, bm, bn = engine.env.offset, engine.q.block, engine.k.block
    # query indices of the block: [qb*size - off, qb*size + size - 1 - off] clipped.
    i0 = np.clip(qb * size - off, 0, engine.env.q_len - 1)
    i1 = np.clip(qb * size + size - 1 - off, 0, engine.env.q_len - 1)
    j0 = kb * size
    j1 = np.minimum(kb * size + size - 1, engine.env.kv_len - 1)
    m0, m1 = i0 // bm, i1 // bm
    n0, n1 = j0 // bn, j1 // bn
    parts = []
    for dm in range(int((m1 - m0).max()) + 1 if len(m0) else 0):
        for dn in range(int((n1 - n0).max()) + 1):
            live = (m0 + dm <= m1) & (n0 + dn <= n1)
            parts.append(((m0 + dm) * engine.nkb + n0 + dn)[live])
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _random_triton(r, p) -> str:
    count, block, seed = p.arg("blocks"), p.arg("block"), p.arg("seed")
    n_key_blocks = -(-r.kv_len // block)
    qb_lo = (r.kv_len - r.q_len) // block
    qb_hi = (r.kv_len - 1) // block + 1
    chosen = sem.random_table(seed, range(qb_lo, qb_hi), n_key_blocks, count)
    table = torch.zeros(qb_hi - qb_lo, n_key_blocks, dtype=torch.int8)
    if chosen.numel():
        table.scatter_(1, chosen, 1)
    offset = r.aux.add(table)
    qb = r.fdiv("q", str(block), r.q_nonneg)
    index = f"{offset} + ({qb} - ({qb_lo})) * {n_key_blocks} + k // {block}"
    # ``inb`` keeps padded rows and columns inside the table.
    return r.bind("rnd", f"tl.load(AUX + ({index}), mask=inb, other=0) != 0")


RANDOM = register(
    Primitive(
        "random",
        params=(param("blocks", "int"), param("block", "int"), param("seed", "int", 0)),
        check=_random_check,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=_random_meaning,
        classify=_random_classify,
        needed_keys=None,
        candidates=_random_candidates,
        cost=2,
        band=None,
        total=None,  # counted tile by tile
        count=None,  # by evaluation
        triton=_random_triton,
    )
)
