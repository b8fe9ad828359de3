"""Runtime stage: the ``torch.library`` custom ops that make pattern attention one differentiable torch op.

Comes in: validated ``q``, ``k``, ``v``, a plan key from :mod:`patterndsl.runtime.plans`, the
list of run-time tensors the plan reads (``data``), the scale and the backend name (``"cpu"`` or
``"triton"``). Goes out: ``(out, lse)`` from ``patterndsl::attention_fwd`` and ``(dq, dk, dv, dtables)``
from ``patterndsl::attention_bwd``, wired together with ``register_autograd``. Both ops have
fake (meta) implementations whose outputs match the real ones in shape, dtype and strides
(always contiguous, whatever the layout of the inputs), so ``torch.compile(fullgraph=True)``
traces through them without graph breaks. One op family serves every device: the
implementation dispatches to the CPU executor or, for CUDA tensors (and CPU tensors under
``TRITON_INTERPRET=1`` with ``backend="triton"``), to the generated Triton kernels, imported
lazily so the CPU path never needs them.

``data`` is how a run-time input (document ids, lengths, score tables, paged caches) reaches
a backend without another schema change: the caller appends tensors, the plan says what they
mean. Static patterns and ``route`` pass an empty list today. Floating-point tensors of the list
(float inputs, e.g. a learned bias table a ``score`` reads) get gradients: ``dtables`` holds one
per floating tensor of ``data``, in order; integer tensors get none.
"""

from __future__ import annotations

import functools
import inspect

import torch

from patterndsl.errors import BackendError
from patterndsl.runtime import combine, plans, ragged, validate


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp's dtype for inputs of ``dtype``: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _backend_module(backend: str, plan=None):
    if backend == "cpu":
        from patterndsl.runtime import cpu

        return cpu
    from patterndsl.runtime import triton_backend_module

    # One launcher for static and route patterns (it builds a route pattern's per-call lists).
    return triton_backend_module()


@functools.cache
def _takes_data(entry) -> bool:
    return "data" in inspect.signature(entry).parameters


def _run(module, name: str, *args, data, **kwargs):
    """``module.name(*args, **kwargs)``, handing ``data`` over as ``data=`` when the entry point takes it.

    Backends written before run-time inputs existed do not take the keyword; they are called as
    before while the list is empty, and refuse a non-empty one rather than ignore it.
    """
    entry = getattr(module, name)
    if _takes_data(entry):
        return entry(*args, data=list(data), **kwargs)
    if data:
        where = module.__name__.rsplit(".", 1)[-1]
        raise BackendError(f"the {where} backend does not take run-time inputs yet (got {len(data)} data tensors)")
    return entry(*args, **kwargs)


