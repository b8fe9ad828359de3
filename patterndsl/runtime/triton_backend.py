"""Runtime stage: launching the generated Triton kernels for a block plan.

Comes in: ``q [B, H, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]`` (``Hkv`` divides
``H``) on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``, and the
:class:`~patterndsl.analysis.plan.BlockPlan` for ``(Lq, Lk, H)``. Goes out:
``forward -> (out [B, H, Lq, D] in q.dtype, lse [B, H, Lq] float32)`` and
``backward -> (dq, dk, dv)``. The kernels come from
:mod:`patterndsl.codegen` through :mod:`patterndsl.kernel_cache`; the plan's
tile lists (partial tiles first, then full) and the ``random`` tables are
turned into small int32/int8 device tensors once per plan and device. A plan
with ``route(...)`` or run-time inputs runs the same kernels on lists made at every call
(:mod:`patterndsl.runtime.triton_route`, :mod:`patterndsl.runtime.triton_inputs`).
"""

from __future__ import annotations

import torch

from patterndsl import config, kernel_cache
from patterndsl.codegen import generator, passes
from patterndsl.codegen import score as score_code
from patterndsl.codegen.launch import launch_tiles
from patterndsl.errors import BackendError
from patterndsl.runtime import triton_finite, validate
from patterndsl.runtime.plans import per_plan


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Every output buffer comes from here, so tests can poison them (fill with NaN) before a launch.
    return torch.empty(*shape, dtype=dtype, device=device)


def target_of(device: torch.device) -> str:
    """The codegen target for tensors on ``device``: ``"sm_XY"`` on CUDA, ``"interpret"`` on the CPU.

    Args:
        device: where the inputs live.

    Returns:
        The target name.

    Raises:
        BackendError: for CPU tensors without ``TRITON_INTERPRET=1``, or other devices.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    if device.type == "cpu":
        if not config.triton_interpret():
            raise BackendError(
                "the Triton backend needs CUDA tensors; CPU tensors run under it only with TRITON_INTERPRET=1"
            )
        return "interpret"
    raise BackendError(f"the Triton backend cannot run on device {device}")


def split_lists(ptr: torch.Tensor, idx: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Reorder each segment of a CSR list so partial entries come first.

    Args:
        ptr: int64 ``[n + 1]`` segment starts; idx: the entries; full: bool per entry.

    Returns:
        int32 ``(ptr, split, values)``: ``split[s]`` is the first full entry of segment ``s``.
    """
    n_outer = ptr.numel() - 1
    outer = torch.repeat_interleave(torch.arange(n_outer), ptr[1:] - ptr[:-1])
    order = torch.argsort(outer * 2 + full.to(torch.int64), stable=True)
    n_partial = torch.bincount(outer[~full], minlength=n_outer)
    split = ptr[:-1] + n_partial
    values = idx[order]
    if values.numel() == 0:
        values = torch.zeros(1, dtype=torch.int64)  # a kernel argument needs storage; never read
    return ptr.to(torch.int32), split.to(torch.int32), values.to(torch.int32)


