"""Property tests: the dense meaning respects the pattern algebra, and agrees with brute force.

Random expression trees over every static primitive (random arguments, random
``where`` predicates) are evaluated at random ``Lq``/``Lk`` (including
``Lq != Lk`` both ways) and compared: union/intersection/difference/complement
against the elementwise operations on the masks, De Morgan, the brute-force
oracle, and the round trip print -> ``patterndsl.compile`` (equal canonical IR
must give equal masks).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patterndsl
from patterndsl import ir, semantics
from patterndsl.printer import node_to_source
from tests.brute import brute_mask, pattern, prim

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

small = st.integers(0, 4)
positive = st.integers(1, 4)


@st.composite
def summaries(draw):
    stride = draw(positive)
    return prim("summary", stride, draw(st.integers(0, stride)))


int_leaves = st.one_of(
    st.sampled_from([ir.Var(n) for n in ("q", "k", "h", "Lq", "Lk")]),
    st.integers(-3, 5).map(ir.Const),
)


def int_exprs():
    def extend(inner):
        divisor = st.sampled_from([-3, -2, -1, 1, 2, 3, 4]).map(ir.Const)
        return st.one_of(
            st.builds(ir.Arith, st.sampled_from(["+", "-", "*"]), inner, inner),
            st.builds(ir.Arith, st.sampled_from(["//", "%"]), inner, divisor),
            st.builds(ir.Neg, inner),
            st.builds(lambda a: ir.Func("abs", (a,)), inner),
            st.builds(lambda f, a, b: ir.Func(f, (a, b)), st.sampled_from(["min", "max"]), inner, inner),
        )

    return st.recursive(int_leaves, extend, max_leaves=5)


def bool_exprs():
    cmp = st.builds(ir.Cmp, st.sampled_from(list(ir.Cmp.OPS)), int_exprs(), int_exprs())

    def extend(inner):
        return st.one_of(
            st.builds(
                lambda op, xs: ir.Logic(op, tuple(xs)),
                st.sampled_from(["and", "or"]),
                st.lists(inner, min_size=2, max_size=3),
            ),
            st.builds(ir.LNot, inner),
        )

    return st.recursive(cmp, extend, max_leaves=3)


primitives = st.one_of(
    st.sampled_from([prim("full"), prim("empty"), prim("causal")]),
    st.builds(lambda b, a, d: prim("window", b, a, d), small, st.integers(0, 3), positive),
    st.builds(lambda s: prim("strided", s), positive),
    st.builds(lambda s: prim("blocks", s), st.integers(1, 5)),
    summaries(),
    st.builds(lambda n: prim("sink", n), small),
    st.builds(lambda n: prim("global", n), small),
    st.builds(lambda e: prim("landmarks", e), positive),
    st.builds(lambda c, b, s: prim("random", c, b, s), st.integers(0, 3), positive, st.integers(0, 5)),
    st.builds(lambda p: prim("where", p), bool_exprs()),
)


def trees():
    def extend(inner):
        return st.one_of(
            st.builds(lambda a, b: ir.union(a, b), inner, inner),
            st.builds(lambda a, b: ir.inter(a, b), inner, inner),
            st.builds(lambda a, b: ir.difference(a, b), inner, inner),
            st.builds(ir.complement, inner),
        )

    return st.recursive(primitives, extend, max_leaves=5)


lengths = st.tuples(st.integers(1, 11), st.integers(1, 11))


def m(node, Lq, Lk, heads=2):
    return semantics.mask(pattern(node), Lq, Lk, heads)


@SETTINGS
@given(trees(), trees(), lengths)
def test_combinators_are_elementwise(a, b, size):
    Lq, Lk = size
    ma, mb = m(a, Lq, Lk), m(b, Lq, Lk)
    assert torch.equal(m(ir.union(a, b), Lq, Lk), ma | mb)
    assert torch.equal(m(ir.inter(a, b), Lq, Lk), ma & mb)
    assert torch.equal(m(ir.difference(a, b), Lq, Lk), ma & ~mb)
    assert torch.equal(m(ir.complement(a), Lq, Lk), ~ma)
    # built without the folding helpers: the raw nodes mean the same
    assert torch.equal(m(ir.Union((a, b)), Lq, Lk), ma | mb)
    assert torch.equal(m(ir.Not(a), Lq, Lk), ~ma)


@SETTINGS
@given(trees(), trees(), lengths)
def test_de_morgan(a, b, size):
    Lq, Lk = size
    assert torch.equal(m(ir.complement(ir.union(a, b)), Lq, Lk), m(ir.inter(~a, ~b), Lq, Lk))
    assert torch.equal(m(ir.complement(ir.inter(a, b)), Lq, Lk), m(ir.union(~a, ~b), Lq, Lk))


@SETTINGS
@given(trees(), lengths)
def test_agrees_with_brute_force(node, size):
    Lq, Lk = size
    pir = pattern(node)
    assert torch.equal(semantics.mask(pir, Lq, Lk, heads=2), brute_mask(pir, Lq, Lk, heads=2))


@SETTINGS
@given(trees(), lengths)
def test_printed_source_compiles_to_the_same_meaning(node, size):
    Lq, Lk = size
    # check folds constants, so the compiled IR may be smaller than ``node``; the meaning may not change
    compiled = patterndsl.compile(f"pattern p {{ {node_to_source(node)} }}")
    assert torch.equal(compiled.mask(Lq, Lk, heads=2), m(node, Lq, Lk))
    again = patterndsl.compile(f"pattern p {{ {node_to_source(compiled.ir.default)} }}")
    assert again.ir == compiled.ir


@SETTINGS
@given(trees(), trees(), lengths)
def test_equal_canonical_ir_gives_equal_masks(a, b, size):
    Lq, Lk = size
    assert ir.union(a, b) == ir.union(b, a)
    assert torch.equal(m(ir.union(a, b), Lq, Lk), m(ir.union(b, a), Lq, Lk))
    assert torch.equal(m(ir.inter(a, ir.inter(b, a)), Lq, Lk), m(ir.inter(b, a), Lq, Lk))


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees(), lengths)
def test_agrees_with_brute_force_many(node, size):
    Lq, Lk = size
    pir = pattern(node)
    assert torch.equal(semantics.mask(pir, Lq, Lk, heads=2), brute_mask(pir, Lq, Lk, heads=2))
