"""Runtime stage: the per-call tile lists and input table of patterns with run-time inputs on the Triton backend.

Comes in: the static block plan of a pattern that reads inputs (tiles the data decides are 3),
its :class:`~patterndsl.codegen.KernelSpec`, this call's ``q`` and the op's ``data`` list (the
input tensors in declaration order). Goes out: per head group the CSR lists the generated
kernels walk (rows and their transpose, partial tiles first) and the int32 table ``RT`` the
element rule reads the inputs from (:func:`patterndsl.codegen.inputs.pack`).

The lists come from the exact call-time plan (:func:`patterndsl.runtime.inputs.call_plan`,
cached per input tensor version): one list per (batch element, key/value head) ``lst = b * NHK +
hk``, laid end to end as for ``route`` (every key/value head of an element gets the element's
tiles). They and ``RT`` are kept with the call-time plan, so the layers of a model that share
the inputs build them once per device and spec.
"""

from __future__ import annotations

import torch

from patterndsl.codegen import inputs as codegen_inputs
from patterndsl.runtime import inputs, triton_backend


def _lists(dense: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 ``(ptr, split, entries)`` of the non-empty tiles of every segment (row) of ``dense``.

    ``dense`` ``[segments, width]`` holds int8 tile states, ``full`` which of them run unmasked.
    Partial entries come first in each segment, by index, then the full ones (``split[s]`` is the
    first full entry), as :func:`triton_backend.split_lists` orders them. Built without reading a
    size back to the host (on CUDA): every segment is sorted in place and the entries are
    gathered with a static capacity (``nonzero_static``); the padding past ``ptr[-1]`` is never read.
    """
    segments, width = dense.shape
    rank = torch.where(dense == 0, 2, full.to(torch.int8)).to(torch.int8)
    order = torch.sort(rank, dim=1, stable=True).indices
    counts = (dense != 0).sum(1)
    ptr = torch.zeros(segments + 1, dtype=torch.int64, device=dense.device)
    ptr[1:] = torch.cumsum(counts, 0)
    split = ptr[:-1] + ((dense != 0) & ~full).sum(1)
    kept = torch.arange(width, device=dense.device) < counts[:, None]
    at = torch.nonzero_static(kept.reshape(-1), size=max(kept.numel(), 1), fill_value=0).reshape(-1)
    entries = order.reshape(-1)[at] if kept.numel() else at
    return ptr.to(torch.int32), split.to(torch.int32), entries.to(torch.int32)


def _group_lists(plan, states: torch.Tensor, kv_heads: int) -> list[torch.Tensor]:
    # states: int8 [batch, nqb, nkb] of one head group -> row and column lists per lst.
    batch, nqb, nkb = states.shape
    per_list = states[:, None].expand(batch, kv_heads, nqb, nkb).reshape(batch * kv_heads, nqb, nkb)
    rows = per_list.reshape(-1, nkb)
    cols = torch.arange(nkb, device=states.device).expand_as(rows)
    by_row = _lists(rows, triton_backend.row_full(plan, cols, rows))
    by_col = per_list.transpose(1, 2).reshape(-1, nqb)
    return [*by_row, *_lists(by_col, by_col == 2)]


def run_time_lists(plan, spec, q: torch.Tensor, data: list, prepared: list) -> tuple[list, torch.Tensor]:
    """This call's tile lists and input table for the kernels of ``spec``.

    Args:
        plan: the static block plan (the tiles ``spec`` was made for).
        spec: its kernel spec (``inputs`` set).
        q: this call's queries (batch size and device).
        data: the input tensors in declaration order.
        prepared: per head group ``[heads]`` as :func:`triton_backend.prepared` holds it.

    Returns:
        ``(groups, rt)``: per head group ``row_ptr, row_split, row_cols, col_ptr, col_split, col_rows,
        heads`` (int32 on ``q``'s device; segment ``lst * NQT + m`` / ``lst * NKT + n``) and ``RT``.
    """
    batch = q.shape[0]
    exact = inputs.call_plan(plan, list(data), batch)
    kept = vars(exact).setdefault("_triton", {})
    key = (spec.key, str(q.device), batch)
    if key not in kept:
        states = exact.states.expand(batch, -1, -1, -1) if exact.states.shape[0] != batch else exact.states
        groups = []
        for g, (heads,) in enumerate(prepared):
            lists = _group_lists(plan, states[:, g], spec.kv_heads)
            groups.append([t.to(q.device, non_blocking=True) for t in lists] + [heads])
        rt = codegen_inputs.pack(spec.input_layout(), spec.inputs, list(data), batch)
        kept[key] = (groups, rt.to(q.device))
    return kept[key]


def table_grads(spec, data: list, dtab: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The gradients of the pattern's float inputs from the kernels' ``DTAB`` (laid out as ``RT``).

    Args:
        spec: the kernel spec (its input declarations and layout).
        data: the input tensors in declaration order.
        dtab: float32 ``[batch * stride]`` the backward kernels added into.
        batch: the call's batch size.

    Returns:
        One gradient per float input, shaped like its tensor: a shared input (no batch dimension,
        or extent 1) sums over the batch; an input the score does not read gets zeros.
    """
    lay = spec.input_layout()
    per_batch = dtab.view(batch, -1)
    out = []
    for decl, t in zip(spec.inputs, data, strict=True):
        if decl.kind != "float":
            continue
        found = [(ext, off) for name, ext, off in lay.values if name == decl.name]
        if not found:
            out.append(torch.zeros_like(t, dtype=torch.float32))
            continue
        ext, off = found[0]
        grad = per_batch[:, off : off + codegen_inputs.volume(ext)].reshape(batch, *ext)
        batched = decl.batched and t.dim() == len(decl.dims)
        if not batched:
            grad = grad.sum(0)
        elif t.shape[0] != batch:
            grad = grad.sum(0, keepdim=True)
        out.append(grad)
    return out
