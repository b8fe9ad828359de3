"""Runtime stage: the ``torch.library`` custom ops that make pattern attention one differentiable torch op.

Comes in: validated ``q``, ``k``, ``v``, a plan key from :mod:`patterndsl.runtime.plans`,
the scale and the backend name (``"cpu"`` or ``"triton"``). Goes out: ``(out, lse)``
from ``patterndsl::attention_fwd`` and ``(dq, dk, dv)`` from
``patterndsl::attention_bwd``, wired together with ``register_autograd``. Both
ops have fake (meta) implementations, so ``torch.compile(fullgraph=True)``
traces through them without graph breaks. One op family serves every device:
the implementation dispatches to the CPU executor or, for CUDA tensors (and CPU
tensors under ``TRITON_INTERPRET=1`` with ``backend="triton"``), to the
generated Triton kernels, imported lazily so the CPU path never needs them.
"""

from __future__ import annotations

import torch

from patterndsl import ir
from patterndsl.runtime import plans


def _backend_module(backend: str, plan=None):
    if backend == "cpu":
        from patterndsl.runtime import cpu

        return cpu
    from patterndsl.runtime import triton_backend_module

    module = triton_backend_module()
    if plan is not None and any(ir.is_dynamic(g.node) for g in plan.groups):
        # Tiles chosen at run time (route): the routed kernels walk per-call lists.
        from patterndsl.runtime import triton_route

        return triton_route
    return module


# Registered through torch.library.define/impl rather than @torch.library.custom_op: the
# latter wraps every kernel in torch._disable_dynamo, whose first call imports torch._dynamo
# (about one second), which would make every CPU user's first call slow. The op, its fake
# kernels and its autograd formula are the same either way.
torch.library.define(
    "patterndsl::attention_fwd",
    "(Tensor q, Tensor k, Tensor v, str plan_key, float scale, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "patterndsl::attention_bwd",
    "(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "str plan_key, float scale, str backend) -> (Tensor, Tensor, Tensor)",
)


@torch.library.impl("patterndsl::attention_fwd", ["cpu", "cuda"])
def _attention_fwd_impl(q, k, v, plan_key, scale, backend):
    """Forward attention under the plan named by ``plan_key``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``.
        plan_key: from :func:`patterndsl.runtime.plans.register`.
        scale: softmax scale.
        backend: ``"cpu"`` or ``"triton"``.

    Returns:
        ``(out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32)``.
    """
    plan = plans.get(plan_key, q.shape[2], k.shape[2], q.shape[1])
    out, lse = _backend_module(backend, plan).forward(q, k, v, plan, scale)
    return out, lse.to(torch.float32)


@torch.library.register_fake("patterndsl::attention_fwd")
def _attention_fwd_fake(q, k, v, plan_key, scale, backend):
    b, h, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.impl("patterndsl::attention_bwd", ["cpu", "cuda"])
def _attention_bwd_impl(dout, dlse, q, k, v, out, lse, plan_key, scale, backend):
    """Gradients of ``attention_fwd`` through the same plan.

    Args:
        dout: gradient of ``out``; dlse: gradient of ``lse`` (zeros when unused).
        q, k, v, out, lse: the forward's inputs and outputs.
        plan_key, scale, backend: as in the forward.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``.
    """
    plan = plans.get(plan_key, q.shape[2], k.shape[2], q.shape[1])
    return _backend_module(backend, plan).backward(q, k, v, out, lse, dout, plan, scale, dlse=dlse)


@torch.library.register_fake("patterndsl::attention_bwd")
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, plan_key, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


#: The two ops, one object each for every device.
attention_fwd = torch.ops.patterndsl.attention_fwd.default
attention_bwd = torch.ops.patterndsl.attention_bwd.default


def _setup_context(ctx, inputs, output):
    q, k, v, plan_key, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.plan_key, ctx.scale, ctx.backend = plan_key, scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = attention_bwd(dout, dlse, q, k, v, out, lse, ctx.plan_key, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("patterndsl::attention_fwd", _backward, setup_context=_setup_context)
