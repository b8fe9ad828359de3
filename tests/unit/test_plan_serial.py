"""The planner's torch operations run with one intra-op thread, and the caller's count comes back."""

import torch

import patterndsl as pd
from patterndsl import semantics


def test_plan_evaluates_serially_and_restores_threads(monkeypatch):
    seen = []
    evaluate = semantics.evaluate

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(semantics, "evaluate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = pd.compile("pattern p { window(3, 3, dilation = 2) | global(4) | where(q % 7 == k % 5) }")
        plan = p.plan(1024, block=(64, 64))
        assert plan.stats.elements_evaluated > 0 and seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
