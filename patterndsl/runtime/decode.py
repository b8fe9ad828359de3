"""Runtime stage: the per-call path of ragged and paged calls (LANGUAGE.md section 9, issue 14).

Comes in: what ``attention(..., kv_lengths=, q_lengths=, block_table=)`` was given. Goes out:
``(out, lse)`` from the ragged op (:mod:`patterndsl.runtime.ragged`) or, for patterns it does not
serve, from the ordinary op element by element.

A decoding step repeats the same call many times (every layer, every step, with new lengths), so
what can be decided from the tensors' kinds, shapes, dtypes and devices alone -- the validation, the
scale, the backend and which path runs -- is decided once per such signature and kept
(:data:`MAX_CHECKED` signatures); the lengths' values are checked at every call inside the op. A call
that needs no gradient and is not being traced by ``torch.compile`` calls the op's implementation
directly (the op's dispatcher and autograd wrappers cost more than a small decoding step).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from patterndsl import ir, tensors
from patterndsl.errors import InputError, PatternError
from patterndsl.runtime import op, ragged, validate

#: Call signatures whose checks are kept.
MAX_CHECKED = 256
_LOCK = threading.Lock()
_CHECKED: OrderedDict = OrderedDict()


@dataclass(frozen=True)
class Checked:
    """What a validated signature decided: the scale, the backend, and the op key (ragged or per element)."""

    scale: float
    backend: str
    key: str
    per_element: bool


def _meta(t):
    # A tensor's shape is a torch.Size, hashable as it is; anything else's is made a tuple.
    return None if t is None else (type(t), t.shape if type(t) is torch.Tensor else tuple(t.shape), t.dtype, t.device)


def _signature(pir, q, k, v, scale, backend, kv_lengths, q_lengths, block_table):
    """A hashable summary of everything the checks read, or None (a value that is not a tensor: full checks)."""
    try:
        return (
            pir, type(scale), scale, backend,
            _meta(q), _meta(k), _meta(v), _meta(kv_lengths), _meta(q_lengths), _meta(block_table),
        )  # fmt: skip
    except (AttributeError, TypeError):
        return None


def _check(q, k, v, pir, scale, backend, block_table, plan_key) -> Checked:
    if block_table is None:
        sizes = validate.check_inputs(q, k, v, scale, backend)
    else:
        named = {"q": q, "k": k, "v": v}
        tensors.check_kinds(named)
        resolved = validate.resolve_backend(backend, q.device)
        tensors.check_dtypes(named, validate.dtypes_of(resolved), f"the {resolved} backend")
        ragged.check_paged(q, k, v)
        sizes = validate.check_inputs(q, q, q, scale, backend)
    if v.shape[3] != q.shape[3]:
        raise PatternError("kv_lengths=/block_table= need v's head size equal to q's for now")
    dynamic = any(ir.is_dynamic(r.node) for r in pir.heads) or (pir.default is not None and ir.is_dynamic(pir.default))
    if sizes.backend == "triton":
        # The ragged kernels read lengths and tables for patterns of positions only (no score).
        dynamic = dynamic or not ragged.position_only(pir)
    # route(...) chooses from the element's own queries and keys, and neither the ragged tile loop nor the
    # ragged kernels apply a score or read run-time inputs yet: each element then runs alone on its unpadded
    # problem (its inputs sliced to its own lengths, :func:`element_inputs`).
    per_element = dynamic or pir.score is not None or bool(pir.inputs)
    key = plan_key(pir, sizes.backend) if per_element else _ragged_key(pir, block_table is not None)
    return Checked(sizes.scale, sizes.backend, key, per_element)


def _ragged_key(pir: ir.PatternIR, paged: bool) -> str:
    return ragged.register(pir, ragged.BLOCK, paged)


# Pure Python on the pattern: torch.compile evaluates it once at trace time (see runtime._plan_key).
_ragged_key._dynamo_marked_constant = True


def call(q, k, v, pir, scale, backend, given, kv_lengths, q_lengths, block_table, plan_key):
    """``(out, lse)`` of a ragged or paged call (see the module docstring).

    Args:
        q, k, v, scale, backend: as ``attention``.
        pir: the pattern's IR.
        given: the run-time inputs given (LANGUAGE.md section 7): each element reads its own row of a batched
            input and the first ``kv_lengths[b]`` entries of a ``token`` dimension.
        kv_lengths, q_lengths, block_table: LANGUAGE.md section 9.
        plan_key: ``(pir, backend) -> key`` of the ordinary op (for patterns run element by element).

    Raises:
        InputError, PatternError, BackendError: as ``attention``, naming the argument.
    """
    compiling = torch.compiler.is_compiling()
    sig = None if compiling else _signature(pir, q, k, v, scale, backend, kv_lengths, q_lengths, block_table)
    checked = None
    if sig is not None:
        with _LOCK:
            checked = _CHECKED.get(sig)
    if checked is None:
        checked = _check(q, k, v, pir, scale, backend, block_table, plan_key)
        data = ragged.check_call(q, k, v, kv_lengths, q_lengths, block_table)
        if sig is not None:
            with _LOCK:
                _CHECKED[sig] = checked
                while len(_CHECKED) > MAX_CHECKED:
                    _CHECKED.popitem(last=False)
    else:
        data = ragged.call_data(q, k, kv_lengths, q_lengths, block_table)
    if checked.per_element:
        step = _route_step(q, k, v, pir, checked, data, given, compiling)
        if step is not None:
            return step
        bound = _bind(q, k, pir, given, data) if (given or pir.inputs) else None

        def run(qb, kb, vb, b, kv_len):
            inputs = [] if bound is None else element_inputs(bound, b, kv_len)
            return op.attention_fwd(qb, kb, vb, checked.key, inputs, checked.scale, checked.backend)

        return ragged.per_element(q, k, v, data, run, pir)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad or compiling:
        return op.attention_fwd(q, k, v, checked.key, data, checked.scale, checked.backend)
    if checked.backend != "cpu":
        q, k, v = op.unit_stride(q, k, v)  # (the CPU loop applies it where it runs torch's kernels)
    return ragged.forward_op(q, k, v, checked.key, data, checked.scale, checked.backend)


def _route_step(q, k, v, pir, checked, data, given, compiling):
    """A decoding step of a ``route(...)`` pattern over a :class:`~patterndsl.PagedKVCache`'s own pages: scored
    from the block summaries the cache keeps (:mod:`patterndsl.runtime.route_decode`; on Triton the ragged split-K
    kernels run with that choice), or None."""
    from patterndsl.runtime import route_decode

    if (
        len(data) < 3
        or checked.backend not in ("cpu", "triton")
        or compiling
        or given
        or q.shape[2] > route_decode.MAX_ROWS
    ):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if not route_decode.serves(pir):
        return None
    from patterndsl import kvcache

    cache = kvcache.owner(k, v, data[0].tolist())
    if cache is None or cache.pattern.ir != pir or cache.summaries is None:
        return None
    if q.dtype == torch.float64 and cache.summaries.dtype != torch.float64:
        return None  # the scores would pool float64 queries against float32 summaries
    if checked.backend == "triton":
        return route_decode.forward_triton(
            q, k, v, pir, data, checked.scale, cache.summaries, cache_finite=cache.finite
        )
    return route_decode.forward(q, k, v, pir, data, checked.scale, cache.summaries)


def _bind(q, k, pir, given, data):
    """The call's run-time inputs, checked. A ``token`` dimension has the padded length ``k.shape[2]``; over a
    paged cache (no padded length) any extent that covers every element's ``kv_lengths`` is taken."""
    from patterndsl import binding

    paged = len(data) > 2
    bound = binding.bind(
        pir, given, None if paged else k.shape[2], q.shape[1], q.shape[3], q.shape[0], q.device, "attention()"
    )
    if paged and q.shape[0]:
        need = int(data[0].max())
        for decl in pir.inputs:
            t = bound.tensors[decl.name]
            lead = t.dim() - len(decl.index_dims)
            for axis, d in enumerate(decl.index_dims):
                if d == "token" and t.shape[lead + axis] < need:
                    raise InputError(
                        f"attention(): input '{decl.name}' ({decl.kind}) has {t.shape[lead + axis]} token entries, but "
                        f"kv_lengths holds {need}: a token dimension must cover every element's keys"
                    )
    return bound


def element_inputs(bound, b: int, kv_len: int) -> list[torch.Tensor]:
    """Batch element ``b``'s inputs in declaration order: its own row of batched inputs, ``token`` dimensions
    cut to its ``kv_len`` keys (so its problem is the unpadded one, LANGUAGE.md sections 7 and 9)."""
    out = []
    for decl, t in zip(bound.decls, bound.element(b).values(), strict=True):
        for axis, d in enumerate(decl.index_dims):
            if d == "token":
                t = t.narrow(axis, 0, kv_len)
        out.append(t)
    return out


def clear() -> None:
    """Forget the kept checks."""
    with _LOCK:
        _CHECKED.clear()
