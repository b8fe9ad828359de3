"""Run-time inputs given from Python, checked against a pattern's declarations (LANGUAGE.md section 7).

Comes in: the ``input`` declarations of a bound pattern, the keyword arguments of a call
(``mask``, ``plan``, attention) and the sizes of that call. Goes out: a :class:`Inputs` value
(the batch size and the tensors, validated) or an :class:`~patterndsl.errors.InputError` that
names the input and the shape, dtype or device expected. Nothing is ever broadcast silently: a
``batch`` dimension may be absent or 1 (shared by the batch), every other extent must match.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.errors import InputError, did_you_mean, listing


@dataclass(frozen=True)
class Inputs:
    """Validated run-time inputs of one call.

    Attributes:
        decls: the pattern's declarations, in order.
        tensors: name -> tensor as given (read, never written).
        batch: the batch size they imply (1 when nothing is batched).
    """

    decls: tuple[ir.InputDecl, ...]
    tensors: dict[str, torch.Tensor]
    batch: int

    def element(self, b: int) -> dict[str, torch.Tensor]:
        """The inputs of batch element ``b``, ``batch`` removed (a shared tensor serves every element)."""
        out = {}
        for decl in self.decls:
            t = self.tensors[decl.name]
            if decl.batched and t.dim() == len(decl.dims):
                t = t[b] if t.shape[0] > 1 else t[0]
            out[decl.name] = t
        return out

    def ordered(self) -> list[torch.Tensor]:
        """The tensors in declaration order (the op's ``data`` list)."""
        return [self.tensors[d.name] for d in self.decls]


def expected_shape(decl: ir.InputDecl, kv_len, heads, head_dim=None, batch=None) -> str:
    """The shape ``decl`` takes at these sizes, for messages (``[batch, 300] or [300]``)."""

    def extent(d):
        if d == "token":
            return str(kv_len) if kv_len is not None else "Lk"
        if d == "head":
            return str(heads) if heads is not None else "heads"
        if d == "dim":
            return str(head_dim) if head_dim is not None else "head_dim"
        return str(d)

    inner = [extent(d) for d in decl.index_dims]
    if not decl.batched:
        return f"[{', '.join(inner)}]"
    lead = str(batch) if batch is not None else "batch"
    return f"[{', '.join([lead, *inner])}] or [{', '.join(inner)}]"


def bind(
    pattern: ir.PatternIR,
    given: Mapping[str, object],
    kv_len: int,
    heads: int,
    head_dim: int | None = None,
    batch: int | None = None,
    device: torch.device | None = None,
    who: str = "attention()",
    optional: frozenset[str] = frozenset(),
) -> Inputs:
    """Check the inputs of a call against the pattern's declarations.

    Args:
        pattern: the bound pattern.
        given: keyword arguments naming inputs.
        kv_len: ``Lk`` (the extent of ``token`` dimensions).
        heads: query heads (the extent of ``head`` dimensions).
        head_dim: the head size (``dim`` dimensions), when known.
        batch: the batch size, when known (attention); else implied by the inputs.
        device: the device every input must be on, when known.
        who: the entry point, for messages.
        optional: inputs that may be left out (``mask()``/``plan()`` need none that only the score
            reads); one left out is not in the result's ``decls``.

    Returns:
        The validated :class:`Inputs`.

    Raises:
        InputError: a missing, extra or misnamed input, or one of the wrong type, dtype, shape or device.
    """
    names = [d.name for d in pattern.inputs]
    decls = tuple(d for d in pattern.inputs if d.name in given or d.name not in optional)
    for key in given:
        if key not in names:
            hint = did_you_mean(str(key), names)
            have = f"its inputs are {listing(names)}" if names else "it declares no input"
            raise InputError(f"{who}: pattern '{pattern.name}' has no input '{key}'{hint}; {have}")
    implied = batch
    tensors = {}
    for decl in decls:
        # Messages are formatted only to raise: under torch.compile the sizes are symbolic, and str() of
        # one is untraceable.
        shape = functools.partial(expected_shape, decl, kv_len, heads, head_dim, batch)
        what = functools.partial("{}: input '{}' ({}{})".format, who, decl.name, decl.kind)
        if decl.name not in given:
            raise InputError(
                f"{who}: pattern '{pattern.name}' needs input '{decl.name}': pass {decl.name}= a tensor {shape()}"
            )
        t = given[decl.name]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what(shape())} must be a torch.Tensor, got {type(t).__name__}")
        if decl.kind == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
            raise InputError(f"{what(shape())} must be an integer tensor, got {t.dtype}")
        if decl.kind == "float" and not t.dtype.is_floating_point:
            raise InputError(f"{what(shape())} must be a floating-point tensor, got {t.dtype}")
        if device is not None and t.device != torch.device(device):
            raise InputError(f"{what(shape())} must be on {device} like q, got {t.device}")
        inner = [_extent(d, kv_len, heads, head_dim) for d in decl.index_dims]
        dims = tuple(t.shape)
        ok = len(dims) == len(inner) and all(w is None or w == n for w, n in zip(inner, dims, strict=True))
        if not ok and decl.batched and len(dims) == len(inner) + 1:
            ok = all(w is None or w == n for w, n in zip(inner, dims[1:], strict=True))
            if ok and dims[0] != 1:
                if implied is None:
                    implied = dims[0]
                ok = dims[0] == implied
        if not ok:
            raise InputError(f"{what(shape())} has shape {list(dims)}, expected {shape()}")
        tensors[decl.name] = t
    return Inputs(decls, tensors, 1 if implied is None else implied)


def _extent(d, kv_len, heads, head_dim):
    if d == "token":
        return kv_len
    if d == "head":
        return heads
    if d == "dim":
        return head_dim
    return d
