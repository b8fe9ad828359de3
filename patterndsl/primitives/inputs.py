"""Run-time inputs (LANGUAGE.md section 7): reading an input entry, segments, and ``within(SEG, P)``.

Comes in: nothing at import but the registry. Goes out: the ``within`` record, :func:`read`
(the value of an :class:`~patterndsl.ir.InputRef` given the bound tensors, the one evaluator
every stage uses: the dense meaning, the call-time plan and, for floats, ``score``),
:func:`runs` (the segments of a segment-id tensor) and :func:`segments` (the
``patterndsl.segments`` helper).

``within(SEG, P)`` allows ``(q, k)`` iff both positions lie in the same maximal run of equal
values of ``SEG`` and ``P`` allows them in that run's own coordinates: positions counted from
the run's first position, ``Lq = Lk =`` its length. Its tile rules live in the call-time plan
(:mod:`patterndsl.analysis.inputplan`): the static plan replaces it by ``empty``/``full`` as a
bound (:func:`patterndsl.ir.input_bound`), so every static tile rule here is an explicit None.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from patterndsl import ir
from patterndsl import semantics as sem
from patterndsl.errors import InputError, PatternError, PatternValueError
from patterndsl.primitives.common import param
from patterndsl.primitives.registry import Primitive, register
from patterndsl.sizes import Sizes

#: Primitives ``within``'s pattern may not use: they need absolute sizes a segment does not have
#: (``random`` draws over all key blocks), a layout, or the data.
_NOT_IN_WITHIN = ("route", "within", "random")


# --------------------------------------------------------------------------- reading inputs


def read(ref: ir.InputRef, env: Mapping, value_of) -> torch.Tensor | int | float:
    """The value of ``NAME[i, ...]`` for the current batch element, indices clamped.

    Args:
        ref: the reference.
        env: the evaluation environment; ``env["inputs"]`` maps each input name to its tensor
            for the current batch element (the ``batch`` dimension removed).
        value_of: ``value_of(expr) -> int | Tensor``, the evaluator of the index expressions.

    Returns:
        An int64 tensor (``int`` inputs) or a float tensor broadcast over the indices' shapes.
    """
    inputs = env.get("inputs")
    table = None if inputs is None else inputs.get(ref.name)
    if table is None:
        raise PatternError(f"input '{ref.name}' is not bound here: pass {ref.name}=... to the call", ref.span)
    if table.dim() != len(ref.indices):
        raise InputError(f"input '{ref.name}' has {table.dim()} dimensions here, {len(ref.indices)} are indexed")
    if not ref.indices:
        return table.to(torch.int64) if ref.kind == "int" else table
    index = []
    for axis, expr in enumerate(ref.indices):
        value = torch.as_tensor(value_of(expr), dtype=torch.int64, device=table.device)
        index.append(value.clamp(0, table.shape[axis] - 1))
    out = table[tuple(torch.broadcast_tensors(*index))] if len(index) > 1 else table[index[0]]
    return out.to(torch.int64) if ref.kind == "int" else out


def references(node: ir.Node) -> tuple[ir.InputRef, ...]:
    """Every input reference in the expressions of ``node``'s primitives (``within``'s SEG excluded)."""
    out = []
    for sub in ir.walk(node):
        if isinstance(sub, ir.Prim):
            for _, value in sub.args:
                if isinstance(value, ir.Expr):
                    out.extend(e for e in ir.walk_expr(value) if isinstance(e, ir.InputRef))
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------- segments


def runs(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The maximal runs of equal values of a 1-D tensor.

    Args:
        seg: ``[L]`` integer tensor.

    Returns:
        ``(run, start, length)``: the run index of every position (int64 ``[L]``, ascending from
        0), and each run's first position and length (int64 ``[R]``).
    """
    seg = seg.reshape(-1)
    change = torch.ones(seg.numel(), dtype=torch.bool, device=seg.device)
    if seg.numel() > 1:
        change[1:] = seg[1:] != seg[:-1]
    run = torch.cumsum(change.to(torch.int64), 0) - 1
    start = torch.nonzero(change).reshape(-1)
    ends = torch.cat([start[1:], torch.tensor([seg.numel()], device=seg.device)])
    return run, start, ends - start


