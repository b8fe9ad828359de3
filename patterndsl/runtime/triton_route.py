"""Runtime stage: ``route(...)`` patterns on the Triton backend (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

Comes in: ``q``, ``k``, ``v`` and the block plan of a pattern with ``route``
(tiles marked 3 where the data decides). Goes out: ``(out, lse)`` and, for the
backward pass, ``(dq, dk, dv)``. At every call the choice is made from ``q`` and
``k`` (:mod:`patterndsl.runtime.routing`), merged with the static tiles into
per (batch element, key-value head) CSR lists (:func:`dynamic.kernel_lists`),
and the kernels of :mod:`patterndsl.codegen.routed` walk those lists,
looking the choice up per element on partial tiles. The backward pass makes the
same (deterministic) choice again from ``q`` and ``k``; no gradient flows
through it.
"""

from __future__ import annotations

import torch

from patterndsl import kernel_cache
from patterndsl.codegen import routed as route_kernels
from patterndsl.runtime import dynamic, plans

#: Plan tiles (BM, BN) of routed Triton kernels and their warps: with 8 warps, 64 x 32 tiles
#: build without register spills for sm_80 and sm_90 up to head dim 64, 32 x 32 above
#: (tests/unit/test_routing.py builds both).
BLOCK = (64, 32)
WIDE_BLOCK = (32, 32)
NUM_WARPS = 8


def block_for(head_dim: int) -> tuple[int, int]:
    """Plan tiles for a head dimension (see :data:`BLOCK`)."""
    return BLOCK if head_dim <= 64 else WIDE_BLOCK


LOG2E = 1.4426950408889634


def _setup(q, k, plan):
    dp = dynamic.dynamic_plan(plan)
    selections = dynamic.select_all(dp, q, k)
    lists = dynamic.kernel_lists(dp, selections, q.shape[0], k.shape[1])
    dtype = str(q.dtype).replace("torch.", "")
    for group, (row_ptr, cols, state) in zip(plan.groups, lists, strict=True):
        routes = tuple(dict.fromkeys(p for p in _walk(group.node) if p in selections))
        spec = route_kernels.RouteKernelSpec(
            getattr(plan.pattern, "name", "pattern"),
            group.node,
            routes,
            getattr(plan.pattern, "layout", None),
            plan.q_len,
            plan.kv_len,
            q.shape[1],
            k.shape[1],
            q.shape[3],
            dtype,
            plan.block,
            NUM_WARPS,
        )
        module = kernel_cache.load(spec, route_kernels.render)
        dev = q.device
        # random(...) tables the predicates read; built once per plan, kernel spec and device.
        aux = plans.per_plan(
            plan, ("route_aux", spec.key, str(dev)), lambda s=spec, d=dev: route_kernels.aux_table(s).to(d)
        )
        route_args = []
        for p in routes:
            sel = selections[p]
            table = sel.chosen.reshape(-1, sel.n_groups, sel.n_blocks).to(device=dev, dtype=torch.int8).contiguous()
            qg, kb = sel.qgroup.to(dev, torch.int32), sel.kblock.to(dev, torch.int32)
            route_args += [table, qg, kb, sel.n_groups, sel.n_blocks]
        heads = torch.tensor(group.heads, dtype=torch.int32, device=dev)
        tiles = (row_ptr.to(dev, torch.int32), cols.to(dev, torch.int32), state.to(dev, torch.int8))
        yield module, tiles, heads, aux, route_args, spec.num_warps


def _walk(node):
    from patterndsl import ir

    return (p for p in ir.walk(node) if isinstance(p, ir.Prim) and p.name == "route")


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scale: float):
    """Routed attention with the generated kernels.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        plan: the pattern's block plan (tiles :data:`BLOCK`).
        scale: softmax scale.

    Returns:
        ``(out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)``; rows with no allowed key
        give 0 and ``-inf``.
    """
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, lq, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
    for module, tiles, heads, aux, route_args, warps in _setup(q, k, plan):
        grid = (plan.n_q_tiles, b * len(heads))
        module.route_fwd[grid](
            q, k, v, out, lse, *tiles, heads, aux, *route_args,
            scale * LOG2E, len(heads), plan.n_q_tiles,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            out.stride(0), out.stride(1), out.stride(2), num_warps=warps,
        )  # fmt: skip
    return out, lse


def backward(q, k, v, out, lse, dout, plan, scale: float, dlse=None):
    """Gradients of :func:`forward` (dK/dV accumulated in float32 by atomic adds).

    Args:
        q, k, v, out, lse: the forward's inputs and outputs.
        dout: gradient of ``out``; dlse: gradient of ``lse`` or None.
        plan, scale: as in the forward.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    q, k, v, dout = q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous()
    b = q.shape[0]
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for module, tiles, heads, aux, route_args, warps in _setup(q, k, plan):
        grid = (plan.n_q_tiles, b * len(heads))
        module.route_bwd[grid](
            q, k, v, dout, lse, delta, dq, dk, dv, *tiles, heads, aux, *route_args,
            scale * LOG2E, scale, len(heads), plan.n_q_tiles,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), num_warps=warps,
        )  # fmt: skip
    return dq, dk.to(k.dtype), dv.to(v.dtype)
