"""Canonical order without printing: long unions and intersections, flat chains in the source.

The speed target (a 1,000-term union or intersection compiles in under 0.5 s) is measured by
``benchmarks/plan_scaling.py``; here the results are checked, with a generous time bound that
only a quadratic (or worse) path would break.
"""

from __future__ import annotations

import random
import time

import pytest

import patterndsl as pd
from patterndsl import ir
from patterndsl.errors import PatternTypeError

GENEROUS_SECONDS = 5.0


def _window(n: int) -> ir.Prim:
    return pd.compile(f"pattern p {{ window({n}) }}").ir.default


def _terms(n: int) -> list[str]:
    return [f"window({i + 1})" for i in range(n)]


@pytest.mark.parametrize("op", ["|", "&"])
def test_a_1000_term_flat_chain_compiles_to_one_sorted_node(op):
    start = time.perf_counter()
    node = pd.compile("pattern p { " + f" {op} ".join(_terms(1000)) + " }").ir.default
    assert time.perf_counter() - start < GENEROUS_SECONDS
    assert isinstance(node, ir.Union if op == "|" else ir.Inter)
    assert [item.arg("before") for item in node.items] == list(range(1, 1001))  # numeric, not text order


@pytest.mark.parametrize("op", ["|", "&"])
def test_1000_operators_applied_one_by_one_equal_the_flat_chain(op):
    leaves = [_window(i + 1) for i in range(1000)]
    random.Random(0).shuffle(leaves)
    start = time.perf_counter()
    acc = leaves[0]
    for leaf in leaves[1:]:
        acc = (acc | leaf) if op == "|" else (acc & leaf)
    assert time.perf_counter() - start < GENEROUS_SECONDS
    flat = pd.compile("pattern p { " + f" {op} ".join(_terms(1000)) + " }").ir.default
    assert acc == flat and hash(acc) == hash(flat)
    assert (acc | leaves[3]) == acc if op == "|" else (acc & leaves[3]) == acc


def test_a_flat_chain_longer_than_the_recursion_limit_is_not_nesting():
    # 3,000 terms: three times Python's default recursion limit (benchmarks/plan_scaling.py runs 10,000).
    node = pd.compile("pattern p { " + " | ".join(_terms(3000)) + " }").ir.default
    assert len(node.items) == 3000


def test_long_mixed_chains_fold_to_the_left():
    # 2000 terms of + and - at one precedence level: (((1 + 2) - 1) + 2) ... without recursion.
    total = " + ".join(["2 - 1"] * 1000)
    node = pd.compile(f"pattern p {{ window({total}) - sink(1) - sink(2) }}").ir.default
    assert node == pd.compile("pattern p { window(1000) & ~sink(2) & ~sink(1) }").ir.default


def test_an_error_deep_in_a_long_chain_points_at_its_operand():
    terms = _terms(600)
    terms[457] = "3"
    source = "pattern p { " + " | ".join(terms) + " }"
    with pytest.raises(PatternTypeError, match="needs patterns, got an integer") as err:
        pd.compile(source)
    assert err.value.span.column == source.index(" 3 ") + 2


def test_real_nesting_is_still_refused_politely():
    with pytest.raises(pd.PatternError, match="nests more than 64 levels deep"):
        pd.compile("pattern p { " + "(" * 5000 + "causal" + ")" * 5000 + " }")


def test_complement_pairs_and_identities_fold_in_long_unions():
    leaves = [_window(i + 1) for i in range(300)]
    many = ir.union(*leaves)
    assert ir.union(many, ~leaves[123]) == ir.FULL
    assert ir.inter(ir.inter(*leaves), ~leaves[7]) == ir.EMPTY
    assert ir.union(many, ir.EMPTY) == many and ir.inter(many, ir.FULL) == many
    assert ir.union(many, ir.FULL) == ir.FULL
