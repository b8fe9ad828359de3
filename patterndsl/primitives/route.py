"""The dynamic primitive ``route(topk, block, score, among, qblock)``: its registry record.

Comes in: nothing at import but the registry. Goes out: one registered record.
``route`` is chosen from the data, so it has no static tile rules: the plan
treats it as a set of (query group, key block) pairs (``analysis/engine.py``,
``analysis/routeplan.py``) and the choice itself, its scores and its grouping
live in :mod:`patterndsl.semantics` (``route_blocks``, ``route_selection``).
"""

from __future__ import annotations

import torch

from patterndsl import ir
from patterndsl import semantics as sem
from patterndsl.errors import LayoutError, PatternError
from patterndsl.primitives.common import broadcast_to_axes, param, require
from patterndsl.primitives.registry import Primitive, register
from patterndsl.printer import value_to_source

_BOXES = ("block", "qblock")


def _shape_args(values, spans, layout, span):
    """``qblock`` defaults to ``block``; tuple blocks are boxes of the grid, one entry per axis."""
    if values["qblock"] is None:
        values["qblock"] = values["block"]
        spans["qblock"] = spans["block"]
    if not any(isinstance(values[k], tuple) for k in _BOXES):
        return
    if layout is None:
        bad = next(k for k in _BOXES if isinstance(values[k], tuple))
        raise LayoutError(f"route() argument '{bad}' is a tuple, which needs a layout grid(...)", spans[bad])
    broadcast_to_axes("route", _BOXES, values, spans, layout)


def _check(v, s, layout):
    require(v["topk"] >= 0, f"route topk must be >= 0, got {v['topk']}", s["topk"])
    for key in _BOXES:
        entries = v[key] if isinstance(v[key], tuple) else (v[key],)
        require(all(b >= 1 for b in entries), f"route {key} must be >= 1, got {value_to_source(v[key])}", s[key])
    # A count, like every count of the language: choosing no block allows nothing.
    return ir.EMPTY if v["topk"] == 0 else None


def _meaning(prim, q, k, h, ctx, selection) -> torch.Tensor:
    if selection is None or prim not in selection:
        raise PatternError(
            "route(...) is chosen from the data: pass q= and k= (the attention inputs) to compute its mask",
            prim.span,
        )
    sel = selection[prim].to(q.device)
    i = q - ctx.offset
    # groups and blocks found on each side's own shape (rows [.., BM, 1], keys [.., 1, BN]),
    # then one broadcast lookup in the table
    ic, kc = i.clamp(0, ctx.q_len - 1), k.clamp(0, ctx.kv_len - 1)
    block, qblock = prim.arg("block"), prim.arg("qblock")
    qblock = block if qblock is None else qblock
    if isinstance(block, int) and isinstance(qblock, int):
        # 1-D: the formulas of semantics.route_blocks, without its tables of every position
        a = torch.div(ic + ctx.offset, qblock, rounding_mode="floor") - ctx.offset // qblock
        b = torch.div(kc, block, rounding_mode="floor")
    else:
        _, _, qgroup, kblock = sem.route_blocks(prim, ctx)
        a, b = qgroup.to(q.device)[ic], kblock.to(q.device)[kc]
    return sel[a, b] & ((i >= 0) & (i < ctx.q_len)) & ((k >= 0) & (k < ctx.kv_len))


ROUTE = register(
    Primitive(
        "route",
        params=(
            param("topk", "int"),
            param("block", "ints", 64),
            param("score", "score", "mean"),
            param("among", "pattern", ir.FULL),
            param("qblock", "ints", None),
        ),
        check=_check,
        shape_args=_shape_args,
        check_sizes=None,
        reads_head=None,
        meaning=_meaning,
        classify=None,  # the plan classifies route by its candidate pairs (Engine._route)
        needed_keys=None,
        candidates=None,
        cost=3,
        band=None,
        total=None,
        count=None,  # by evaluation with a fixed choice
        # No fragment: kernels never render a route. codegen/routes.py replaces each route by
        # empty/full (the corners) and picks a corner per element from the call's chosen table.
        triton=None,
        dynamic=True,
    )
)
