"""The sizes a pattern is evaluated, planned and run at: one value, not ``(q_len, kv_len, layout, heads)``.

Comes in: the lengths, the pattern's layout and the head count. Goes out: :class:`Sizes`, the
evaluation context of :mod:`patterndsl.semantics` (``semantics.Context`` is this class), the
sizes inside the analysis's ``classify.Env`` and of a plan (``BlockPlan.sizes``), which the
runtime hands on.
"""

from __future__ import annotations

from dataclasses import dataclass

from patterndsl import ir


@dataclass(frozen=True, slots=True)
class Sizes:
    """Sizes a pattern is evaluated at.

    Attributes:
        q_len: number of queries ``Lq``.
        kv_len: number of keys ``Lk``.
        layout: the pattern's ``layout grid(...)``, or None.
        heads: query heads of the whole pattern (0: not known or not relevant; ``route``
            candidates whose ``among`` reads ``h`` are then taken per head, not over all heads).
    """

    q_len: int
    kv_len: int
    layout: ir.Layout | None = None
    heads: int = 0

    @property
    def offset(self) -> int:
        """``Lk - Lq``: added to a query index to get its end-aligned position."""
        return self.kv_len - self.q_len
