"""Runtime stage: the per-call tile lists of ``route(...)`` patterns on the Triton backend.

Comes in: the block plan of a pattern with ``route`` (tiles marked 3 where the
data decides), its :class:`~patterndsl.codegen.KernelSpec` and this call's
``q`` and ``k``. Goes out: per head group the CSR lists the generated kernels
walk (rows and their transpose, partial tiles first, one list per batch element
and key-value head laid end to end) and the int32 run-time table ``RT`` holding
the choice. The choice is made from ``q`` and ``k``
(:mod:`patterndsl.runtime.routing`) and merged with the static tiles
(:func:`patterndsl.runtime.dynamic.kernel_lists`); the kernels are the same
family as for static patterns (:mod:`patterndsl.runtime.triton_backend`
launches them). The backward pass makes the same (deterministic) choice again;
no gradient flows through it.
"""

from __future__ import annotations

import torch

from patterndsl.codegen import routes
from patterndsl.runtime import dynamic, triton_backend


def _transpose(ptr: torch.Tensor, cols: torch.Tensor, nqt: int, nkt: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Row lists (segment lst * nqt + m holds key tiles n) -> column lists (segment lst * nkt + n holds
    # query tiles m), as an entry order and the column segments' starts.
    outer = torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr[1:] - ptr[:-1])
    lst, m = outer // nqt, outer % nqt
    segment = lst * nkt + cols
    order = torch.argsort(segment * nqt + m, stable=True)
    col_ptr = torch.zeros((ptr.numel() - 1) // nqt * nkt + 1, dtype=torch.int64)
    col_ptr[1:] = torch.cumsum(torch.bincount(segment, minlength=col_ptr.numel() - 1), 0)
    return order, col_ptr, m


def run_time_lists(plan, spec, q: torch.Tensor, k: torch.Tensor, prepared: list) -> tuple[list, torch.Tensor]:
    """This call's tile lists and run-time table for the kernels of ``spec``.

    Args:
        plan: the block plan (the tiles ``spec`` was made for).
        spec: its kernel spec (``run_time_lists`` set).
        q, k: this call's inputs (the choice is made from them).
        prepared: per head group ``[heads]`` as :func:`triton_backend.prepared` holds it.

    Returns:
        ``(groups, rt)``: per head group ``row_ptr, row_split, row_cols, col_ptr, col_split, col_rows,
        heads`` (int32 on ``q``'s device; segment ``lst * NQT + m`` / ``lst * NKT + n``) and ``RT``.
    """
    dp = dynamic.dynamic_plan(plan)
    selections = dynamic.select_all(dp, q, k)
    lists = dynamic.kernel_lists(dp, selections, q.shape[0], k.shape[1])
    nqt, nkt = plan.n_q_tiles, plan.n_kv_tiles
    groups = []
    for (row_ptr, cols, state), (heads,) in zip(lists, prepared, strict=True):
        # Lists are laid end to end, so their row pointers join into one CSR over (list, query tile).
        ptr = torch.cat([row_ptr[:, :-1].reshape(-1), row_ptr[-1, -1:]])
        rows = triton_backend.split_lists(ptr, cols, triton_backend.row_full(plan, cols, state))
        order, col_ptr, m = _transpose(ptr, cols, nqt, nkt)
        tcols = triton_backend.split_lists(col_ptr, m[order], state[order] == 2)
        groups.append([t.to(q.device) for t in (*rows, *tcols)] + [heads])
    chosen = {p: selections[p].chosen for p in spec.route_list}
    rt = routes.run_time_table(spec.route_list, spec.layout, spec.q_len, spec.kv_len, chosen)
    return groups, rt.to(q.device)
