"""Context parallelism, execution: attention over a sequence sharded across a process group.

Comes in: each rank's shard of Q, K, V (the tokens ``layout.indices(rank)``), the pattern, the
layout and the run-time inputs (whole, on every rank). Goes out: the rank's shard of the output
and log-sum-exp, differentiable through Q, K, V and the log-sum-exp.

Every rank computes the same :class:`Exchange` from the plan's runs
(:mod:`patterndsl.distributed.traffic`): which of its key tiles each peer reads (sent) and
which tiles of each peer it reads (received); nothing else moves, and the byte counts are
those :func:`patterndsl.distributed.cost` predicts. The forward posts the point-to-point
transfers, computes its queries against its own needed keys meanwhile, then against the
received ones, and merges the two parts by log-sum-exp. The backward recomputes the scores
per chunk of query tiles (as flash attention does), returns the dK/dV of received keys to their
owners (posted before the local part is computed) and adds what the peers return for its own
keys. Element masks are the pattern's meaning (:func:`patterndsl.semantics.evaluate`) at global
positions, so the result equals single-process attention.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from patterndsl import semantics
from patterndsl.distributed import costs, traffic
from patterndsl.distributed.layout import Layout
from patterndsl.errors import PatternError, PatternTypeError, PatternValueError
from patterndsl.sizes import Sizes

#: Score elements (batch x heads x rows x keys) one chunk of query tiles computes at once.
CHUNK_ELEMENTS = 1 << 23

_LOCK = threading.Lock()
_CACHE: OrderedDict = OrderedDict()
_LAST = threading.local()


def last_traffic() -> dict:
    """Bytes this process received in its last distributed forward and backward (``bytes_received``,
    ``bytes_received_backward``), as measured on the buffers it received."""
    return dict(getattr(_LAST, "stats", {"bytes_received": 0, "bytes_received_backward": 0}))


def _record(key: str, value: int) -> None:
    stats = getattr(_LAST, "stats", None)
    if stats is None:
        stats = _LAST.stats = {"bytes_received": 0, "bytes_received_backward": 0}
    stats[key] = value


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows ``a..b`` of the shard and the keys they read, in the local and remote buffers."""

    a: int
    b: int
    local: torch.Tensor
    remote: torch.Tensor


@dataclass(frozen=True)
class Exchange:
    """What one rank sends, receives and computes (the same on every rank for one call's sizes).

    Attributes:
        positions: int64 global positions of this rank's tokens (its queries and keys).
        send: ``{peer: int64 indices into this rank's shard}`` of the keys the peer reads.
        recv: ``{peer: token count}`` received from the peer, in increasing peer order.
        local_keys: int64 indices into the shard of the keys this rank reads itself.
        remote_positions: int64 global positions of the received keys, peers in increasing order.
        chunks: the query chunks with their key indices.
    """

    positions: torch.Tensor
    send: dict
    recv: dict
    local_keys: torch.Tensor
    remote_positions: torch.Tensor
    chunks: tuple[Chunk, ...]


