"""Stage 5 (codegen): the passes a block plan runs as on Triton, each with the tiles its kernels are built for.

Comes in: a :class:`~patterndsl.analysis.plan.BlockPlan` (possibly one that runs as parts with their own
token orders and tile shapes, :mod:`patterndsl.analysis.parts`) and the launch table's tiles for one kernel
(:func:`patterndsl.codegen.launch.launch`). Goes out: the plans the kernels walk, one per pass: the plan
itself at the launch tiles, or each part at tiles that keep the part's own shape where the launch table
allows it (:func:`patterndsl.codegen.launch.fit_tiles`: each side the smaller of the part's and the row's,
so a part's thin 16-row or 16-key tiles stay thin on every target) in the part's own token order. The
runtime merges the passes by log-sum-exp (:mod:`patterndsl.runtime.combine`) exactly as on the CPU.

Why here and not in the runtime: ``kernel_source``/``show --stage triton|ptx|sass`` and the AOT builds must
show exactly what the launcher runs, so both ask this module.
"""

from __future__ import annotations

import dataclasses

from patterndsl.codegen.launch import fit_tiles


def tiles_for(plan, tiles: tuple[int, int] | None) -> tuple[int, int] | None:
    """The tiles one pass runs with.

    Args:
        plan: a whole plan or a part (``plan.candidate`` set: it was planned in its own order and shape).
        tiles: the launch table's tiles, or None (the interpreter: any plan's tiles run there).

    Returns:
        ``tiles`` for a whole plan; for a part, its own shape fitted into ``tiles``; None for None.
    """
    if tiles is None:
        return None
    return fit_tiles(tiles, plan.block) if plan.candidate is not None else tuple(tiles)


def fitted(plan, tiles: tuple[int, int] | None):
    """``plan`` re-planned at :func:`tiles_for` (itself when they are its tiles), a part in its own order.

    Args:
        plan: a whole plan or a part.
        tiles: the launch table's tiles, or None.

    Returns:
        A :class:`~patterndsl.analysis.plan.BlockPlan` with those tiles (``candidate`` kept for a part).
    """
    tiles = tiles_for(plan, tiles)
    if tiles is None or tiles == plan.block:
        return plan
    from patterndsl import analysis

    if plan.candidate is None:
        order = "identity" if plan.is_identity_order else "auto"
        return analysis.plan(plan.pattern, plan.q_len, plan.kv_len, plan.heads, block=tiles, order=order)
    again = analysis.plan(
        plan.pattern, plan.q_len, plan.kv_len, plan.heads, block=tiles, order="auto", orders=[plan.candidate]
    )
    return dataclasses.replace(again, candidate=plan.candidate)


def passes(plan) -> tuple:
    """The plans the launcher runs for ``plan``: its parts when it splits, else the plan alone."""
    return plan.parts or (plan,)
