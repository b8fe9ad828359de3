"""Runtime stage, CPU executor: the ``score`` modifier on the tiles a segment visits.

Comes in: the plan (its orders, lengths and layout), the query heads a unit runs, the score
(:class:`patterndsl.scores.Score`) and, per step, a segment and its raw logits
``s = scale * Q K^T`` shaped ``[B, h, n, BM, width*BN]``. Goes out: the modified logits (forward)
and ``d score / d s`` on the same pairs (backward; None when the score is additive in ``s``,
where ``dS = dP``), and, for float inputs the score reads (a learned bias table), their gradients
(:meth:`Modifier.accumulate`: ``dL/d score * d score / d read`` scattered into the table).
Positions are the original (end-aligned) ones of the tiles' rows and
columns, clamped inside the lengths for padding, which the segment's mask blocks anyway. The
steps select blocked pairs out after modifying, so a modifier's NaN or Inf on a blocked pair
never reaches an output.
"""

from __future__ import annotations

import torch

from patterndsl import scores
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime.cpu.schedule import Segment
from patterndsl.scores.separable import separable
from patterndsl.scores.tables import Tables, scatter


class Modifier:
    """Evaluates a score and its derivative on the tiles of segments, for one unit's query heads.

    Args:
        plan: the block plan; heads: the unit's query heads (None: all ``count``).
        data: the call's input tensors in declaration order (the score may read them).
        batch: the batch elements of the unit's rows (int64 indices), for batched inputs.
        grads: float input name -> gradient accumulator, filled by :meth:`accumulate` (backward).
    """

    def __init__(
        self,
        plan: BlockPlan,
        heads: list[int] | None,
        count: int,
        data: list[torch.Tensor] | None = None,
        batch: torch.Tensor | None = None,
        grads: dict[str, torch.Tensor] | None = None,
    ):
        self.plan = plan
        self.score = plan.pattern.score
        self.heads = torch.arange(count) if heads is None else torch.tensor(heads, dtype=torch.int64)
        self.data = None
        if plan.pattern.inputs and data:
            where = None if batch is None else batch.view(-1, 1, 1, 1, 1)
            self.data = Tables(plan.pattern.inputs, data, where)
        self.grads = grads or {}
        self._separable = self.score.additive and separable(self.score.bias)
        self._positions = reads_positions(self.score)

    def _env(self, s: torch.Tensor, seg: Segment, positions: bool = False) -> scores.Env:
        plan = self.plan
        if not (self._positions or positions):
            # The score reads no position (``cap * tanh(s / cap)``, a per-head term): no per-pair indices.
            none = torch.zeros((), dtype=torch.int64)
            h = self.heads[:, None, None, None]
            return scores.Env(s, none, none, h, plan.q_len, plan.kv_len, plan.pattern.layout, s.dtype, self.data)
        bm, bn = plan.block
        rows = (seg.q_tiles[:, None] * bm + torch.arange(bm)).clamp(max=plan.q_len - 1)
        cols = (seg.kv_tiles[:, :, None] * bn + torch.arange(bn)).reshape(len(seg), -1).clamp(max=plan.kv_len - 1)
        q = plan.q_order[rows] + (plan.kv_len - plan.q_len)
        k = plan.kv_order[cols]
        return scores.Env(
            s=s,
            q=q[:, :, None],
            k=k[:, None, :],
            h=self.heads[:, None, None, None],
            lq=plan.q_len,
            lk=plan.kv_len,
            layout=plan.pattern.layout,
            dtype=s.dtype,
            read=self.data,
        )

    def __call__(self, s: torch.Tensor, seg: Segment, own: bool = False) -> torch.Tensor:
        """The modified logits of ``s`` (``[B, h, n, BM, W]``) in ``s``'s dtype.

        With ``own`` (the caller hands ``s`` over) the operators applied to ``s`` run in place in its
        memory (:func:`patterndsl.scores.evaluate_in_place`); otherwise the result is a new tensor.
        """
        env = self._env(s, seg)
        out = scores.evaluate_in_place(self.score.expr, env) if own else scores.evaluate(self.score.expr, env)
        if out.shape == s.shape and out.dtype == s.dtype and out.is_contiguous():
            return out
        return out.to(s.dtype).expand(s.shape).contiguous()

    def bias(self, seg: Segment, dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An additive score's bias on the segment for the fused kernel, and the shift of each row's ``lse``.

        Returns:
            ``(mask, shift)``: ``mask`` ``[batch*h or 1, n, BM, W]`` is the fused kernel's float
            ``attn_mask`` (the score is ``s + bias``; ``-inf`` on blocked pairs). For a bias
            ``g(q) + u(k)`` (:func:`patterndsl.scores.separable`) it holds each query tile's
            first row, broadcast over the tile's rows (no per-pair evaluation), and ``shift``
            (broadcastable to ``[batch, h, n, BM]``) is what the rows' own ``g(q)`` adds to their
            log-sum-exp; otherwise ``mask`` holds every pair's bias and ``shift`` is None.
        """
        bm, bn = self.plan.block
        shape = (len(seg), bm, seg.width * bn)
        env = self._env(torch.zeros((), dtype=dtype), seg, positions=True)
        shift = None
        if self._separable:
            q_all = env.q
            env.q = q_all[:, :1]
            first = scores.evaluate(self.score.bias, env).to(dtype)
            env.memo.clear()
            env.q, env.k = q_all, env.k[:, :, :1]
            rows = scores.evaluate(self.score.bias, env).to(dtype)
            rows = rows.reshape((1,) * (5 - rows.dim()) + tuple(rows.shape))  # a constant bias is 0-dimensional
            shift = (rows - rows[..., :1, :])[..., 0]
            value = first
        else:
            value = scores.evaluate(self.score.bias, env).to(dtype)
        value = value.reshape((1,) * (5 - value.dim()) + tuple(value.shape))
        # One bias for every (batch element, head) when it depends on neither, else one per pair of them.
        lead = (1, 1) if value.shape[0] == 1 and value.shape[1] == 1 else (batch, len(self.heads))
        if shift is not None and seg.blocked is None:
            rows_of = value.expand(*lead, len(seg), 1, shape[2]).reshape(-1, len(seg), 1, shape[2])
            return rows_of.expand(-1, *shape), shift
        out = torch.empty(*lead, *shape, dtype=dtype)
        out.copy_(value.expand_as(out))
        out = out.reshape(-1, *shape)
        if seg.blocked is not None:
            out.masked_fill_(seg.blocked, float("-inf"))
        return out, shift

    def derivative(self, s: torch.Tensor, seg: Segment) -> torch.Tensor | None:
        """``d score / d s`` at ``s``, or None when the score is additive in ``s`` (the derivative is 1)."""
        if self.score.additive:
            return None
        return scores.evaluate(self.score.ds, self._env(s, seg)).to(s.dtype)

    def accumulate(self, g: torch.Tensor, s: torch.Tensor, seg: Segment) -> None:
        """Add ``g * d score / d read`` into the gradient of every float table the score reads.

        Args:
            g: ``dL / d score`` on the segment's pairs (``[B, h, n, BM, W]``, 0 on blocked pairs).
            s: the raw logits the forward modified (the partial derivatives may depend on them).
            seg: the segment.
        """
        if not self.grads:
            return
        env = self._env(s, seg)
        for read, partial in self.score.partials:
            if read.name not in self.grads:
                continue
            values = g * scores.evaluate(partial, env).to(g.dtype)
            if seg.blocked is not None:
                values = values.masked_fill(seg.blocked, 0.0)
            indices = [scores.evaluate(i, env) for i in read.indices]
            scatter(self.grads[read.name], self.data, read, indices, values)


def reads_positions(score: scores.Score) -> bool:
    """Whether any of the score's expressions (value, derivatives) reads a query or key position.

    Positions enter through ``q``, ``k``, grid coordinates and the indices of run-time inputs.
    """
    from patterndsl.scores.nodes import Coord, Read, Sym, walk

    roots = [score.expr, score.ds, *(p for _, p in score.partials)] + ([score.bias] if score.bias is not None else [])
    for node in (n for root in roots for n in walk(root)):
        if isinstance(node, (Coord, Read)) or (isinstance(node, Sym) and node.name in ("q", "k")):
            return True
    return False


def table_grads(plan: BlockPlan, data: list[torch.Tensor] | None, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Zeroed gradient accumulators (``dtype``) of the pattern's float inputs, by name, in declaration order.

    None when the pattern has no score or no float input (the backward then returns three gradients).
    """
    pattern = plan.pattern
    if pattern is None or pattern.score is None or not data:
        return None
    floats = [(d, t) for d, t in zip(pattern.inputs, data, strict=True) if d.kind == "float"]
    if not floats:
        return None
    return {d.name: torch.zeros(t.shape, dtype=dtype) for d, t in floats}


class PairModifier:
    """The score on gathered ``route`` rows (:mod:`patterndsl.runtime.cpu.gather`): logits ``[h, rows, keys]``.

    Args:
        plan: the block plan (lengths, layout, the score).
    """

    def __init__(self, plan: BlockPlan):
        self.plan = plan
        self.score = plan.pattern.score

    def _env(self, s: torch.Tensor, heads: list[int], rows: torch.Tensor, keys) -> scores.Env:
        plan = self.plan
        k = torch.arange(plan.kv_len)[keys] if isinstance(keys, slice) else keys
        return scores.Env(
            s=s,
            q=(rows + (plan.kv_len - plan.q_len))[None, :, None],
            k=k[None, None, :],
            h=torch.tensor(heads, dtype=torch.int64)[:, None, None],
            lq=plan.q_len,
            lk=plan.kv_len,
            layout=plan.pattern.layout,
            dtype=s.dtype,
        )

    def __call__(self, s: torch.Tensor, heads: list[int], rows: torch.Tensor, keys) -> torch.Tensor:
        """The modified logits of ``s`` (``[h, rows, keys]``) for query rows ``rows`` and key indices ``keys``."""
        out = scores.evaluate(self.score.expr, self._env(s, heads, rows, keys))
        return out.to(s.dtype).expand(s.shape)

    def derivative(self, s: torch.Tensor, heads: list[int], rows: torch.Tensor, keys) -> torch.Tensor | None:
        """``d score / d s`` there, or None for a score additive in ``s``."""
        if self.score.additive:
            return None
        return scores.evaluate(self.score.ds, self._env(s, heads, rows, keys)).to(s.dtype)
