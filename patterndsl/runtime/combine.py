"""Runtime stage: attention over disjoint parts of a pattern, one pass each, merged by log-sum-exp.

Comes in: per part, a pass that runs attention over the part's pairs alone (forward: returns
``(out, lse)``; backward: returns ``(dq, dk, dv)`` computed from the *merged* ``out`` and ``lse``).
Goes out: the merged ``(out, lse)`` and the summed gradients. Static parts with token orders of
their own (``BlockPlan.parts``) use it, and so can any mix of passes over disjoint key sets (a
static part and a part sorted at call time).

Why the backward needs no per-part outputs: over the union of disjoint parts a row's softmax is
``P = exp(s - lse)`` with the merged ``lse``, and ``delta = rowsum(dO * O) - dlse`` is the merged
row's. A part's ordinary flash backward, given the merged ``out`` and ``lse``, therefore computes
exactly its own pairs' share of ``dQ``, ``dK`` and ``dV``, and the shares add.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from patterndsl.runtime.softmax import merge_into


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(passes: Iterable[Callable[[], tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run each part's forward and merge them: softmax over the union of the parts' keys.

    Args:
        passes: one callable per part returning ``(out [..., L, D], lse [..., L])`` for that part
            alone (0 / ``-inf`` on rows it does not touch); at least one.

    Returns:
        ``(out, lse)``: ``out`` in the first pass's dtype, ``lse`` in float32 (float64 for float64),
        merged in that precision.
    """
    out = lse = None
    dtype = None
    for run in passes:
        o, m = run()
        if out is None:
            dtype = o.dtype
            out, lse = o.to(_accumulator(dtype), copy=True), m.to(_accumulator(dtype), copy=True)
        else:
            merge_into(out, lse, o, m)
    if out is None:
        raise ValueError("combine.forward needs at least one pass")
    return out.to(dtype), lse


def backward(passes: Iterable[Callable[[], tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    """Run each part's backward (on the merged ``out`` and ``lse``) and add the gradients.

    Args:
        passes: one callable per part returning its gradients (e.g. ``(dq, dk, dv)``), each computed
            by the part's ordinary backward from the merged ``out``, ``lse``, ``dout`` and ``dlse``.

    Returns:
        The sums, each in the dtype of the first pass's gradient, accumulated in float32 at least.
    """
    total: list[torch.Tensor] | None = None
    dtypes: list[torch.dtype] = []
    for run in passes:
        grads = run()
        if total is None:
            dtypes = [g.dtype for g in grads]
            total = [g.to(_accumulator(g.dtype), copy=True) for g in grads]
        else:
            for acc, g in zip(total, grads, strict=True):
                acc.add_(g.to(acc.dtype))
    if total is None:
        raise ValueError("combine.backward needs at least one pass")
    return tuple(t.to(d) for t, d in zip(total, dtypes, strict=True))
