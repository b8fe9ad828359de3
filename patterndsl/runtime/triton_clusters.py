"""Runtime stage: launch the sorted-cluster Triton kernels (:mod:`patterndsl.codegen.clusters`).

Comes in: one sorted part's tensors ``[B, Hp, L, D]`` and its :class:`~patterndsl.runtime.clusters`
run (the sorted plan, predicate, sizes, scale). Goes out: ``(out, lse)`` from ``_cluster_fwd`` and
``(dq, dk, dv)`` from ``_cluster_bwd``. Head sizes are padded with zeros to a power of two (at
least 16), which changes no dot product; labels are renumbered to dense int32 ranks (only
equality matters), except with ``balanced`` clusters, whose labels are the cluster indices the
membership bit sets are read by. There the kernels write per entry and this module merges a
token's entries (log-sum-exp forward, a sum of ``dQ`` backward).
"""

from __future__ import annotations

import torch

from patterndsl import config, kernel_cache
from patterndsl.codegen import clusters as gen
from patterndsl.runtime import softmax

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def supported(run, q: torch.Tensor, dv_dim: int) -> bool:
    """Whether this part runs on the kernels: one entry per token, a dtype and a head size they take."""
    return q.dtype in _DTYPES and gen.width(q.shape[3], dv_dim) <= gen.MAX_WIDTH


def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
    b, h, length, d = t.shape
    t = torch.nn.functional.pad(t, (0, width - d)) if d != width else t
    return t.reshape(b * h, length, width).contiguous()


def _lists(run, device) -> dict:
    """The sorted plan as int32 device tensors (labels as dense ranks), cached on the run."""
    if run.device_lists:
        return run.device_lists
    plan = run.plan
    eq = plan.q.label.shape[1]
    if plan.q.bits is None:
        _, ranks = torch.unique(torch.cat([plan.q.label, plan.k.label], 1), return_inverse=True)
    else:
        ranks = torch.cat([plan.q.label, plan.k.label], 1)
    none = torch.zeros(1, dtype=torch.int64, device=device)
    lists = {
        "qbits": none if plan.q.bits is None else plan.q.bits.to(device).contiguous(),
        "kbits": none if plan.k.bits is None else plan.k.bits.to(device).contiguous(),
        "qidx": plan.q.index.to(torch.int32).to(device).contiguous(),
        "qlab": ranks[:, :eq].to(torch.int32).to(device).contiguous(),
        "kidx": plan.k.index.to(torch.int32).to(device).contiguous(),
        "klab": ranks[:, eq:].to(torch.int32).to(device).contiguous(),
        "start": plan.start.reshape(-1).to(torch.int32).to(device).contiguous(),
        "stop": plan.stop.reshape(-1).to(torch.int32).to(device).contiguous(),
    }
    run.device_lists.update(lists)
    return lists


def _module(run, q: torch.Tensor, width: int, kind: str):
    """The kernels' module, the ``AUX`` tables and the launch options of one pass."""
    bm = run.plan.block[0]
    if q.device.type == "cpu" or config.triton_interpret():
        target, bn, launch = "interpret", run.plan.block[1], {}
    else:
        major, minor = torch.cuda.get_device_capability(q.device)
        target = f"sm_{major}{minor}"
        bn, warps, stages = gen.launch(kind, width)
        launch = {"num_warps": warps, "num_stages": stages}
    spec = gen.ClusterSpec(
        run.part.pred, run.sizes.layout, run.sizes.q_len, run.sizes.kv_len, run.sizes.heads, width,
        _DTYPES[q.dtype], (bm, bn), target, 0 if run.plan.q.bits is None else run.plan.q.bits.shape[-1],
    )  # fmt: skip
    return kernel_cache.load(spec, gen.render), gen.aux_tables(spec).tensor().to(q.device), launch


def _common(run):
    part = run.part
    tiles = run.plan.start.shape[1]
    return (
        tiles,
        run.plan.q.index.shape[1],
        run.plan.k.index.shape[1],
        part.hi - part.lo,
        part.lo,
    )


