"""Candidate orders of grid neighborhoods: dilation groups only for dilated ones, candidates within a group.

Plans are compared with the dense meaning, in every order the planner offers.
"""

from __future__ import annotations

import pytest
import torch

import patterndsl
from patterndsl import analysis, semantics
from patterndsl.analysis import reorder
from patterndsl.analysis.plan import tile_reduce
from patterndsl.analysis.planner import _head_groups


def _orders(src: str, length: int, block: int) -> list[str]:
    pir = patterndsl.compile(src).ir
    groups, _ = _head_groups(pir, 1)
    return [c[0] for c in reorder.candidates([n for n, _ in groups], pir.layout, length, length, (block, block))]


def test_dilated_neighborhoods_offer_dilation_group_boxes_only():
    dilated = _orders("pattern p { layout grid(y = 32, x = 32)\n neighborhood(3, dilation = 2) }", 1024, 16)
    assert dilated[0] == "identity" and all("dilation groups" in d for d in dilated[1:]) and len(dilated) > 1
    mixed = _orders(
        "pattern p { layout grid(y = 32, x = 32)\n neighborhood(3, dilation = 2) | neighborhood(5) }", 1024, 16
    )
    assert any("dilation groups" not in d for d in mixed[1:])  # plain boxes from the undilated one


@pytest.mark.parametrize(
    "src",
    [
        "neighborhood((3, 5), dilation = (1, 3))",
        "neighborhood(5, dilation = 2, causal = true)",
    ],
)
def test_dilation_group_orders_match_dense(src, monkeypatch):
    # every order planned whole (none skipped on an estimate), each checked against the dense meaning
    pir = patterndsl.compile(f"pattern p {{ layout grid(y = 18, x = 24)\n {src} }}").ir
    dense = semantics.mask(pir, 432, 432, 1)
    groups, _ = _head_groups(pir, 1)
    cands = reorder.candidates([n for n, _ in groups], pir.layout, 432, 432, (16, 16))
    assert len(cands) > 1
    for cand in cands:
        monkeypatch.setattr(reorder, "candidates", lambda *a, c=cand, **k: [c])
        plan = analysis.plan(pir, 432, 432, 1, block=(16, 16))
        assert plan.order == cand[0]
        ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], 16, 16)
        assert torch.equal(plan.tiles(), ref), cand[0]
        assert plan.stats.allowed_pairs == int(dense.sum())


@pytest.mark.parametrize(
    "pred",
    [
        "k.y >= q.y // 4 * 4 - 1 and k.y < q.y // 4 * 4 + 5 and k.x >= q.x // 4 * 4 - 1 and k.x < q.x // 4 * 4 + 5",
        "k.y <= q.y + 2 and q.y - 3 < k.y and 2 * q.x // 3 == k.x",
        "k.x > (q.x % 5) * 2 and k.y >= 0 - q.y and k.y <= 30",
    ],
)
def test_key_coordinate_bounds_give_the_candidates(pred):
    # an intersection of comparisons of one key coordinate each: candidates from the operands'
    # per-axis bounds (no branch-and-bound search), the plan still the dense meaning's
    from tests.unit.test_plan_property import check_plan

    pir = patterndsl.compile(f"pattern p {{ layout grid(y = 12, x = 20)\n where({pred}) }}").ir
    for block in ((16, 16), (8, 24)):
        plan = check_plan(pir, 240, 240, 1, block, "identity")
        assert plan.stats.extra["boxes_searched"] == 0


@pytest.mark.parametrize(
    "pred",
    [
        "q.y // 3 == k.y // 3 and (q.x + 1) // 4 == (k.x + 1) // 4",
        "(k.y - 2) // 5 <= q.y // 5 and k.x + 4 >= q.x and k.x // 2 < 4611686018427387 * q.x + 1",
        "k.y // 7 >= q.y - 4611686018427387903 and k.x <= 13",
    ],
)
def test_key_coordinate_bounds_through_shifts_and_floor_division(pred):
    from tests.unit.test_plan_property import check_plan

    pir = patterndsl.compile(f"pattern p {{ layout grid(y = 12, x = 20)\n where({pred}) }}").ir
    plan = check_plan(pir, 240, 240, 1, (16, 16), "identity")
    assert plan.stats.extra["boxes_searched"] == 0