def row_full(plan, cols: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Which entries of a row list run unmasked: full tiles, except the last key tile when ``Lk % BN``
    (its padded columns must not join the softmax)."""
    tail = plan.kv_len % plan.block_n != 0
    return (state == 2) & ~((cols == plan.n_kv_tiles - 1) & tail)


def _build(plan, spec, device: torch.device) -> dict:
    groups = []
    for group in plan.groups:
        heads = torch.tensor(group.heads, dtype=torch.int32)
        if spec.run_time_lists:
            groups.append([heads.to(device)])  # the lists come with every call
            continue
        tl_ = group.tiles
        rows = split_lists(tl_.row_ptr, tl_.cols, row_full(plan, tl_.cols, tl_.state))
        cols = split_lists(tl_.col_ptr, tl_.rows, tl_.state_t == 2)
        groups.append([t.to(device) for t in (*rows, *cols, heads)])
    _, aux = generator.aux_tables(spec)
    q_order = plan.q_order.to(device=device, dtype=torch.int32)
    kv_order = plan.kv_order.to(device=device, dtype=torch.int32)
    rt = torch.zeros(1, dtype=torch.int32, device=device)
    return {"groups": groups, "aux": aux.to(device), "q_order": q_order, "kv_order": kv_order, "rt": rt}


def prepared(plan, spec, device: torch.device) -> dict:
    """Device tensors of a plan: per group ``row_ptr, row_split, row_cols, col_ptr, col_split, col_rows,
    heads`` (int32; only ``heads`` for run-time lists), the ``aux`` int8 tables, the int32 orders and an
    empty run-time table ``rt``; built once per plan, spec and device."""
    return per_plan(plan, ("prepared", spec.key, str(device)), lambda: _build(plan, spec, device))


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels index the head dim with unit stride; other strides are passed as arguments.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _spec(plan, kind: str, head_dim: int, dtype: torch.dtype, kv_heads: int, target: str):
    # make_spec prints sympy bounds and checks the plan; do it once per plan and launch facts.
    return per_plan(
        plan,
        ("spec", kind, head_dim, dtype, kv_heads, target),
        lambda: generator.make_spec(plan, kind, head_dim, dtype, kv_heads, target),
    )


def _tiled(plan, tiles: tuple[int, int] | None):
    # GPU kernels are built with the tiles launch_tiles chose for them (zero spills, shared memory within
    # the target's limit); the plan they run must use the same tiles, and a part keeps its own token order
    # and, where the row allows, its own tile shape (codegen.passes). Re-planned once per plan and tiles.
    tiles = passes.tiles_for(plan, tiles)
    if tiles is None or tiles == plan.block:
        return plan
    return per_plan(plan, ("tiled", tiles), lambda: passes.fitted(plan, tiles))


def _setup(q, k, v, plan, kind: str, data=None):
    validate.check_call(q, k, v, "triton", plan)
    target = target_of(q.device)
    run_time = generator.per_call(plan.pattern)
    dtype = generator.DTYPES.get(q.dtype, "float16")
    tables = score_code.has_tables(getattr(plan.pattern, "score", None))
    plan = _tiled(plan, launch_tiles(q.shape[3], target, kind, dtype, run_time, tables, not plan.is_identity_order))
    spec = _spec(plan, kind, q.shape[3], q.dtype, k.shape[1], target)
    module = kernel_cache.load(spec, generator.render)
    prep = prepared(plan, spec, q.device)
    if spec.run_time_lists and q.numel() and k.numel():
        # (Nothing runs for a zero batch: the callers return empty outputs before reading the lists.)
        prep = dict(prep)
        if spec.inputs:
            from patterndsl.runtime import triton_inputs

            prep["groups"], prep["rt"] = triton_inputs.run_time_lists(plan, spec, q, data or [], prep["groups"])
        else:
            from patterndsl.runtime import triton_route

            prep["groups"], prep["rt"] = triton_route.run_time_lists(plan, spec, q, k, prep["groups"])
    return plan, spec, module, prep


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, scale: float, data=None):
    """Attention forward through the generated kernels.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (same dtype and device).
        plan: the block plan for ``(Lq, Lk, H)``.
        scale: the softmax scale.
        data: the pattern's run-time input tensors in declaration order (LANGUAGE.md section 7).

    Returns:
        ``(out [B, H, Lq, D] in q.dtype, lse [B, H, Lq] float32)``; a row with no allowed key
        has ``out = 0`` and ``lse = -inf``. A non-finite query, key or value reaches exactly the
        rows that read it (:mod:`patterndsl.runtime.triton_finite`).
    """
    q, k, v = (_rows_contiguous(t) for t in (q, k, v))
    plan, spec, module, prep = _setup(q, k, v, plan, "forward", data)
    b, h, lq, d = q.shape
    out = _empty(b, h, lq, d, dtype=q.dtype, device=q.device)
    lse = _empty(b, h, lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[2] == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    fix = None
    if not triton_finite.all_finite(q, k, v):
        # The route lists above were chosen from the original keys; the kernels read cleaned copies.
        fix = triton_finite.rows_to_fix(plan, q, k, v)
        q0, k0, v0 = q, k, v
        q, k, v = (triton_finite.clean(t) for t in (q, k, v))
    for g, group in enumerate(plan.groups):
        row_ptr, row_split, row_cols, _, _, _, heads = prep["groups"][g]
        grid = (plan.n_q_tiles, b * len(group.heads))
        getattr(module, f"fwd_g{g}")[grid](
            q, k, v, out, lse, prep["q_order"], prep["kv_order"], row_ptr, row_split, row_cols, heads, prep["aux"],
            prep["rt"], float(scale), *_strides(q), *_strides(k), *_strides(v),
            num_warps=spec.num_warps, num_stages=spec.num_stages,
        )  # fmt: skip
    if fix is not None:
        triton_finite.forward_rows(q0, k0, v0, plan, scale, fix, out, lse, data=data)
    return out, lse


def backward(q, k, v, out, lse, dout, plan, scale: float, dlse=None, data=None):
    """Attention backward through the generated kernels.

    Args:
        q, k, v: the forward inputs; out, lse: the forward outputs; dout: ``dL/dout``.
        plan: the block plan used in the forward pass.
        scale: the softmax scale.
        dlse: optional ``dL/dlse`` ``[B, H, Lq]``; since ``dlse/ds = P`` it folds into
            ``delta`` (``delta - dlse``).
        data: the run-time input tensors, as in :func:`forward`.

    Returns:
        ``(dq, dk, dv)`` with the dtypes and shapes of ``q``, ``k``, ``v`` (and, when the score reads
        float inputs, the list of their gradients in declaration order); rows with no
        allowed key contribute nothing (never NaN), and a non-finite input or gradient reaches
        exactly the gradients of the pairs that read it (:mod:`patterndsl.runtime.triton_finite`).
    """
    q, k, v, dout = (_rows_contiguous(t) for t in (q, k, v, dout))
    plan, spec, module, prep = _setup(q, k, v, plan, "backward", data)
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    dq = _empty(b, h, lq, d, dtype=q.dtype, device=q.device)
    if q.numel() == 0 or lk == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    out = out.contiguous()
    fix = None
    # lse is -inf on rows with no allowed key: only NaN and +inf are not what the forward gives.
    if not triton_finite.all_finite(q, k, v, dout, out, lse.masked_fill(lse == float("-inf"), 0.0), dlse):
        extra = triton_finite.non_finite_rows(out, lse, dout, dlse)
        fix = triton_finite.rows_to_fix(plan, q, k, v, extra)
        originals = (q, k, v, out, lse, dout, dlse)
        q, k, v, out, lse, dout, dlse = triton_finite.backward_inputs(*originals, fix)
    lse = lse.to(torch.float32).contiguous()
    delta = _empty(b, h, lq, dtype=torch.float32, device=q.device)
    dk_heads = _empty(b, h, lk, d, dtype=torch.float32, device=q.device)
    dv_heads = _empty(b, h, lk, d, dtype=torch.float32, device=q.device)
    launch = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    module.bwd_preprocess[(plan.n_q_tiles, b * h)](out, dout, delta, *_strides(dout), **launch)
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(dout))
    # Float inputs the score reads get their gradients in DTAB (float32, laid out as RT), by atomic adds.
    tables = spec.score is not None and bool(spec.score.partials)
    dtab = torch.zeros(prep["rt"].numel() if tables else 1, dtype=torch.float32, device=q.device)
    for g, group in enumerate(plan.groups):
        row_ptr, row_split, row_cols, col_ptr, col_split, col_rows, heads = prep["groups"][g]
        slots = b * len(group.heads)
        getattr(module, f"bwd_dq_g{g}")[(plan.n_q_tiles, slots)](
            q, k, v, dout, lse, delta, dq, prep["q_order"], prep["kv_order"], row_ptr, row_split, row_cols, heads,
            prep["aux"], prep["rt"], dtab, float(scale), *common, **launch,
        )  # fmt: skip
        getattr(module, f"bwd_dkdv_g{g}")[(plan.n_kv_tiles, slots)](
            q, k, v, dout, lse, delta, dk_heads, dv_heads, prep["q_order"], prep["kv_order"], col_ptr, col_split,
            col_rows, heads, prep["aux"], prep["rt"], float(scale), *common, **launch,
        )  # fmt: skip
    fixed = None
    if fix is not None:
        # The exact rows' share of the float inputs' gradients (the kernels gave those rows P = 0).
        fixed = triton_finite.table_accumulators(spec.inputs, data) if tables else None
        triton_finite.backward_rows(*originals, plan, scale, fix, dq, dk_heads, dv_heads, data=data, tables=fixed)
    group_size = h // hk
    dk = dk_heads.view(b, hk, group_size, lk, d).sum(2).to(k.dtype)
    dv = dv_heads.view(b, hk, group_size, lk, d).sum(2).to(v.dtype)
    if tables:
        from patterndsl.runtime import triton_inputs

        grads = triton_inputs.table_grads(spec, list(data), dtab, b)
        if fixed:
            grads = [g + extra for g, extra in zip(grads, fixed.values(), strict=True)]
        return dq, dk, dv, grads
    return dq, dk, dv
