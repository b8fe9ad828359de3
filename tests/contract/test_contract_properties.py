"""Randomised contract checks: random pattern expressions vs the hand-written oracle, their plans and attention."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import patterndsl
from tests.contract import oracle as o


def leaf(rng: random.Random):
    """One primitive as (source, rule on positions/head)."""
    kind = rng.choice(
        ["full", "causal", "window", "strided", "blocks", "summary", "sink", "global", "landmarks", "where", "whereh"]
    )
    if kind == "full":
        return "full", lambda q, k, h: o.full_like(q, k)
    if kind == "causal":
        return "causal", lambda q, k, h: o.causal(q, k)
    if kind == "window":
        b, a, d = rng.randint(0, 4), rng.randint(0, 3), rng.randint(1, 3)
        return f"window({b}, {a}, {d})", lambda q, k, h: o.window(q, k, b, a, d)
    if kind == "strided":
        s = rng.randint(1, 5)
        return f"strided({s})", lambda q, k, h: o.strided(q, k, s)
    if kind == "blocks":
        s = rng.randint(1, 7)
        return f"blocks({s})", lambda q, k, h: o.blocks(q, k, s)
    if kind == "summary":
        s = rng.randint(1, 6)
        w = rng.randint(1, s)
        return f"summary({s}, {w})", lambda q, k, h: o.summary(q, k, s, w)
    if kind == "sink":
        n = rng.randint(0, 4)
        return f"sink({n})", lambda q, k, h: o.sink(q, k, n)
    if kind == "global":
        n = rng.randint(0, 4)
        return f"global({n})", lambda q, k, h: o.global_(q, k, n)
    if kind == "landmarks":
        e = rng.randint(1, 5)
        return f"landmarks({e})", lambda q, k, h: o.landmarks(q, k, e)
    if kind == "where":
        c, m = rng.randint(-3, 3), rng.randint(1, 4)
        return (
            f"where((q - k + {c}) % {m} == 0 or abs(q - k) < {m})",
            lambda q, k, h: ((q - k + c) % m == 0) | (np.abs(q - k) < m),
        )
    m = rng.randint(2, 3)
    return f"where((k + h) % {m} != 0)", lambda q, k, h: (k + h) % m != 0


def expr(rng: random.Random, depth: int):
    """A random expression as (source, rule), fully parenthesised or relying on precedence."""
    if depth == 0 or rng.random() < 0.3:
        return leaf(rng)
    op = rng.choice(["|", "&", "-", "~"])
    if op == "~":
        s, f = expr(rng, depth - 1)
        return f"~({s})", lambda q, k, h: ~f(q, k, h)
    (sa, fa), (sb, fb) = expr(rng, depth - 1), expr(rng, depth - 1)
    rule = {
        "|": lambda q, k, h: fa(q, k, h) | fb(q, k, h),
        "&": lambda q, k, h: fa(q, k, h) & fb(q, k, h),
        "-": lambda q, k, h: fa(q, k, h) & ~fb(q, k, h),
    }[op]
    return f"({sa}) {op} ({sb})", rule


def case(seed: int):
    rng = random.Random(seed)
    src, rule = expr(rng, 3)
    lq = rng.randint(1, 24)
    lk = rng.choice([lq, rng.randint(1, 24)])
    heads = rng.randint(1, 3)
    bm, bn = rng.choice([1, 2, 3, 4, 8]), rng.choice([1, 2, 4, 5, 8])
    mask = o.to_mask(lambda q, k, h, *_: rule(q, k, h) & o.full_like(q, k), lq, lk, heads)
    return src, mask, lq, lk, heads, bm, bn


def check(seed: int, attention: bool):
    src, want, lq, lk, heads, bm, bn = case(seed)
    p = patterndsl.compile(f"pattern p {{ {src} }}")
    assert torch.equal(p.mask(lq, lk, heads), want), src
    for order in ("auto", "identity"):
        plan = p.plan(lq, lk, heads, block=(bm, bn), order=order)
        qo, ko = plan.q_order, plan.kv_order
        assert torch.equal(plan.tiles(), o.tile_reduce(want[:, qo][:, :, ko], bm, bn)), (src, order)
    if attention:
        q, k, v = o.rand_qkv(b=1, hq=heads, lq=lq, lk=lk, d=4, seed=seed)
        out, lse = p(q, k, v, return_lse=True)
        ref, ref_lse = o.reference_attention(q, k, v, want)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_random_expressions(seed):
    check(seed, attention=seed % 4 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(40, 400))
def test_random_expressions_many(seed):
    check(seed, attention=seed % 2 == 0)


def tup(values) -> str:
    return "(" + ", ".join(("true" if v else "false") if isinstance(v, bool) else str(v) for v in values) + ")"


def grid_leaf(rng: random.Random, extents):
    """A primitive that needs the layout: neighborhood or a where over grid coordinates."""
    if rng.random() < 0.5:
        sizes, dils, strides, causals = [], [], [], []
        for n in extents:
            d = rng.randint(1, 2)
            s = rng.randint(1, max(1, min(5, n // d)))
            sizes.append(s)
            dils.append(d)
            strides.append(rng.randint(1, s))
            causals.append(rng.random() < 0.3)
        src = f"neighborhood({tup(sizes)}, dilation = {tup(dils)}, stride = {tup(strides)}, causal = {tup(causals)})"
        m = o.neighborhood_mask(extents, tuple(sizes), tuple(dils), tuple(strides), tuple(causals))[0].numpy()
        return src, lambda q, k, h: m[q[:, 0]][:, k[0]]
    names = ["t", "y", "x"][-len(extents) :]
    a = rng.randrange(len(extents))
    w = rng.randint(0, 2)

    def rule(q, k, h):
        return np.abs(o.coords(q, extents)[a] - o.coords(k, extents)[a]) <= w

    return f"where(abs(q.{names[a]} - k.{names[a]}) <= {w})", rule


def big_expr(rng: random.Random, depth: int, extents):
    """Like :func:`expr`, with grid primitives mixed in when there is a layout."""
    if depth == 0 or rng.random() < 0.3:
        return grid_leaf(rng, extents) if extents and rng.random() < 0.5 else leaf(rng)
    op = rng.choice(["|", "&", "-", "~"])
    if op == "~":
        s, f = big_expr(rng, depth - 1, extents)
        return f"~({s})", lambda q, k, h: ~f(q, k, h)
    (sa, fa), (sb, fb) = big_expr(rng, depth - 1, extents), big_expr(rng, depth - 1, extents)
    rule = {
        "|": lambda q, k, h: fa(q, k, h) | fb(q, k, h),
        "&": lambda q, k, h: fa(q, k, h) & fb(q, k, h),
        "-": lambda q, k, h: fa(q, k, h) & ~fb(q, k, h),
    }[op]
    return f"({sa}) {op} ({sb})", rule


def check_big(seed: int):
    """Larger sizes and tiles than :func:`check`, grids included; masks, plans (both orders), attention."""
    rng = random.Random(seed)
    extents = rng.choice([None, None, (12, 16), (6, 7, 5), (20, 9)])
    src, rule = big_expr(rng, 3, extents)
    if extents:
        lq = lk = int(np.prod(extents))
        names = ["t", "y", "x"][-len(extents) :]
        head = "layout grid(" + ", ".join(f"{n} = {e}" for n, e in zip(names, extents, strict=True)) + ")\n"
    else:
        lq, lk, head = rng.randint(40, 300), rng.randint(40, 300), ""
        lk = rng.choice([lq, lk])
    heads = rng.randint(1, 2)
    bm, bn = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
    want = o.to_mask(lambda q, k, h, *_: rule(q, k, h) & o.full_like(q, k), lq, lk, heads)
    p = patterndsl.compile(f"pattern p {{ {head}{src} }}")
    assert torch.equal(p.mask(lq, lk, heads), want), src
    for order in ("auto", "identity"):
        plan = p.plan(lq, lk, heads, block=(bm, bn), order=order)
        qo, ko = plan.q_order, plan.kv_order
        assert torch.equal(plan.tiles(), o.tile_reduce(want[:, qo][:, :, ko], bm, bn)), (src, order, lq, lk, bm, bn)
    q, k, v = o.rand_qkv(b=1, hq=heads, lq=lq, lk=lk, d=4, seed=seed)
    out, lse = p(q, k, v, return_lse=True)
    ref, ref_lse = o.reference_attention(q, k, v, want)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_random_expressions_larger(seed):
    check_big(1000 + seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6, 150))
def test_random_expressions_larger_many(seed):
    check_big(1000 + seed)
