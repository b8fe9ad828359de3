"""Runtime stage, CPU executor: the ``score`` modifier on the tiles a segment visits.

Comes in: the plan (its orders, lengths and layout), the query heads a unit runs, the score
(:class:`patterndsl.scores.Score`) and, per step, a segment and its raw logits
``s = scale * Q K^T`` shaped ``[B, h, n, BM, width*BN]``. Goes out: the modified logits (forward)
and ``d score / d s`` on the same pairs (backward; None when the score is additive in ``s``,
where ``dS = dP``). Positions are the original (end-aligned) ones of the tiles' rows and
columns, clamped inside the lengths for padding, which the segment's mask blocks anyway. The
steps select blocked pairs out after modifying, so a modifier's NaN or Inf on a blocked pair
never reaches an output.
"""

from __future__ import annotations

import torch

from patterndsl import scores
from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime.cpu.schedule import Segment


class Modifier:
    """Evaluates a score and its derivative on the tiles of segments, for one unit's query heads."""

    def __init__(self, plan: BlockPlan, heads: list[int] | None, count: int, data=None):
        self.plan = plan
        self.score = plan.pattern.score
        self.heads = torch.arange(count) if heads is None else torch.tensor(heads, dtype=torch.int64)
        self.data = data

    def _env(self, s: torch.Tensor, seg: Segment) -> scores.Env:
        plan = self.plan
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

    def __call__(self, s: torch.Tensor, seg: Segment) -> torch.Tensor:
        """The modified logits of ``s`` (``[B, h, n, BM, W]``), a new tensor in ``s``'s dtype."""
        out = scores.evaluate(self.score.expr, self._env(s, seg))
        return out.to(s.dtype).expand(s.shape).contiguous()

    def derivative(self, s: torch.Tensor, seg: Segment) -> torch.Tensor | None:
        """``d score / d s`` at ``s``, or None when the score is additive in ``s`` (the derivative is 1)."""
        if self.score.additive:
            return None
        return scores.evaluate(self.score.ds, self._env(s, seg)).to(s.dtype)