def segments(lengths, device=None) -> torch.Tensor:
    """Document lengths (or FlashAttention's ``cu_seqlens`` offsets) -> an ``int[token]`` id tensor.

    Args:
        lengths: a list/tuple of positive document lengths, or an integer tensor of cumulative
            offsets ``[0, l0, l0 + l1, ...]`` (``cu_seqlens``).
        device: where to put the result (the tensor's device by default).

    Returns:
        int64 ``[sum(lengths)]``: document ``d``'s positions hold ``d``.

    Raises:
        PatternValueError: a length below 1, offsets that do not start at 0 or decrease.
    """
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dim() != 1 or lengths.numel() < 1:
            raise PatternValueError("segments() takes cu_seqlens as a 1-D integer tensor [0, l0, l0 + l1, ...]")
        offsets = lengths.to(torch.int64)
        if int(offsets[0]) != 0:
            raise PatternValueError(f"cu_seqlens must start at 0, got {int(offsets[0])}")
        sizes = torch.diff(offsets)
        device = lengths.device if device is None else device
    else:
        if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
            raise PatternValueError(f"segments() takes a list of lengths or cu_seqlens, got {type(lengths).__name__}")
        items = list(lengths)
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in items):
            raise PatternValueError("segments() lengths must be integers")
        sizes = torch.tensor(items, dtype=torch.int64)
    if bool((sizes < 1).any()):
        raise PatternValueError("segments() needs every document length >= 1 (cu_seqlens strictly increasing)")
    ids = torch.repeat_interleave(torch.arange(sizes.numel(), dtype=torch.int64), sizes.cpu())
    return ids if device is None else ids.to(device)


# --------------------------------------------------------------------------- within(SEG, P)


def _within_check(values, spans, layout):
    body = values["body"]
    for sub in ir.walk(body):
        if isinstance(sub, ir.Prim):
            span = sub.span or spans["body"]
            if sub.name in _NOT_IN_WITHIN or sub.name in ir.GRID_PRIMITIVES:
                raise PatternValueError(
                    f"within(...) cannot contain {sub.name}(...): its pattern is evaluated in each segment's "
                    "own coordinates (no layout, route, random or nested within)",
                    span,
                )
            for _, value in sub.args:
                if not isinstance(value, ir.Expr):
                    continue
                for e in ir.walk_expr(value):
                    if isinstance(e, ir.InputRef):
                        raise PatternValueError(
                            f"within(...) cannot read input '{e.name}' inside its pattern", e.span or span
                        )
                    if isinstance(e, ir.Coord):
                        raise PatternValueError("within(...) cannot use grid coordinates", e.span or span)
    return None


def local(prim: ir.Prim, seg: torch.Tensor, q: torch.Tensor, k: torch.Tensor, h) -> torch.Tensor:
    """``within``'s meaning at end-aligned positions ``q``, ``k`` given the segment ids ``seg [Lk]``."""
    run, start, length = runs(seg)
    top = seg.numel() - 1
    rq = run[q.clamp(0, top)]
    rk = run[k.clamp(0, top)]
    s = start[rq]
    n = length[rq]
    inner = sem.evaluate_local(prim.arg("body"), q - s, k - s, h, n)
    return (rq == rk) & inner


def _within_meaning(prim, q, k, h, ctx, selection) -> torch.Tensor:
    inputs = getattr(ctx, "inputs", None)
    name = prim.arg("seg")
    if inputs is None or name not in inputs:
        raise PatternError(f"within({name}, ...) needs input '{name}': pass {name}=... to the call", prim.span)
    q, k = torch.as_tensor(q), torch.as_tensor(k)
    return local(prim, inputs[name].reshape(-1), q, k, h).expand(sem._shape_of(q, k, h))


WITHIN = register(
    Primitive(
        "within",
        params=(param("seg", "segments"), param("body", "pattern")),
        check=_within_check,
        shape_args=None,
        check_sizes=None,
        reads_head=lambda prim: ir.uses_head(prim.arg("body")),
        meaning=_within_meaning,
        classify=None,  # never planned statically: replaced by empty/full (ir.input_bound)
        needed_keys=None,
        candidates=None,
        cost=7,
        band=None,
        total=None,
        count=None,
        triton=None,  # rendered by the input kernels (codegen), not as a fragment
    )
)


# --------------------------------------------------------------------------- bound inputs


class Bound(Sizes):
    """Sizes plus the inputs of one batch element: the context ``semantics`` evaluates inputs in.

    ``inputs`` maps each input name to its tensor for this batch element (``batch`` removed).
    """

    __slots__ = ("inputs",)

    def __init__(self, sizes: Sizes, inputs: Mapping[str, torch.Tensor]):
        object.__setattr__(self, "q_len", sizes.q_len)
        object.__setattr__(self, "kv_len", sizes.kv_len)
        object.__setattr__(self, "layout", sizes.layout)
        object.__setattr__(self, "heads", sizes.heads)
        object.__setattr__(self, "inputs", dict(inputs))

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__
