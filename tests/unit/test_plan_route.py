"""Block plans of patterns with ``route``: a tile is 3 exactly where two possible choices give it different states.

The oracle enumerates, per tile, every possible choice of the query groups meeting it
(each group takes any ``min(topk, candidates)`` of its candidate blocks, candidates from
the dense meaning of ``among``) and reduces the dense mask of each; the plan must be 3
exactly where those states differ and equal to the one state elsewhere. Tiles whose
enumeration would be too large are skipped (and counted, so the check cannot silently
vanish). Route attention through ``Pattern.__call__`` on tiles the plan now decides
statically is compared with the float64 reference over ``Pattern.mask(..., q=, k=)``.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import patterndsl
from patterndsl import ir, semantics
from patterndsl.analysis.plan import tile_reduce
from tests.reference import reference_attention

ENUM_LIMIT = 512  # local choices enumerated per tile


def _routes(node: ir.Node) -> list[ir.Prim]:
    return list(dict.fromkeys(p for p in ir.walk(node) if isinstance(p, ir.Prim) and p.name == "route"))


def _without_routes(node: ir.Node) -> ir.Node:
    if isinstance(node, ir.Prim):
        return ir.EMPTY if node.name == "route" else node
    if isinstance(node, ir.Not):
        return ir.complement(_without_routes(node.item))
    combine = ir.union if isinstance(node, ir.Union) else ir.inter
    return combine(*(_without_routes(i) for i in node.items))


def _route_facts(prim, ctx, head):
    n_q, n_k, qgroup, kblock = semantics.route_blocks(prim, ctx)
    cand = semantics._candidates(prim.arg("among"), qgroup, kblock, n_q, n_k, ctx, [head], 1, 1)[0]
    return n_q, n_k, qgroup, kblock, cand


def oracle(p, lq, lk, bm, bn, head=0):
    """``(states, skipped)``: per tile the set of states over every possible local choice (None: skipped)."""
    node = p.ir.node_for_head(head)
    ctx = semantics.Context(lq, lk, p.ir.layout)
    routes = _routes(node)
    facts = {r: _route_facts(r, ctx, head) for r in routes}
    nqb, nkb = math.ceil(lq / bm), math.ceil(lk / bn)
    out = {}
    skipped = 0
    for m, n in itertools.product(range(nqb), range(nkb)):
        rows = torch.arange(m * bm, min(lq, m * bm + bm))
        cols = torch.arange(n * bn, min(lk, n * bn + bn))
        slots = []  # (route, group, list of possible chosen block sets)
        for r, (_, _, qgroup, _, cand) in facts.items():
            take = r.arg("topk")
            for a in torch.unique(qgroup[rows]).tolist():
                blocks = torch.nonzero(cand[a]).flatten().tolist()
                slots.append((r, a, list(itertools.combinations(blocks, min(take, len(blocks))))))
        if math.prod(len(s[2]) for s in slots) > ENUM_LIMIT:
            out[m, n] = None
            skipped += 1
            continue
        states = set()
        for combo in itertools.product(*(s[2] for s in slots)):
            tables = {r: torch.zeros(f[0], f[1], dtype=torch.bool) for r, f in facts.items()}
            for (r, a, _), chosen in zip(slots, combo, strict=True):
                tables[r][a, list(chosen)] = True
            val = semantics.evaluate(node, rows[:, None], cols[None, :], head, ctx, tables)
            states.add(int(tile_reduce(val, bm, bn)[0, 0]))
        out[m, n] = states
    return out, skipped


STATIC = ["causal", "window({a})", "window({a}, {b})", "blocks({s})", "sink({a})", "strided({s})", "full"]


def _static(rng):
    return rng.choice(STATIC).format(a=rng.randint(0, 4), b=rng.randint(0, 3), s=rng.randint(2, 5))


def _route(rng):
    among = rng.choice(["full", "causal", "causal - blocks({s})", "blocks({s})", "window({a})", _static(rng)])
    among = among.format(a=rng.randint(0, 5), s=rng.randint(2, 5))
    return (
        f"route({rng.randint(1, 3)}, block = {rng.randint(2, 4)}, qblock = {rng.choice([1, 2, 3, 4])}, among = {among})"
    )


def _expr(rng, depth, routes):
    if depth == 0 or rng.random() < 0.3:
        if routes[0] < 2 and rng.random() < 0.5:
            routes[0] += 1
            return _route(rng)
        return _static(rng)
    op = rng.choice(["&", "|", "-", "~"])
    if op == "~":
        return f"~({_expr(rng, depth - 1, routes)})"
    return f"({_expr(rng, depth - 1, routes)} {op} {_expr(rng, depth - 1, routes)})"


def random_route_pattern(rng):
    routes = [0]
    body = _expr(rng, 3, routes)
    if not routes[0]:
        body = f"({body}) {rng.choice(['&', '|', '-'])} {_route(rng)}"
    return f"pattern p {{ {body} }}"


def _check_plan(src, lq, lk, bm, bn):
    p = patterndsl.compile(src)
    plan = p.plan(lq, lk, block=(bm, bn), order="identity")
    tiles = plan.tiles()[0]
    want, skipped = oracle(p, lq, lk, bm, bn)
    unproven = plan.stats.extra.get("tiles_dynamic_unproven", 0)
    wrong = 0
    for (m, n), states in want.items():
        got = int(tiles[m, n])
        if states is None:
            continue
        if len(states) > 1:
            assert got == 3, (src, lq, lk, bm, bn, m, n, states, got)
        elif got == 3:
            wrong += 1  # allowed only as a counted unproven tile
        else:
            assert {got} == states, (src, lq, lk, bm, bn, m, n, states, got)
    assert wrong <= unproven, (src, lq, lk, bm, bn, wrong, unproven)
    assert plan.stats.tiles_dynamic == int((tiles == 3).sum())
    return plan, skipped


@pytest.mark.parametrize("seed", range(60))
def test_random_route_plans_are_3_exactly_where_choices_differ(seed):
    rng = random.Random(seed)
    src = random_route_pattern(rng)
    lq, lk = rng.randint(3, 12), rng.randint(3, 12)
    bm, bn = rng.randint(1, 4), rng.randint(1, 4)
    _, skipped = _check_plan(src, lq, lk, bm, bn)
    assert skipped <= math.ceil(lq / bm) * math.ceil(lk / bn) // 2


CASES = [
    # (source, lq, lk, bm, bn)
    ("pattern p { causal & (window(2) | route(1, block = 4, among = causal)) }", 16, 16, 4, 4),
    ("pattern p { route(1, block = 4, among = blocks(4)) }", 16, 16, 4, 4),
    ("pattern p { causal & route(1, block = 4, among = blocks(4)) }", 16, 16, 8, 8),
    # two candidates per group, both in one tile, one taken: never empty, never full
    ("pattern p { route(1, block = 2, among = blocks(4)) }", 8, 8, 4, 4),
    ("pattern p { window(3, 3) - route(1, block = 2, among = blocks(4)) }", 12, 12, 4, 4),
    ("pattern p { causal & (blocks(4) | route(2, block = 4, qblock = 1, among = causal - blocks(4))) }", 20, 20, 4, 4),
    ("pattern p { causal & (blocks(4) | route(1, block = 2, qblock = 2, among = causal - blocks(4))) }", 12, 12, 4, 4),
    ("pattern p { route(2, block = 3, among = causal) | ~route(1, block = 2, among = window(3)) }", 9, 9, 3, 3),
]


@pytest.mark.parametrize("src,lq,lk,bm,bn", CASES)
def test_route_plan_cases(src, lq, lk, bm, bn):
    _check_plan(src, lq, lk, bm, bn)


def test_forced_and_single_block_cases_decided_statically():
    p = patterndsl.compile(CASES[3][0]).plan(8, block=(4, 4), order="identity")
    assert p.tiles()[0].tolist() == [[1, 0], [0, 1]]
    # the tile is the route alone (no static part): decided from per-tile counts, no element evaluated
    assert p.stats.tiles_dynamic == 0 and p.stats.tiles_evaluated == 0 and p.stats.elements_evaluated == 0
    forced = patterndsl.compile(CASES[2][0]).plan(16, block=(8, 8), order="identity")
    assert forced.tiles()[0].tolist() == [[1, 0], [0, 1]]
    # causal & blocks(4) on the two diagonal 8x8 tiles: 2 * (4 * 5 / 2) pairs each
    assert forced.stats.allowed_pairs == 40 and "dynamic_pairs_bound" not in forced.stats.extra
    assert forced.groups[0].route_mask.tolist() == [True, True]


def _data(lq, lk, heads, kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, 8, generator=gen)
    k = torch.randn(2, kv_heads, lk, 8, generator=gen)
    v = torch.randn(2, kv_heads, lk, 8, generator=gen)
    return q, k, v


@pytest.mark.parametrize("src,lq,lk,bm,bn", CASES)
def test_route_mask_and_stats_hold_for_real_choices(src, lq, lk, bm, bn):
    p = patterndsl.compile(src)
    plan = p.plan(lq, lk, block=(bm, bn), order="identity")
    g = plan.groups[0]
    tiles = plan.tiles()[0]
    bound = plan.stats.extra.get("dynamic_pairs_bound", 0)
    rows = torch.repeat_interleave(torch.arange(plan.n_q_tiles), torch.diff(g.tiles.row_ptr))
    ctx = semantics.Context(lq, lk, p.ir.layout)
    plain = semantics.evaluate(_without_routes(g.node), torch.arange(lq)[:, None], torch.arange(lk)[None, :], 0, ctx)
    for seed in range(3):
        q, k, _ = _data(lq, lk, 1, 1, seed)
        mask = p.mask(lq, lk, 1, q=q, k=k)[0, 0]
        red = tile_reduce(mask, bm, bn)
        fixed = tiles != 3
        assert torch.equal(red[fixed], tiles[fixed])
        assert plan.stats.allowed_pairs <= int(mask.sum()) <= plan.stats.allowed_pairs + bound
        # where route_mask is False, no route allows an element: the mask is the static part's
        per_tile = zip(rows.tolist(), g.tiles.cols.tolist(), g.tiles.state.tolist(), g.route_mask.tolist(), strict=True)
        for r, c, st, flag in per_tile:
            if st == 1 and not flag:
                sl = (slice(r * bm, r * bm + bm), slice(c * bn, c * bn + bn))
                assert torch.equal(mask[sl], plain[sl]), (r, c)


@pytest.fixture
def cpu_tiles(monkeypatch):
    import patterndsl.runtime as rt

    monkeypatch.setattr(rt, "CPU_BLOCK", (4, 4))


@pytest.mark.parametrize("src", [c[0] for c in CASES[1:5]])
def test_route_attention_on_statically_decided_tiles(src, cpu_tiles):
    # On 4x4 CPU tiles these plans hold route tiles decided statically (1 or 2): the executor
    # must still apply the run-time choice inside them.
    p = patterndsl.compile(src)
    q, k, v = _data(12, 12, 2, 1, seed=11)
    q, k, v = (t.double().requires_grad_(True) for t in (q, k, v))
    out, lse = p(q, k, v, return_lse=True, backend="cpu")
    mask = p.mask(12, 12, 2, q=q, k=k)
    ref, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().requires_grad_(True) for t in (q, k, v))
    want = torch.autograd.grad(reference_attention(q2, k2, v2, mask)[0], (q2, k2, v2), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_classification_is_pure_results_do_not_depend_on_call_order():
    """routeplan.classify returns its findings; fixing a choice makes a new engine and leaves the old one alone."""
    from patterndsl.analysis import engine as eng
    from patterndsl.analysis import routeplan
    from patterndsl.analysis.rewrite import simplify
    from patterndsl.sizes import Sizes

    p = patterndsl.compile("pattern p { causal & (window(6) | route(1, block = 8, among = causal)) }")
    node = simplify(p.ir.default)
    engine = eng.identity_engine(Sizes(48, 48), 0, (8, 8))
    first = routeplan.classify(engine, node)
    first = first.expanded() if hasattr(first, "expanded") else first  # runs (routeruns) listed
    assert engine.fixed is None
    forced = engine.fixing(first.forced)
    assert forced.fixed is first.forced and forced.tally is engine.tally and engine.fixed is None
    again = routeplan.classify(eng.identity_engine(Sizes(48, 48), 0, (8, 8)), node)
    again = again.expanded() if hasattr(again, "expanded") else again
    for name in ("keys", "state", "route_mask", "open"):
        assert getattr(first, name).tolist() == getattr(again, name).tolist(), name
    a, b = p.plan(48, block=(8, 8)), p.plan(48, block=(8, 8))
    assert {**vars(a.stats), "plan_seconds": 0} == {**vars(b.stats), "plan_seconds": 0}