@pytest.mark.parametrize(
    "pred",
    ["k.x + k.y - q == k.x + 4", "k.y > q.x - k.x + 3", "k.y <= k.x", "k.x == q.x + k.y - 2"],
)
def test_a_bound_expression_reading_another_key_coordinate_gives_no_key_bounds(pred):
    # ``k.AXIS op E`` bounds the axis only when E reads no key: an E with another key coordinate (its sides
    # mixed) once bounded the axis by E's interval over the query tile alone and dropped allowed pairs.
    from tests.unit.test_plan_property import check_plan

    pir = patterndsl.compile(f"pattern p {{ layout grid(y = 7, x = 8)\n where({pred}) }}").ir
    for block in ((5, 1), (8, 8), (3, 7)):
        check_plan(pir, 56, 56, 1, block, "identity")


def test_orders_after_the_first_are_planned_by_their_estimates(monkeypatch, planned_orders):
    # the best estimate after the identity bounds the other orders from the start: a 2-D dilated
    # neighborhood on 125 x 125 plans the identity, the box order with the fewest estimated pairs and the
    # one order tying with it, not every box order estimated within the margin of the identity; the tie
    # goes to the order earlier in list order, so the plan is the one planning in list order gives
    from patterndsl.analysis import planner

    source = "pattern p { layout grid(y = 125, x = 125)\n neighborhood(7, dilation = 4) }"
    planned = planned_orders
    by_estimate = patterndsl.compile(source).plan(125 * 125, heads=4)
    assert planned == ["identity", "boxes 4x32, dilation groups 4x4", "boxes 32x32, dilation groups 4x4"]
    assert by_estimate.order == "boxes 4x32, dilation groups 4x4"

    sequence = planner._plan_sequence
    monkeypatch.setattr(planner, "_plan_sequence", lambda cands, *a: (sequence(cands, *a)[0], list(range(len(cands)))))
    planned.clear()
    in_list_order = patterndsl.compile(source).plan(125 * 125, heads=4)
    assert len(planned) > 3 and in_list_order.order == by_estimate.order
    assert torch.equal(in_list_order.tiles(), by_estimate.tiles())
    # planned the other way round, the tie still goes to the order earlier in list order
    names = [
        c[0]
        for c in reorder.candidates(
            list(by_estimate.pattern.nodes()), by_estimate.pattern.layout, 15625, 15625, (128, 128)
        )
    ]
    late, early = names.index("boxes 32x32, dilation groups 4x4"), names.index("boxes 4x32, dilation groups 4x4")
    monkeypatch.setattr(planner, "_plan_sequence", lambda cands, *a: (sequence(cands, *a)[0], [0, late, early]))
    planned.clear()
    reversed_ = patterndsl.compile(source).plan(125 * 125, heads=4)
    assert planned[1:] == ["boxes 32x32, dilation groups 4x4", "boxes 4x32, dilation groups 4x4"]
    assert reversed_.order == by_estimate.order


def test_an_order_is_laid_out_once_for_its_sample_and_its_plan(monkeypatch, planned_orders):
    # the sides of a sampled order are reused when it is planned whole (in one plan, never across plans)
    from patterndsl.analysis import planner, tiles

    source = "pattern p { layout grid(y = 45, x = 37)\n neighborhood(7, dilation = 2) }"
    built = []
    build = tiles.build_side
    monkeypatch.setattr(tiles, "build_side", lambda segs, *a: built.append(id(segs)) or build(segs, *a))
    monkeypatch.setattr(planner, "ESTIMATE_FIRST_TILES", 0)  # every order sampled first
    kept = []
    sequence = planner._plan_sequence

    def keeping(*args):
        out = sequence(*args)
        kept.append(len(planner._laid_out))
        return out

    monkeypatch.setattr(planner, "_plan_sequence", keeping)
    got = patterndsl.compile(source).plan(45 * 37, heads=2, block=(16, 16), order="auto")
    # only the sides of the orders that may be planned first are kept: the identity's, the lowest estimate's
    assert planned_orders and len(built) == len(set(built)) and kept == [2]
    dense = semantics.mask(got.pattern, 45 * 37, 45 * 37, 2)
    assert torch.equal(got.tiles(), tile_reduce(dense[:, got.q_order][:, :, got.kv_order], 16, 16))
    assert planner._laid_out is None