def unit_stride(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``xs`` with a unit stride on the head dim: torch's fused CPU flash kernels (which several
    executor paths call on views of the operands) read each row as a contiguous vector whatever the
    strides say, so a ``v`` made by a transpose gave wrong outputs there. Other layouts pass as they are."""
    return tuple(x if x.dim() == 0 or x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in xs)


def _plan(q, k, v, plan_key: str, backend: str):
    # The op is public (torch.ops.patterndsl), so it checks what it is handed before planning.
    sizes = validate.check_call(q, k, v, backend)
    return plans.get(plan_key, sizes.q_len, sizes.kv_len, sizes.heads)


# Registered through torch.library.define/impl rather than @torch.library.custom_op: the
# latter wraps every kernel in torch._disable_dynamo, whose first call imports torch._dynamo
# (about one second), which would make every CPU user's first call slow. The op, its fake
# kernels and its autograd formula are the same either way.
torch.library.define(
    "patterndsl::attention_fwd",
    "(Tensor q, Tensor k, Tensor v, str plan_key, Tensor[] data, float scale, str backend) -> (Tensor, Tensor)",
)
torch.library.define(
    "patterndsl::attention_bwd",
    "(Tensor dout, Tensor dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "str plan_key, Tensor[] data, float scale, str backend) -> (Tensor, Tensor, Tensor, Tensor[])",
)


@torch.library.impl("patterndsl::attention_fwd", ["cpu", "cuda"])
def _attention_fwd_impl(q, k, v, plan_key, data, scale, backend):
    """Forward attention under the plan named by ``plan_key``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]``; any strides.
        plan_key: from :func:`patterndsl.runtime.plans.register`.
        data: the run-time tensors the plan reads (empty for static patterns).
        scale: softmax scale.
        backend: ``"cpu"`` or ``"triton"``.

    Returns:
        ``(out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] float32, float64 for float64 inputs)``, both
        contiguous.
    """
    return forward_impl(q, k, v, plan_key, data, scale, backend)


def forward_impl(q, k, v, plan_key, data, scale, backend, contiguous: bool = True):
    """What ``attention_fwd`` runs, callable without the dispatcher (an eager call that needs no gradient).

    With ``contiguous=False`` the output keeps the layout the backend produced (torch's fused CPU kernel
    writes ``[B, Lq, H, D]`` memory, which a caller that wants that layout then takes without a copy).
    """
    q, k, v = unit_stride(q, k, v)
    if ragged.owns(plan_key):
        return ragged.forward_op(q, k, v, plan_key, data, scale, backend)
    plan = _plan(q, k, v, plan_key, backend)
    if q.shape[0] == 0:
        # A zero batch has nothing to run: empty outputs, on every backend.
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=lse_dtype(q.dtype))
    module = _backend_module(backend, plan)
    if plan.parts:
        # disjoint parts with token orders of their own: one pass each, merged by log-sum-exp
        run = functools.partial(_run, module, "forward", q, k, v, scale=scale, data=data)
        out, lse = combine.forward(functools.partial(run, plan=part) for part in plan.parts)
    else:
        out, lse = _run(module, "forward", q, k, v, plan, scale, data=data)
    lse = lse.to(lse_dtype(q.dtype))
    return (out.contiguous(), lse.contiguous()) if contiguous else (out, lse)


@torch.library.register_fake("patterndsl::attention_fwd")
def _attention_fwd_fake(q, k, v, plan_key, data, scale, backend):
    # new_empty, not empty_like: the real op returns contiguous tensors whatever q's strides
    # (a transposed [B, L, H, D] view, an expanded or sliced tensor).
    b, h, lq, d = q.shape
    return q.new_empty((b, h, lq, d)), q.new_empty((b, h, lq), dtype=lse_dtype(q.dtype))


@torch.library.impl("patterndsl::attention_bwd", ["cpu", "cuda"])
def _attention_bwd_impl(dout, dlse, q, k, v, out, lse, plan_key, data, scale, backend):
    """Gradients of ``attention_fwd`` through the same plan.

    Args:
        dout: gradient of ``out``; dlse: gradient of ``lse`` (zeros when unused).
        q, k, v, out, lse: the forward's inputs and outputs.
        plan_key, data, scale, backend: as in the forward.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``, contiguous, and the list of the
        gradients of the floating-point tensors of ``data`` (a backend that returns none gives zeros:
        only a score reads float inputs, and backends that cannot differentiate them refuse it).
    """
    dout, q, k, v, out = unit_stride(dout, q, k, v, out)
    if ragged.owns(plan_key):
        grads = ragged.backward_op(dout, dlse, q, k, v, out, lse, plan_key, data, scale, backend)
    else:
        plan = _plan(q, k, v, plan_key, backend)
        if q.shape[0] == 0:
            grads = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
        else:
            module = _backend_module(backend, plan)
            run = functools.partial(
                _run, module, "backward", q, k, v, out, lse, dout, scale=scale, dlse=dlse, data=data
            )
            if plan.parts:
                # parts are split only for patterns without run-time inputs: (dq, dk, dv) each
                grads = combine.backward(functools.partial(run, plan=part) for part in plan.parts)
            else:
                grads = run(plan=plan)
    floats = [t for t in data if t.is_floating_point()]
    tables = list(grads[3]) if len(grads) > 3 else [torch.zeros_like(t) for t in floats]
    qkv = tuple(g.to(x.dtype).contiguous() for g, x in zip(grads[:3], (q, k, v), strict=True))
    return (*qkv, [g.to(t.dtype).contiguous() for g, t in zip(tables, floats, strict=True)])


@torch.library.register_fake("patterndsl::attention_bwd")
def _attention_bwd_fake(dout, dlse, q, k, v, out, lse, plan_key, data, scale, backend):
    tables = [t.new_empty(t.shape) for t in data if t.is_floating_point()]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), tables


#: The two ops, one object each for every device.
attention_fwd = torch.ops.patterndsl.attention_fwd.default
attention_bwd = torch.ops.patterndsl.attention_bwd.default


def _setup_context(ctx, inputs, output):
    q, k, v, plan_key, data, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *data)
    ctx.plan_key, ctx.scale, ctx.backend = plan_key, scale, backend


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *data = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv, dtables = attention_bwd(dout, dlse, q, k, v, out, lse, ctx.plan_key, data, ctx.scale, ctx.backend)
    # Integer data (ids, lengths) has no gradient; float tables get theirs, in order.
    tables = iter(dtables)
    grads = [next(tables) if t.is_floating_point() else None for t in data]
    return dq, dk, dv, None, grads, None, None


torch.library.register_autograd("patterndsl::attention_fwd", _backward, setup_context=_setup_context)
