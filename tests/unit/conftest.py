"""Fixtures of the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def planned_orders(monkeypatch) -> list[str]:
    """The descriptions of the candidate orders the planner plans whole, in the order it plans them."""
    from patterndsl.analysis import planner

    planned: list[str] = []
    plan_order = planner._plan_order

    def spy(desc, *args, **kwargs):
        planned.append(desc)
        return plan_order(desc, *args, **kwargs)

    monkeypatch.setattr(planner, "_plan_order", spy)
    return planned
