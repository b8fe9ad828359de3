"""Property tests of the block plan: for random patterns, ``plan().tiles()`` equals the tile
reduction of the dense meaning (with the plan's permutations applied), for both orders.

Patterns are random trees of primitives and combinators built directly as IR (so they
cover argument values the grammar would also accept), at random lengths (``Lq != Lk``,
lengths that are not multiples of the tile), tile sizes, head counts with per-head rules,
and 1-3-D grids with neighborhoods.
"""

from __future__ import annotations

import random

import pytest
import torch

from patterndsl import analysis, ir, semantics
from patterndsl.analysis.plan import tile_reduce

# --------------------------------------------------------------------------- generators


def P(name, **kw):
    sig = ir.SIGNATURES[name]
    return ir.Prim(name, tuple((p.name, kw.get(p.name, p.default)) for p in sig))


def V(name):
    return ir.Var(name)


def C(v):
    return ir.Const(v)


def _lin(rng, grid_axes):
    terms = [V("q"), V("k")]
    terms += [ir.Coord(side, ax) for ax in grid_axes for side in "qk"]
    e = rng.choice(terms)
    for _ in range(rng.randint(0, 2)):
        op = rng.choice("+-")
        other = rng.choice([*terms, C(rng.randint(-6, 6)), ir.Arith("*", C(rng.randint(-2, 3)), rng.choice(terms))])
        e = ir.Arith(op, e, other)
    return e


def rand_pred(rng, grid_axes, depth=0):
    r = rng.random()
    if r < 0.55 or depth > 1:
        op = rng.choice(ir.Cmp.OPS)
        return ir.Cmp(op, _lin(rng, grid_axes), ir.Arith("+", _lin(rng, grid_axes), C(rng.randint(-8, 8))))
    if r < 0.7:
        m = rng.randint(2, 5)
        return ir.Cmp("==", ir.Arith("%", ir.Arith("-", V("q"), V("k")), C(m)), C(rng.randint(0, m - 1)))
    if r < 0.8:
        return ir.Cmp("<=", ir.Func("abs", (ir.Arith("-", V("q"), V("k")),)), C(rng.randint(0, 9)))
    if r < 0.9:
        return ir.LNot(rand_pred(rng, grid_axes, depth + 1))
    return ir.Logic(
        rng.choice(["and", "or"]), (rand_pred(rng, grid_axes, depth + 1), rand_pred(rng, grid_axes, depth + 1))
    )


