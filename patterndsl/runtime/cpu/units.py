"""Runtime stage, CPU executor: what one call runs, as units of (batch slice, schedule) and gathered work.

Comes in: the :class:`BlockPlan`, ``q`` and ``k`` (``route`` decides its tiles from them) and the
executor's :class:`~patterndsl.runtime.cpu.tuning.CpuOptions`. Goes out: units covering every
(batch element, head) once, each a batch slice, the :class:`Schedule` of one head group and
whether it merges into rows an earlier unit wrote, plus, for ``route``, the blocks that run
gathered (:mod:`patterndsl.runtime.cpu.gather`). A static plan runs each head group over the
whole batch with the schedule cached per plan; with ``route`` the static tiles keep their
cached schedule and each (batch element, key-value head) of a dynamic group gets its own,
built at this call from the tile lists :mod:`patterndsl.runtime.dynamic` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.analysis.plan import BlockPlan
from patterndsl.errors import InputError
from patterndsl.runtime.cpu.schedule import Schedule, derived, idle, schedule, schedules
from patterndsl.runtime.cpu.tuning import CpuOptions


@dataclass(frozen=True)
class Heads:
    """One head group's query heads and the key/value head each reads (None = all, unchanged)."""

    q: list[int] | None
    kv: list[int] | None
    count: int

    @staticmethod
    def of(sched: Schedule, heads: int, group_size: int) -> Heads:
        hs = sched.heads
        if hs == tuple(range(heads)):
            return Heads(None, None if group_size == 1 else kv_heads(hs, group_size), len(hs))
        return Heads(list(hs), kv_heads(hs, group_size), len(hs))


def kv_heads(heads: tuple[int, ...], group_size: int) -> list[int]:
    """The key/value head each query head of ``heads`` reads."""
    return [h // group_size for h in heads]


def _route_static_schedules(plan: BlockPlan, opts: CpuOptions) -> tuple[Schedule, ...]:
    """Schedules of what never depends on the data: static groups, and the static tiles of dynamic groups."""

    def build(plan: BlockPlan) -> tuple[Schedule, ...]:
        from patterndsl.runtime import dynamic

        dp = dynamic.dynamic_plan(plan)
        out = []
        for sched, dg in zip(schedules(plan, opts), dp.groups, strict=True):
            if dg is not None:
                row_ptr, cols, state = dynamic.static_lists(dg, plan)
                segs = schedule(row_ptr, cols, state, plan, dynamic.static_mask_fn(dg, plan), opts)
                sched = Schedule(tuple(dg.group.heads), segs, idle(segs, plan.n_q_tiles))
            out.append(sched)
        return tuple(out)

    return derived(plan, ("route_static", opts.schedule_key()), build)


def _input_units(plan: BlockPlan, q: torch.Tensor, data: list, opts: CpuOptions):
    """Units of a pattern with run-time inputs: one schedule per head group and batch element.

    The call-time plan is cached per input tensors (:mod:`patterndsl.runtime.inputs`), and the
    schedules with it, so the backward pass (and every layer given the same inputs) reuses them.
    When no input has a batch dimension above 1, one schedule serves the whole batch.
    """
    from patterndsl.runtime import inputs
    from patterndsl.runtime.plans import per_plan

    if not data:
        raise InputError(f"pattern '{plan.pattern.name}' needs its run-time inputs at every call")
    cp = inputs.call_plan(plan, data, q.shape[0])

    def build():
        shared = cp.states.stride(0) == 0 or cp.batch == 1
        out = []
        for b in range(1 if shared else cp.batch):
            for g, group in enumerate(plan.groups):
                row_ptr, cols, state = cp.lists(b, g)
                segs = schedule(row_ptr, cols, state, plan, cp.tile_mask(b, g), opts)
                sched = Schedule(tuple(group.heads), segs, idle(segs, plan.n_q_tiles))
                out.append((slice(None) if shared else slice(b, b + 1), sched, False))
        return out

    return per_plan(cp, ("cpu-units", opts.schedule_key()), build), None


def _route_input_units(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, data: list, opts: CpuOptions):
    """Units of a pattern with ``route`` and run-time inputs: one per batch element, head group and kv head."""
    from patterndsl.runtime import route_inputs

    out = []
    for b, heads, (row_ptr, cols, state), mask_fn in route_inputs.call_lists(plan, q, k, data):
        segs = schedule(row_ptr, cols, state, plan, mask_fn, opts)
        out.append((slice(b, b + 1), Schedule(heads, segs, idle(segs, plan.n_q_tiles)), False))
    return out


def units(plan: BlockPlan, q: torch.Tensor, k: torch.Tensor, opts: CpuOptions, data=None):
    """What runs: ``(batch slice, schedule)`` pairs covering every (batch element, head) once, and gathered work.

    A static plan runs each head group over the whole batch. With ``route``, the choice is
    made from ``q`` and ``k`` here and merged with the static tiles
    (:mod:`patterndsl.runtime.dynamic`): each (batch element, key-value head) of a dynamic
    head group gets its own schedule, plus the blocks that run gathered
    (:mod:`patterndsl.runtime.cpu.gather`); static head groups still run over the whole batch.

    Args:
        plan: the block plan; q, k: this call's queries and keys; opts: the executor options.

    Returns:
        ``(units, work)``: units are ``(batch slice, schedule, merge)``, where ``merge`` units add
        to rows earlier units wrote (log-sum-exp merge forward, sums backward); ``work`` is None
        for static plans, else the gathered work items.
    """
    if plan.pattern is not None and getattr(plan.pattern, "inputs", ()):
        from patterndsl.runtime import route_inputs

        if route_inputs.applies(plan):
            return _route_input_units(plan, q, k, data or [], opts), None
        return _input_units(plan, q, data or [], opts)
    if not any(ir.is_dynamic(g.node) for g in plan.groups):
        return [(slice(None), sched, False) for sched in schedules(plan, opts)], None
    from patterndsl.runtime import dynamic
    from patterndsl.runtime.cpu import gather

    dp = dynamic.dynamic_plan(plan)
    selections = dynamic.select_all(dp, q, k)
    # Static head groups and the static tiles of dynamic groups first (they write every row),
    # then the run-time tiles of each (batch element, kv head), merged by log-sum-exp.
    out = [(slice(None), sched, False) for sched in _route_static_schedules(plan, opts)]
    lists = dynamic.tile_lists(dp, selections, q.shape[1] // k.shape[1])
    for item in lists:
        if not item.cols.numel():
            continue
        mask_fn = dynamic.tile_mask_fn(dp, item, selections)
        segs = schedule(item.row_ptr, item.cols, item.state, plan, mask_fn, opts)
        sched = Schedule(item.heads, segs, idle(segs, plan.n_q_tiles))
        out.append((slice(item.batch, item.batch + 1), sched, True))
    return out, gather.plan_work(lists, selections, plan.q_len, plan.block_m)
