"""Runtime stage: the single entry point of pattern attention.

Comes in: ``q``, ``k``, ``v`` and a :class:`~patterndsl.api.Pattern` (from
``Pattern.__call__`` and ``patterndsl.attention``). Goes out: the attention
output (and log-sum-exp) computed by the ``patterndsl::attention_fwd`` torch op,
which runs the CPU executor or the generated Triton kernels from the pattern's
block plan and is differentiable through ``register_autograd``.
"""

from __future__ import annotations

import torch

from patterndsl import ir
from patterndsl.errors import BackendError, PatternError
from patterndsl.runtime import decode, op, plans, validate

#: CPU executor tiles (BM, BN); measured in benchmarks/cpu_attention.py.
CPU_BLOCK = (64, 64)
#: Plan tiles of the Triton backend (parts are split from this plan); on a GPU the launcher fits each pass
#: to the launch table's tiles (:mod:`patterndsl.codegen.passes`). Equal to ``codegen.launch.PLAN_TILES``
#: (a test checks it; importing codegen here would load sympy on a CPU user's first call).
TRITON_BLOCK = (64, 64)


def _plan_key(pattern: ir.PatternIR, backend: str) -> str:
    # Pure Python on the pattern, so torch.compile evaluates it once at trace time
    # and the op receives a constant string (sizes come from the tensors).
    if backend == "cpu":
        return plans.register(pattern, CPU_BLOCK, "auto")
    nodes = [rule.node for rule in pattern.heads]
    if pattern.default is not None:
        nodes.append(pattern.default)
    # The run-time lists of route(...) and of run-time inputs are made in token order.
    order = "identity" if any(ir.is_dynamic(node) for node in nodes) or pattern.inputs else "auto"
    return plans.register(pattern, TRITON_BLOCK, order)


# What ``torch.compiler.assume_constant_result`` does (torch/_dynamo/decorators.py), spelled
# out because that call imports torch._dynamo, about one second, on every CPU user's first call.
_plan_key._dynamo_marked_constant = True


def triton_backend_module():
    """The generated-kernel backend, imported on first use so the CPU path never needs Triton.

    Raises:
        BackendError: when it cannot be imported here.
    """
    try:
        from patterndsl.runtime import triton_backend
    except ImportError as exc:
        raise BackendError(f"the Triton backend is not available: {exc}") from None
    return triton_backend