def rand_prim(rng, layout, allow_head=True):
    names = ["causal", "full", "window", "window", "strided", "blocks", "summary", "sink", "global"]
    names += ["landmarks", "random", "where", "where", "empty"]
    if layout is not None:
        names += ["neighborhood"] * 4
    name = rng.choice(names)
    if name == "window":
        return P(name, before=rng.randint(-2, 24), after=rng.randint(-3, 8), dilation=rng.choice([1, 1, 2, 3, 4]))
    if name == "strided":
        return P(name, stride=rng.randint(1, 7))
    if name == "blocks":
        return P(name, size=rng.randint(1, 13))
    if name == "summary":
        s = rng.randint(1, 9)
        return P(name, stride=s, width=rng.randint(1, s))
    if name in ("sink", "global"):
        return P(name, n=rng.randint(0, 12))
    if name == "landmarks":
        return P(name, every=rng.randint(1, 9))
    if name == "random":
        return P(name, blocks=rng.randint(1, 4), block=rng.randint(1, 9), seed=rng.randint(0, 5))
    if name == "where":
        axes = layout.names if layout is not None else ()
        pred = rand_pred(rng, axes)
        if allow_head and rng.random() < 0.15:
            pred = ir.Logic("or", (pred, ir.Cmp("==", ir.Arith("%", V("k"), C(3)), ir.Arith("%", V("h"), C(3)))))
        return P(name, pred=pred)
    if name == "neighborhood":
        sizes, dils, strides, causals = [], [], [], []
        for n in layout.shape:
            d = rng.choice([1, 1, 2, 3]) if n >= 4 else 1
            d = min(d, n)
            s = rng.randint(1, max(1, n // d))
            sizes.append(s)
            dils.append(d)
            strides.append(rng.randint(1, s))
            causals.append(rng.random() < 0.3)
        return P(name, size=tuple(sizes), dilation=tuple(dils), stride=tuple(strides), causal=tuple(causals))
    return P(name)


def rand_node(rng, layout, depth=0):
    r = rng.random()
    if depth >= 3 or r < 0.35:
        return rand_prim(rng, layout)
    if r < 0.6:
        return ir.inter(*[rand_node(rng, layout, depth + 1) for _ in range(rng.randint(2, 3))])
    if r < 0.85:
        return ir.union(*[rand_node(rng, layout, depth + 1) for _ in range(rng.randint(2, 3))])
    return ir.complement(rand_node(rng, layout, depth + 1))


def rand_case(rng):
    """A random (PatternIR, Lq, Lk, heads, block)."""
    layout = None
    if rng.random() < 0.3:
        rank = rng.randint(1, 3)
        shape = [rng.randint(2, 9 if rank < 3 else 5) for _ in range(rank)]
        layout = ir.Layout(tuple((f"a{x}", n) for x, n in enumerate(shape)))
        lq = lk = layout.size
    else:
        lq = rng.randint(1, 70)
        lk = lq if rng.random() < 0.5 else rng.randint(1, 70)
    heads = rng.choice([1, 1, 2, 3])
    default = rand_node(rng, layout)
    rules = ()
    if heads > 1 and rng.random() < 0.5:
        rules = (ir.HeadRule(0, 1, rand_node(rng, layout)),)
    pir = ir.PatternIR("t", (), layout, rules, default)
    block = (rng.choice([1, 2, 3, 4, 5, 8, 16, 32]), rng.choice([1, 2, 3, 4, 7, 8, 16, 32]))
    return pir, lq, lk, heads, block


# --------------------------------------------------------------------------- checks


def check_plan(pir, lq, lk, heads, block, order):
    p = analysis.plan(pir, lq, lk, heads, block=block, order=order)
    dense = semantics.mask(pir, lq, lk, heads)
    qo, ko = p.q_order, p.kv_order
    assert qo.dtype == torch.int64 and ko.dtype == torch.int64
    assert torch.equal(torch.sort(qo).values, torch.arange(lq))
    assert torch.equal(torch.sort(ko).values, torch.arange(lk))
    ref = tile_reduce(dense[:, qo][:, :, ko], *block)
    got = p.tiles()
    assert got.dtype == torch.int8
    assert torch.equal(got, ref), f"order={order} plan.order={p.order}\n{pir}\nLq={lq} Lk={lk} block={block}"
    assert p.stats.allowed_pairs == int(dense.sum())
    assert p.stats.total_pairs == heads * lq * lk
    bm, bn = block
    rows = torch.clamp(lq - torch.arange(p.n_q_tiles) * bm, max=bm)
    cols = torch.clamp(lk - torch.arange(p.n_kv_tiles) * bn, max=bn)
    area = rows[:, None] * cols[None, :]
    assert p.stats.visited_pairs == int((area[None] * (ref > 0)).sum())
    assert p.stats.tiles_full == int((ref == 2).sum())
    assert p.stats.tiles_partial == int((ref == 1).sum())
    assert p.stats.tiles_empty == int((ref == 0).sum())
    for g in p.groups:
        # transposed lists hold the same tiles; runs expand to the same tiles
        tl = g.tiles
        dense_g = tl.to_dense(p.n_q_tiles, p.n_kv_tiles)
        t = torch.zeros_like(dense_g)
        counts = (tl.col_ptr[1:] - tl.col_ptr[:-1]).tolist()
        cidx = torch.tensor([c for c, cnt in enumerate(counts) for _ in range(cnt)], dtype=torch.int64)
        t[tl.rows, cidx] = tl.state_t
        assert torch.equal(t, dense_g)
        r = torch.zeros_like(dense_g)
        for row, lo, hi, st in zip(g.runs.row, g.runs.lo, g.runs.hi, g.runs.state, strict=True):
            r[row, lo:hi] = st
        assert torch.equal(r, dense_g)
    return p


def _cases(seed, count):
    rng = random.Random(seed)
    return [rand_case(rng) for _ in range(count)]


@pytest.mark.parametrize("chunk", range(8))
def test_random_patterns_match_dense(chunk):
    for pir, lq, lk, heads, block in _cases(1000 + chunk, 60):
        for order in ("identity", "auto"):
            check_plan(pir, lq, lk, heads, block, order)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(40))
def test_random_patterns_match_dense_large(chunk):
    for pir, lq, lk, heads, block in _cases(50_000 + chunk, 100):
        for order in ("identity", "auto"):
            check_plan(pir, lq, lk, heads, block, order)


def _route(rng, layout):
    among = rand_node(rng, layout, depth=2)
    if layout is not None and rng.random() < 0.5:
        box = tuple(rng.randint(1, 4) for _ in layout.shape)
        return P("route", topk=rng.randint(1, 3), block=box, score="mean", among=among, qblock=box)
    block = rng.randint(1, 9)
    qblock = rng.choice([1, block, rng.randint(1, 9)])
    return P("route", topk=rng.randint(1, 3), block=block, score="mean", among=among, qblock=qblock)


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_patterns_static_parts_exact(seed):
    rng = random.Random(7000 + seed)
    for _ in range(25):
        pir, lq, lk, _, block = rand_case(rng)
        route = _route(rng, pir.layout)
        node = rng.choice([ir.union, ir.inter])(pir.default, route)
        if rng.random() < 0.3:
            node = ir.complement(node)
        pir = ir.PatternIR("d", (), pir.layout, (), node)
        plan = analysis.plan(pir, lq, lk, 1, block=block)
        assert plan.order == "identity"
        tiles = plan.tiles()[0]
        for trial in range(2):
            g = torch.Generator().manual_seed(seed * 100 + trial)
            q = torch.randn(1, 1, lq, 4, generator=g)
            k = torch.randn(1, 1, lk, 4, generator=g)
            actual = tile_reduce(semantics.mask(pir, lq, lk, 1, q=q, k=k)[0], *block)[0]
            decided = tiles != 3
            assert torch.equal(tiles[decided], actual[decided]), f"{node}\nLq={lq} Lk={lk} block={block}"