def _tile_positions(lo: np.ndarray, hi: np.ndarray, block: int, seq_len: int) -> np.ndarray:
    """Global positions of key tiles ``lo[i] <= n < hi[i]`` in order."""
    tiles = traffic._ranges(lo, hi)
    pos = (tiles[:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return pos[pos < seq_len]


def build_exchange(vis: traffic.Visits, layout, rank: int, rows_per_key: int) -> Exchange:
    """The :class:`Exchange` of ``rank`` (``rows_per_key``: batch x heads, to size the chunks)."""
    block, seq_len = layout.block, layout.seq_len
    positions = layout.indices(rank).numpy()
    mine = traffic.needs(vis, layout, rank)
    owner, plo, phi = mine.pieces
    recv, remote = {}, []
    for peer in range(layout.world_size):
        if peer == rank:
            continue
        sel = owner == peer
        pos = _tile_positions(plo[sel], phi[sel], block, seq_len)
        if pos.size:
            recv[peer] = int(pos.size)
            remote.append(pos)
    remote_pos = np.concatenate(remote) if remote else np.zeros(0, dtype=np.int64)
    local_pos = _tile_positions(plo[owner == rank], phi[owner == rank], block, seq_len)
    local_keys = np.searchsorted(positions, local_pos)
    send = {}
    for peer in range(layout.world_size):
        if peer == rank:
            continue
        o, lo, hi = traffic.needs(vis, layout, peer).pieces
        pos = _tile_positions(lo[o == rank], hi[o == rank], block, seq_len)
        if pos.size:
            send[peer] = torch.from_numpy(np.searchsorted(positions, pos).astype(np.int64))
    # Query chunks: consecutive tiles of this rank while rows x keys stay under the budget.
    n_kv = vis.n_tiles
    ltile, rtile = local_pos // block, remote_pos // block
    chunks = []
    tiles = layout.tiles(rank)
    start = 0
    row = 0
    while start < tiles.size:
        end = start + 1
        seen = np.zeros(n_kv, dtype=bool)
        _, lo, hi = vis.of_rows(tiles[start:end])
        seen[traffic._ranges(lo, hi)] = True
        while end < tiles.size:
            _, lo, hi = vis.of_rows(tiles[end : end + 1])
            more = seen.copy()
            more[traffic._ranges(lo, hi)] = True
            rows = (end + 1 - start) * block
            if (
                rows
                * int(traffic.tokens(np.flatnonzero(more), np.flatnonzero(more) + 1, block, seq_len).sum())
                * rows_per_key
                > CHUNK_ELEMENTS
            ):
                break
            seen, end = more, end + 1
        count = int(traffic.tokens(tiles[start:end], tiles[start:end] + 1, block, seq_len).sum())
        chunks.append(
            Chunk(
                row,
                row + count,
                torch.from_numpy(np.flatnonzero(seen[ltile])),
                torch.from_numpy(np.flatnonzero(seen[rtile])),
            )
        )
        row += count
        start = end
    return Exchange(
        torch.from_numpy(positions.astype(np.int64)),
        send,
        recv,
        torch.from_numpy(local_keys.astype(np.int64)),
        torch.from_numpy(remote_pos.astype(np.int64)),
        tuple(chunks),
    )


# --------------------------------------------------------------------------- masks and math


class Masks:
    """The pattern's element mask between query and key positions, ``[batch or 1, heads, rows, keys]``."""

    def __init__(self, pattern, seq_len: int, heads: int, bound):
        from patterndsl.analysis import planner
        from patterndsl.primitives.inputs import Bound

        self.groups, self.head_group = planner._head_groups(pattern.ir, heads)
        sizes = Sizes(seq_len, seq_len, pattern.ir.layout, heads)
        if bound is None:
            self.contexts = [sizes]
        else:
            self.contexts = [Bound(sizes, bound.element(b)) for b in range(bound.batch)]
        self.heads = heads

    def __call__(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(self.contexts), self.heads, qpos.numel(), kpos.numel(), dtype=torch.bool)
        i, j = qpos[:, None], kpos[None, :]
        for b, ctx in enumerate(self.contexts):
            for node, hs in self.groups:
                out[b, hs] = semantics.evaluate(node, i, j, hs[0], ctx)
        return out


def _scores(q, k, mask, scale):
    """Scaled scores ``[B, H, r, n]`` of ``q [B, H, r, D]`` against ``k [B, Hkv, n, D]``, blocked pairs -inf."""
    b, h, r, d = q.shape
    hkv = k.shape[1]
    s = torch.matmul(q.view(b, hkv, h // hkv, r, d), k.unsqueeze(2).transpose(-1, -2)).view(b, h, r, -1)
    return s.mul_(scale).masked_fill_(~mask, float("-inf"))


def _part(q, k, v, mask, scale):
    """Softmax attention of one part: ``(o [B, H, r, Dv], lse [B, H, r])``; rows with no key are 0 / -inf."""
    s = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    b, h, r, n = p.shape
    hkv = v.shape[1]
    o = torch.matmul(p.view(b, hkv, h // hkv, r, n), v.unsqueeze(2)).view(b, h, r, -1)
    return o, lse


def _merge(o1, l1, o2, l2):
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    w1 = torch.where(torch.isfinite(l1), torch.exp(l1 - safe), 0.0)
    w2 = torch.where(torch.isfinite(l2), torch.exp(l2 - safe), 0.0)
    return o1 * w1[..., None] + o2 * w2[..., None], lse


def _key_grads(qf, k, v, key_positions, pick, ex, masks, scale, lse, dout, delta, dq):
    """dK and dV of the keys ``k``/``v`` (at ``key_positions``) over every query chunk of ``ex``;
    ``pick(chunk)`` gives the chunk's key indices. ``dq`` accumulates in place."""
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for c in ex.chunks:
        cols = pick(c)
        if not cols.numel():
            continue
        mask = masks(ex.positions[c.a : c.b], key_positions[cols])
        dkc, dvc = torch.zeros_like(k[:, :, cols]), torch.zeros_like(v[:, :, cols])
        rows = slice(c.a, c.b)
        _grad_part(
            qf[:, :, rows],
            k[:, :, cols],
            v[:, :, cols],
            mask,
            scale,
            lse[:, :, rows],
            dout[:, :, rows],
            delta[:, :, rows],
            dq[:, :, rows],
            dkc,
            dvc,
        )
        dk.index_add_(2, cols, dkc)
        dv.index_add_(2, cols, dvc)
    return dk, dv


def _grad_part(q, k, v, mask, scale, lse, dout, delta, dq, dk, dv):
    """Adds one part's gradients into ``dq [B, H, r, D]``, ``dk``/``dv [B, Hkv, n, D]``."""
    s = _scores(q, k, mask, scale)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    b, h, r, n = p.shape
    hkv = k.shape[1]
    g = h // hkv
    p5 = p.view(b, hkv, g, r, n)
    do5 = dout.view(b, hkv, g, r, -1)
    dv += torch.einsum("bkgrn,bkgrd->bknd", p5, do5)
    dp = torch.matmul(do5, v.unsqueeze(2).transpose(-1, -2))
    ds = p5 * (dp - delta.view(b, hkv, g, r, 1))
    dq += torch.matmul(ds, k.unsqueeze(2)).view(b, h, r, -1).mul_(scale)
    dk += torch.einsum("bkgrn,bkgrd->bknd", ds, q.view(b, hkv, g, r, -1)).mul_(scale)


# --------------------------------------------------------------------------- communication


class _Comm:
    def __init__(self, group):
        self.group = group

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def exchange(self, sends: dict, recvs: dict) -> list:
        """Posts receives then sends (``{peer: tensor}``); returns the requests."""
        reqs = [dist.irecv(t, self.peer(r), group=self.group) for r, t in sorted(recvs.items())]
        reqs += [dist.isend(t, self.peer(r), group=self.group) for r, t in sorted(sends.items())]
        return reqs


def _pack(k, v, idx):
    return torch.cat([k[:, :, idx].reshape(-1), v[:, :, idx].reshape(-1)])


def _unpack(buf, counts: dict, b, hkv, dk, dv):
    ks, vs = [], []
    for r, n in sorted(counts.items()):
        t = buf[r]
        ks.append(t[: b * hkv * n * dk].view(b, hkv, n, dk))
        vs.append(t[b * hkv * n * dk :].view(b, hkv, n, dv))
    return ks, vs


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ex: Exchange, masks: Masks, scale: float, comm: _Comm):
        b, h, n, d = q.shape
        hkv, dv_ = k.shape[1], v.shape[-1]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        recv = {r: torch.empty(b * hkv * c * (d + dv_), dtype=k.dtype) for r, c in ex.recv.items()}
        sends = {r: _pack(k, v, idx) for r, idx in ex.send.items()}
        reqs = comm.exchange(sends, recv)
        qf, kf, vf = q.to(work), k.to(work), v.to(work)
        bm = len(masks.contexts)
        out = torch.zeros(b, h, n, dv_, dtype=work)
        lse = torch.full((b, h, n), float("-inf"), dtype=work)
        kl, vl = kf[:, :, ex.local_keys], vf[:, :, ex.local_keys]
        lpos = ex.positions[ex.local_keys]
        for c in ex.chunks:
            mask = masks(ex.positions[c.a : c.b], lpos[c.local]).expand(b if bm == 1 else bm, -1, -1, -1)
            o, l_ = _part(qf[:, :, c.a : c.b], kl[:, :, c.local], vl[:, :, c.local], mask, scale)
            out[:, :, c.a : c.b], lse[:, :, c.a : c.b] = o, l_
        for req in reqs:
            req.wait()
        _record("bytes_received", sum(t.numel() * t.element_size() for t in recv.values()))
        ks, vs = _unpack(recv, ex.recv, b, hkv, d, dv_)
        kr = torch.cat(ks, 2).to(work) if ks else kf[:, :, :0]
        vr = torch.cat(vs, 2).to(work) if vs else vf[:, :, :0]
        if kr.shape[2]:
            for c in ex.chunks:
                if not c.remote.numel():
                    continue
                mask = masks(ex.positions[c.a : c.b], ex.remote_positions[c.remote])
                o, l_ = _part(qf[:, :, c.a : c.b], kr[:, :, c.remote], vr[:, :, c.remote], mask, scale)
                out[:, :, c.a : c.b], lse[:, :, c.a : c.b] = _merge(out[:, :, c.a : c.b], lse[:, :, c.a : c.b], o, l_)
        ctx.save_for_backward(q, k, v, kr, vr, out, lse)
        ctx.ex, ctx.masks, ctx.scale, ctx.comm = ex, masks, scale, comm
        lse_out = lse if work == torch.float64 else lse.float()
        return out.to(q.dtype), lse_out

    @staticmethod
    def backward(ctx, dout, dlse):
        from patterndsl.runtime.softmax import delta as row_delta

        q, k, v, kr, vr, out, lse = ctx.saved_tensors
        ex, masks, scale, comm = ctx.ex, ctx.masks, ctx.scale, ctx.comm
        work = out.dtype
        b, d = q.shape[0], q.shape[3]
        hkv, dv_ = k.shape[1], v.shape[-1]
        qf, kf, vf = q.to(work), k.to(work), v.to(work)
        dout = torch.zeros_like(out) if dout is None else dout.to(work)
        delta = row_delta(dout, out, dlse, work)
        dq = torch.zeros_like(qf)
        dkr, dvr = _key_grads(
            qf, kr, vr, ex.remote_positions, lambda c: c.remote, ex, masks, scale, lse, dout, delta, dq
        )
        # Return the received keys' gradients to their owners while the local part runs.
        sends, at = {}, 0
        for r, cnt in sorted(ex.recv.items()):
            sends[r] = torch.cat([dkr[:, :, at : at + cnt].reshape(-1), dvr[:, :, at : at + cnt].reshape(-1)]).to(
                k.dtype
            )
            at += cnt
        recv = {r: torch.empty(b * hkv * idx.numel() * (d + dv_), dtype=k.dtype) for r, idx in ex.send.items()}
        reqs = comm.exchange(sends, recv)
        dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
        kl, vl = kf[:, :, ex.local_keys], vf[:, :, ex.local_keys]
        lpos = ex.positions[ex.local_keys]
        dkl, dvl = _key_grads(qf, kl, vl, lpos, lambda c: c.local, ex, masks, scale, lse, dout, delta, dq)
        dk.index_add_(2, ex.local_keys, dkl)
        dv.index_add_(2, ex.local_keys, dvl)
        for req in reqs:
            req.wait()
        _record("bytes_received_backward", sum(t.numel() * t.element_size() for t in recv.values()))
        for r, idx in sorted(ex.send.items()):
            t = recv[r].to(work)
            cnt = idx.numel()
            dk.index_add_(2, idx, t[: b * hkv * cnt * d].view(b, hkv, cnt, d))
            dv.index_add_(2, idx, t[b * hkv * cnt * d :].view(b, hkv, cnt, dv_))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


# --------------------------------------------------------------------------- entry point


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise PatternTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise PatternValueError(f"{name} must be [batch, heads, n_rank, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise PatternTypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise PatternTypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] != q.shape[2] or v.shape[2] != k.shape[2]:
        raise PatternValueError(
            f"Lq != Lk is not distributed yet: this rank's shards have {q.shape[2]} queries and {k.shape[2]} keys "
            f"({v.shape[2]} values); context parallelism shards one sequence for queries and keys"
        )
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0] or v.shape[1] != k.shape[1] or k.shape[3] != q.shape[3]:
        raise PatternValueError(
            f"k and v must be [batch, kv_heads, n_rank, head_dim] matching q {tuple(q.shape)}, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1]:
        raise PatternValueError(f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")


def _sizes_of(n_rank: int, group, world: int) -> list[int]:
    mine = torch.tensor([n_rank], dtype=torch.int64)
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


def _exchange(pattern, layout, rank: int, heads: int, batch: int, inputs: dict, bound):
    key = (
        id(pattern),
        id(layout),
        rank,
        heads,
        batch,
        tuple((n, id(t), t._version) for n, t in sorted(inputs.items())),
    )
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] is pattern and hit[1] is layout:
            return hit[2], hit[3]
    vis = traffic.plan_visits(pattern, layout.seq_len, heads, layout.block, inputs)
    ex = build_exchange(vis, layout, rank, batch * heads)
    masks = Masks(pattern, layout.seq_len, heads, bound)
    with _LOCK:
        _CACHE[key] = (pattern, layout, ex, masks)
        while len(_CACHE) > 8:
            _CACHE.popitem(last=False)
    return ex, masks


def attention(q, k, v, pattern, group=None, layout=None, scale=None, return_lse=False, **inputs):
    """Attention over a sequence sharded across the ranks of ``group`` (LANGUAGE.md section 11).

    Args:
        q: this rank's queries ``[batch, heads, n_rank, head_dim]``: the tokens ``layout.indices(rank)``.
        k, v: this rank's keys and values ``[batch, kv_heads, n_rank, head_dim]`` (same tokens).
        pattern: a static :class:`patterndsl.Pattern` (or one with run-time inputs).
        group: the process group (default: the world).
        layout: the :class:`Layout` (default: contiguous in tiles of 128, the sequence length being
            the sum of the ranks' shards).
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return this rank's log-sum-exp ``[batch, heads, n_rank]``.
        **inputs: the pattern's run-time inputs, whole (the same tensors on every rank).

    Returns:
        This rank's ``out`` (dtype of ``q``), or ``(out, lse)``.
    """
    from patterndsl import binding
    from patterndsl.api import Pattern

    if not isinstance(pattern, Pattern):
        raise PatternTypeError(f"distributed.attention() needs a patterndsl.Pattern, got {type(pattern).__name__}")
    if not isinstance(return_lse, bool):
        raise PatternTypeError(f"return_lse must be True or False, got {type(return_lse).__name__}")
    traffic.refuse_dynamic(pattern)
    _check_tensors(q, k, v)
    if not dist.is_available() or not dist.is_initialized():
        raise PatternError("distributed.attention() needs torch.distributed initialised (init_process_group)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    b, h, n_rank, d = q.shape
    if layout is None:
        sizes = _sizes_of(n_rank, group, world)
        layout = costs.resolve_layout(None, sum(sizes), world, None)
        if sizes != [layout.indices_count(r) for r in range(world)]:
            raise PatternValueError(
                f"layout=None means contiguous tiles of {layout.block} tokens over {world} ranks "
                f"({[layout.indices_count(r) for r in range(world)]} tokens), but the ranks hold {sizes}: "
                "pass the layout the shards were cut with (patterndsl.distributed.shard)"
            )
    else:
        if not isinstance(layout, Layout):
            raise PatternTypeError(f"layout must be a patterndsl.distributed.Layout, got {type(layout).__name__}")
        if layout.world_size != world:
            raise PatternValueError(f"layout is for {layout.world_size} ranks, the process group has {world}")
    expected = layout.indices_count(rank)
    if n_rank != expected:
        raise PatternValueError(
            f"rank {rank} holds {expected} tokens under the layout ({layout.strategy}, seq_len={layout.seq_len}), "
            f"got q with {n_rank}"
        )
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise PatternTypeError(f"scale must be a number, got {type(scale).__name__}")
    bound = None
    if inputs or pattern.ir.inputs:
        bound = binding.bind(pattern.ir, inputs, layout.seq_len, h, head_dim=d, batch=b, who="distributed.attention()")
    with pattern._located():
        ex, masks = _exchange(pattern, layout, rank, h, b, inputs, bound)
    out, lse = _ContextParallel.apply(q, k, v, ex, masks, float(scale), _Comm(group))
    return (out, lse) if return_lse else out
