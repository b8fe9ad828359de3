"""The IR passes every stage shares: ``ir.substitute`` (replace primitives), ``ir.routes``, polarities, bounds."""

from __future__ import annotations

import patterndsl as pd
from patterndsl import ir


def _node(body: str) -> ir.Node:
    return pd.compile(f"pattern p {{ {body} }}").ir.default


def test_substitute_keeps_the_node_when_nothing_changes():
    node = _node("causal & ~(window(4) | sink(2)) | blocks(8)")
    assert ir.substitute(node, lambda prim, sign: prim) is node


def test_substitute_passes_each_primitives_polarity_and_folds_identities():
    node = _node("causal & ~(window(4) - sink(2))")
    seen = {}

    def record(prim, sign):
        seen[prim.name] = sign
        return prim

    ir.substitute(node, record)
    assert seen == {"causal": 1, "window": -1, "sink": 1}
    assert ir.substitute(node, lambda p, s: ir.FULL if p.name == "window" else p) == _node("causal & sink(2)")
    assert ir.substitute(node, lambda p, s: ir.EMPTY if p.name == "causal" else p) == ir.EMPTY


def test_routes_and_their_polarities():
    a = _node("route(1, block = 4)")
    b = _node("route(2, block = 8)")
    node = (a & ir.CAUSAL) | ~(b | ~a)
    assert ir.routes(node) == (a, b)
    assert ir.polarities(node) == {a: {1}, b: {-1}}
    assert ir.routes(ir.CAUSAL) == ()


def test_route_bounds_replace_by_polarity_and_only_the_routes_asked():
    a = _node("route(1, block = 4)")
    b = _node("route(2, block = 8)")
    node = ir.union(ir.inter(a, ir.CAUSAL), ir.complement(b))
    assert ir.route_bound(node, True) == ir.union(ir.complement(ir.FULL), ir.EMPTY)  # empty | ~full
    assert ir.route_bound(node, False) == ir.FULL
    assert ir.route_bound(node, True, only={b}) == ir.inter(a, ir.CAUSAL)
    assert ir.route_bound(node, False, only={a}) == ir.union(ir.CAUSAL, ir.complement(b))