def forward(q, k, v, run):
    """``(out [B, Hp, Lq, Dv], lse float32 [B, Hp, Lq])`` of one sorted part on the kernels."""
    b, hp, q_len, _ = q.shape
    dv_dim = v.shape[3]
    width = gen.width(q.shape[3], dv_dim)
    module, aux, launch = _module(run, q, width, "forward")
    lists = _lists(run, q.device)
    qf, kf, vf = (_flat(t, width) for t in (q, k, v))
    balanced = run.plan.q.bits is not None
    rows = lists["qidx"].shape[1] if balanced else q_len
    out = torch.zeros(b * hp, rows, width, dtype=torch.float32 if balanced else q.dtype, device=q.device)
    lse = torch.full((b * hp, rows), float("-inf"), dtype=torch.float32, device=q.device)
    tiles = lists["start"].numel()
    if tiles:
        module._cluster_fwd[(tiles,)](
            qf, kf, vf, out, lse, lists["qidx"], lists["qlab"], lists["kidx"], lists["klab"],
            lists["start"], lists["stop"], lists["qbits"], lists["kbits"], aux, float(run.scale), *_common(run),
            **launch,
        )  # fmt: skip
    if balanced:  # a token's entries saw disjoint keys: merge them by log-sum-exp
        merged = torch.zeros(b * hp * q_len, width, dtype=torch.float32, device=q.device)
        merged_lse = torch.full((b * hp * q_len,), float("-inf"), dtype=torch.float32, device=q.device)
        softmax.merge_into(merged, merged_lse, out.view(-1, width), lse.view(-1), _tokens(lists, q_len))
        out, lse = merged, merged_lse
    return out.view(b, hp, q_len, width)[..., :dv_dim], lse.view(b, hp, q_len)


def _tokens(lists, q_len: int) -> torch.Tensor:
    """The flat token row ``g * Lq + token`` of every query entry (int64 ``[G * EQ]``)."""
    qidx = lists["qidx"]
    g = torch.arange(qidx.shape[0], device=qidx.device)[:, None]
    return (g * q_len + qidx.long()).reshape(-1)


def backward(q, k, v, dout, lse, delta, run):
    """``(dq, dk, dv)`` of one sorted part on the kernels (``delta = rowsum(dO * O) - dlse``, float32)."""
    b, hp, _, d = q.shape
    kv_len, dv_dim = k.shape[2], v.shape[3]
    width = gen.width(d, dv_dim)
    module, aux, launch = _module(run, q, width, "backward")
    lists = _lists(run, q.device)
    qf, kf, vf, dof = (_flat(t, width) for t in (q, k, v, dout.to(q.dtype)))
    balanced = run.plan.q.bits is not None
    if balanced:
        dq = torch.zeros(b * hp, lists["qidx"].shape[1], width, dtype=torch.float32, device=q.device)
    else:
        dq = torch.zeros_like(qf)
    dk = torch.zeros(b * hp, kv_len, width, dtype=torch.float32, device=q.device)
    dvv = torch.zeros_like(dk)
    tiles = lists["start"].numel()
    if tiles:
        module._cluster_bwd[(tiles,)](
            qf, kf, vf, dof, lse.float().contiguous(), delta.float().contiguous(), dq, dk, dvv,
            lists["qidx"], lists["qlab"], lists["kidx"], lists["klab"], lists["start"], lists["stop"],
            lists["qbits"], lists["kbits"], aux, float(run.scale), *_common(run), **launch,
        )  # fmt: skip
    if balanced:  # a token's dQ is the sum over its entries
        tokens = _tokens(lists, q.shape[2])
        dq = torch.zeros(b * hp * q.shape[2], width, dtype=torch.float32, device=q.device).index_add_(
            0, tokens, dq.view(-1, width)
        )
    shape = (b, hp, -1, width)
    return (
        dq.view(shape)[..., :d].to(q.dtype),
        dk.view(shape)[..., :d].to(k.dtype),
        dvv.view(shape)[..., :dv_dim].to(v.dtype),
    )
