"""A budgeted candidate order that wins still gets its counts (planner._assemble).

An order planned before the identity, or after it with a bound, classifies under an element budget
(``CANDIDATE_BUDGET``) so that it cannot cost more than it saves. Once it is chosen, counting its
partial tiles may need more elements than the budget left: that raised the engine's internal
``OverBudget`` out of ``Pattern.plan`` (``neighborhood(7) | where(k.x // 8 == q.x // 8)`` on a 1000 x 1000
grid did).
"""

from __future__ import annotations

import torch

import patterndsl as pd
from patterndsl import semantics
from patterndsl.analysis import planner, reorder
from patterndsl.analysis.plan import tile_reduce
from patterndsl.sizes import Sizes


def test_a_chosen_order_counts_past_its_classification_budget():
    pattern = pd.compile("pattern p { where(min(q, 2 * k) % 9 < 4) }")  # counts need element evaluation
    length, block = 512, 64
    groups, head_group = planner._head_groups(pattern.ir, 1)
    cands = reorder.candidates([n for n, _ in groups], pattern.ir.layout, length, length, (block, block))
    sizes = Sizes(length, length, pattern.ir.layout, 1)
    cand = planner._plan_order(*cands[0], groups, sizes, block, block, None, True)  # budgeted (limit)
    engine = cand.groups[0].engine
    engine.tally.budget = 0  # its classification spent all it could
    before = engine.tally.elements
    plan = planner._assemble(pattern.ir, cand, groups, head_group, sizes, block, block, 0.0, 1)
    assert engine.tally.elements > before  # the counts did evaluate elements
    dense = semantics.mask(pattern.ir, length, length, 1)
    assert plan.stats.allowed_pairs == int(dense.sum())
    assert torch.equal(plan.tiles(), tile_reduce(dense, block, block))