def attention(
    q,
    k,
    v,
    pattern,
    scale=None,
    return_lse=False,
    backend="auto",
    inputs=None,
    kv_lengths=None,
    q_lengths=None,
    block_table=None,
):
    """Attention of ``q`` over ``k``/``v`` restricted to ``pattern``.

    Args:
        q: ``[batch, heads, Lq, head_dim]``.
        k, v: ``[batch, kv_heads, Lk, head_dim]``; ``kv_heads`` divides ``heads`` (grouped-query);
            ``v`` may have a head size of its own, as in SDPA (``out`` then has it).
        pattern: a :class:`patterndsl.Pattern`.
        scale: softmax scale, default ``head_dim ** -0.5``.
        return_lse: also return the log-sum-exp ``[batch, heads, Lq]`` (float32, float64 for float64
            inputs, natural log).
        backend: ``"auto"`` (by device), ``"triton"`` or ``"cpu"``. ``"cpu"`` with CUDA tensors
            is an error (no silent device copies).
        inputs: the pattern's run-time inputs by name (LANGUAGE.md section 7), a dict.
        kv_lengths, q_lengths, block_table: a ragged batch or a paged cache (LANGUAGE.md section 9,
            :mod:`patterndsl.runtime.ragged`).

    Returns:
        ``out`` with the dtype of ``q``, or ``(out, lse)``. A query with no allowed key gets
        zeros and ``lse = -inf``.

    Precision: float32 inputs on a GPU multiply in TF32 on tensor cores (10-bit mantissa,
    relative error around 1e-3; softmax and accumulation stay float32); the CPU backend
    computes in full float32.

    Raises:
        InputError: tensors of the wrong shape, dtype, device or head count.
        BackendError: a backend that cannot run on these tensors.
        PatternError: lengths that do not fit the pattern's layout or heads not covered.
    """
    pir = getattr(pattern, "ir", None)
    if not isinstance(pir, ir.PatternIR):
        raise PatternError(f"attention() needs a patterndsl.Pattern, got {type(pattern).__name__}")
    given = inputs or {}
    if pir.inputs and isinstance(q, torch.Tensor) and any(ir.routes(n) for n in pir.nodes()):
        from patterndsl.runtime import route_inputs

        route_inputs.check_backend(pir, backend, q.device)
    from patterndsl.runtime import clusters

    if clusters.has_content(pir):
        if kv_lengths is not None or q_lengths is not None or block_table is not None:
            lengths = (kv_lengths, q_lengths, block_table)
            return clusters.ragged(q, k, v, pir, scale, return_lse, backend, given, lengths)
        return clusters.attention(q, k, v, pir, scale, return_lse, backend, given)
    if kv_lengths is not None or q_lengths is not None or block_table is not None:
        return _ragged(q, k, v, pir, scale, return_lse, backend, given, kv_lengths, q_lengths, block_table)
    inputs = validate.check_inputs(q, k, v, scale, backend)
    data = []
    if given or pir.inputs:
        from patterndsl import binding

        bound = binding.bind(
            pir, given, inputs.kv_len, inputs.heads, inputs.head_dim, inputs.batch, q.device, "attention()"
        )
        data = bound.ordered()
    v_dim = v.shape[3]
    if v_dim != inputs.head_dim:
        # A value head size of its own (as SDPA allows, e.g. MLA): zero columns appended to the
        # narrower side change neither the scores nor the output's first v_dim columns, so every
        # backend runs one head size; the pad and the slice carry the gradients back.
        width = max(v_dim, inputs.head_dim)
        q, k, v = (torch.nn.functional.pad(t, (0, width - t.shape[3])) for t in (q, k, v))
    key = _plan_key(pir, inputs.backend)
    out, lse = op.attention_fwd(q, k, v, key, data, inputs.scale, inputs.backend)
    if out.shape[3] != v_dim:
        out = out[..., :v_dim]
    return (out, lse) if return_lse else out


def heads_last(q, k, v, pattern, scale=None, **inputs):
    """``attention(q, k, v, pattern, scale=scale, **inputs).transpose(1, 2).contiguous()``: the output as
    ``[batch, Lq, heads, head_dim]`` (what ``transformers``' attention functions return), without copies.

    An eager call that needs no gradient and reads no run-time input runs the op's implementation
    directly (the dispatcher and autograd wrappers are a measurable part of a small prefill on CPU)
    and keeps the layout the executor wrote: torch's fused CPU kernel, which plain ``causal`` and
    ``full`` patterns run, writes ``[B, Lq, H, D]`` memory, so the transpose is free, as it is after
    SDPA. Everything else (gradients, ``torch.compile``, inputs, a value head size of its own) goes
    through :func:`attention`.
    """
    pir = getattr(pattern, "ir", None)
    grad = torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, v))
    direct = isinstance(pir, ir.PatternIR) and not (grad or inputs or pir.inputs or torch.compiler.is_compiling())
    if direct:
        sizes = validate.check_inputs(q, k, v, scale, "auto")
        direct = sizes.backend == "cpu" and v.shape[3] == sizes.head_dim
    if not direct:
        return attention(q, k, v, pattern, scale=scale, inputs=inputs).transpose(1, 2).contiguous()
    from patterndsl.runtime.cpu import dense

    out = dense.direct(q, k, v, pir, sizes.scale)
    if out is not None:
        return out.transpose(1, 2).contiguous()
    out, _ = op.forward_impl(q, k, v, _plan_key(pir, "cpu"), [], sizes.scale, "cpu", contiguous=False)
    return out.transpose(1, 2).contiguous()


def _ragged(q, k, v, pir, scale, return_lse, backend, given, kv_lengths, q_lengths, block_table):
    """A call with per-element lengths or a paged cache (:mod:`patterndsl.runtime.decode`)."""
    out, lse = decode.call(q, k, v, pir, scale, backend, given, kv_lengths, q_lengths, block_table, _plan_key)
    return (out, lse) if return_lse else out


__all__ = ["attention", "heads_last"]
