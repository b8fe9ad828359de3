"""Runtime stage: the call-time plan of a pattern with run-time inputs, cached per input tensor version.

Comes in: the static :class:`~patterndsl.analysis.plan.BlockPlan` of a pattern that reads
inputs (tiles the data decides are 3) and the op's ``data`` list (the input tensors in
declaration order). Goes out: the exact :class:`~patterndsl.analysis.inputplan.InputPlan` for
that data. Every layer of a model calls attention with the same input tensors in one step, so
the plan is kept per (plan, tensors): a tensor is the same while it is the same object (held by
weak reference, so a new tensor that reuses freed memory is never mistaken for it) at the same
``_version`` (bumped by every in-place write), data pointer and shape.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch

from patterndsl import binding
from patterndsl.analysis import inputplan
from patterndsl.analysis.plan import BlockPlan
from patterndsl.errors import InputError

_LOCK = threading.Lock()
_CACHE: OrderedDict = OrderedDict()
#: Call-time plans kept (one step of a model uses one or a few).
MAX_PLANS = 8


def _signature(t: torch.Tensor) -> tuple:
    return (id(t), t._version, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def inputs_of(plan: BlockPlan, data: list[torch.Tensor], batch: int) -> binding.Inputs:
    """The op's ``data`` list as validated :class:`~patterndsl.binding.Inputs` of ``plan``'s pattern.

    Raises:
        InputError: when the list does not hold one tensor per declared input.
    """
    decls = plan.pattern.inputs
    if len(data) != len(decls):
        names = ", ".join(d.name for d in decls)
        raise InputError(f"pattern '{plan.pattern.name}' takes {len(decls)} run-time inputs ({names}), got {len(data)}")
    given = {d.name: t for d, t in zip(decls, data, strict=True)}
    return binding.bind(plan.pattern, given, plan.kv_len, plan.heads, batch=batch, who="attention")


def call_plan(plan: BlockPlan, data: list[torch.Tensor], batch: int) -> inputplan.InputPlan:
    """The exact plan of ``plan``'s pattern for these input tensors (cached per tensor version).

    Args:
        plan: the static plan (identity order) of a pattern that reads inputs.
        data: the input tensors in declaration order.
        batch: the batch size of the call.

    Returns:
        The :class:`~patterndsl.analysis.inputplan.InputPlan`.
    """
    key = (id(plan), batch, tuple(_signature(t) for t in data))
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0]() is plan and all(r() is t for r, t in zip(entry[1], data, strict=True)):
            _CACHE.move_to_end(key)
            return entry[2]
    out = inputplan.call_plan(plan, inputs_of(plan, data, batch))
    with _LOCK:
        _CACHE[key] = (weakref.ref(plan), [weakref.ref(t) for t in data], out)
        while len(_CACHE) > MAX_PLANS:
            _CACHE.popitem(last=False)
    return out


def clear() -> None:
    """Forget every cached call-time plan."""
    with _LOCK:
        _CACHE.clear()