#: The video example's 3-D neighborhood (causal in time) on a grid ``t x y x x``.
_VIDEO = (
    "pattern p {{ layout grid(t = {t}, y = {y}, x = {x})\n neighborhood((3, 7, 7), causal = (true, false, false)) }}"
)


@pytest.mark.parametrize(
    "source, length, block",
    [
        (_VIDEO.format(t=9, y=17, x=13), 9 * 17 * 13, (32, 32)),
        (_VIDEO.format(t=4, y=30, x=29), 4 * 30 * 29, (16, 16)),
        ("pattern p { layout grid(y = 31, x = 29)\n neighborhood(7) }", 31 * 29, (32, 32)),
    ],
)
def test_an_order_is_given_up_once_its_known_tiles_exceed_the_best(monkeypatch, source, length, block):
    # an order planned against a bound stops once the tiles its first piece pairs show non-empty visit
    # as many pairs as the best order: the plan is the one planning it whole gives (order, tiles, counts)
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import planner

    floor, gave_up = planner._floor, []

    def spy(*args):
        inner = floor(*args)

        def check(keys):
            try:
                inner(keys)
            except eng.OverBudget:
                gave_up.append(len(keys))
                raise

        return check

    monkeypatch.setattr(planner, "_floor", spy)
    early = patterndsl.compile(source).plan(length, heads=2, block=block)
    assert gave_up
    monkeypatch.setattr(planner, "_floor", lambda *args: lambda keys: None)
    whole = patterndsl.compile(source).plan(length, heads=2, block=block)
    assert early.order == whole.order
    assert torch.equal(early.tiles(), whole.tiles())
    assert early.stats.visited_pairs == whole.stats.visited_pairs
    assert early.stats.allowed_pairs == whole.stats.allowed_pairs


@pytest.mark.parametrize(
    "source, length, block",
    [
        (_VIDEO.format(t=4, y=30, x=29), 4 * 30 * 29, (16, 16)),
        ("pattern p { layout grid(y = 31, x = 29)\n neighborhood(7) }", 31 * 29, (32, 32)),
        ("pattern p { layout grid(y = 45, x = 37)\n neighborhood(7, dilation = 2) }", 45 * 37, (16, 16)),
    ],
)
def test_the_tiles_a_floor_is_given_are_non_empty(monkeypatch, source, length, block):
    # whatever the bound, every tile an engine's watch reports is among the run's non-empty tiles
    import numpy as np

    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import planner

    seen, runs = [], []
    monkeypatch.setattr(planner, "_floor", lambda *args: seen.append([]) or seen[-1].append)
    run = eng.Engine.run

    def spy(self, node, domain=None):
        watched = self.watch is not None
        out = run(self, node, domain)
        if watched:
            runs.append(out[0])
        return out

    monkeypatch.setattr(eng.Engine, "run", spy)
    patterndsl.compile(source).plan(length, heads=2, block=block)
    assert len(seen) == len(runs) and any(len(k) for s in seen for k in s)
    for reported, keys in zip(seen, runs, strict=True):
        got = np.concatenate(reported) if reported else np.zeros(0, np.int64)
        assert np.isin(got, keys).all()


def test_a_watch_left_unused_is_cleared(monkeypatch):
    # an engine whose run never reached the watched primitive's own candidates (a domain from the
    # order's classes) keeps no watch for the counts after it
    from patterndsl.analysis import engine as eng

    engines = []
    init = eng.Engine.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        engines.append(self)

    monkeypatch.setattr(eng.Engine, "__init__", spy)
    # the identity first, then the classes mod 8 against its bound, their candidates from the classes
    got = patterndsl.compile("pattern p { window(32, dilation = 8) }").plan(4096, heads=2, block=(64, 64))
    assert got.order == "classes mod 8"
    assert engines and all(e.watch is None for e in engines)
