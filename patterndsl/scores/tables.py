"""Score modifiers: reading run-time inputs (``NAME[i, ...]``, section 7) in a score, and their gradients.

Comes in: the pattern's input declarations, the call's input tensors (declaration order, as the
op's ``data`` list) and the batch elements the pairs belong to. Goes out: :class:`Tables`, the
``read`` hook of :class:`patterndsl.scores.Env` (an element per pair, indices clamped into each
dimension, the current batch element's row of a batched input), and :func:`scatter`, which adds
``dL/d score * d score / d read`` into a float table's gradient at the entries the pairs read
(the CPU executor's backward; the float64 reference gets the same gradient from autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patterndsl import ir
from patterndsl.errors import PatternError
from patterndsl.scores.nodes import FLOAT, Read


class Tables:
    """The ``read`` hook of :class:`~patterndsl.scores.Env`: ``NAME[indices]`` for every pair.

    Args:
        decls: the pattern's input declarations.
        tensors: the input tensors in declaration order.
        batch: int64 batch-element indices broadcastable against the pairs (``[B, 1, ...]``), or
            None when the pairs are of one batch element (a batched input then must have extent 1).
    """

    def __init__(self, decls: Sequence[ir.InputDecl], tensors: Sequence[torch.Tensor], batch: torch.Tensor | None):
        self.decls = {d.name: d for d in decls}
        self.tensors = {d.name: t for d, t in zip(decls, tensors, strict=True)}
        self.batch = batch

    def index(self, node: Read, indices: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The tensor ``node`` reads and the (clamped, broadcast) index of every pair into it."""
        decl, table = self.decls[node.name], self.tensors[node.name]
        lead: list[torch.Tensor] = []
        if decl.batched and table.dim() == len(decl.dims):
            if table.shape[0] == 1:
                lead = [torch.zeros((), dtype=torch.int64)]
            elif self.batch is None:
                raise PatternError(f"input '{node.name}' has a batch dimension but no batch element is known here")
            else:
                lead = [self.batch.clamp(0, table.shape[0] - 1)]
        dims = table.shape[len(lead) :]
        out = lead + [torch.as_tensor(i, dtype=torch.int64).clamp(0, n - 1) for i, n in zip(indices, dims, strict=True)]
        if not out:
            out = [torch.zeros((), dtype=torch.int64)]
            table = table.reshape(1)
        return table, tuple(torch.broadcast_tensors(*out))

    def __call__(self, node: Read, indices: list[torch.Tensor]) -> torch.Tensor:
        table, index = self.index(node, indices)
        out = table[index]
        return out if node.type == FLOAT else out.to(torch.int64)


def scatter(grad: torch.Tensor, tables: Tables, node: Read, indices: list[torch.Tensor], values: torch.Tensor) -> None:
    """Add ``values`` (one per pair, broadcast) into ``grad`` (shaped like ``node``'s table) where the pairs read it.

    Args:
        grad: the table's gradient accumulator.
        tables: the reads of this call (:class:`Tables`).
        node: the element read.
        indices: the evaluated index expressions of ``node``.
        values: ``dL/d score * d score / d node`` per pair (0 on blocked pairs).
    """
    _, index = tables.index(node, indices)
    shape = torch.broadcast_shapes(index[0].shape, values.shape)
    index = tuple(i.expand(shape) for i in index)
    flat = grad.reshape(1) if grad.dim() == 0 else grad
    flat.index_put_(index, values.expand(shape).to(grad.dtype), accumulate=True)
