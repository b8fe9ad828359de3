"""The primitive registry: every primitive gives every rule or opts out explicitly; its rules agree with its meaning.

A record that leaves a rule out is rejected (``validate``, run by ``register``),
so a primitive cannot be forgotten by a stage silently. Each registered static
primitive also needs an example here; its tile rules, counts, band and Triton
fragment are then checked against its dense meaning.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import patterndsl as pd
from patterndsl import ir, primitives, semantics
from patterndsl.analysis import engine as eng
from patterndsl.analysis.classify import Env
from patterndsl.analysis.plan import tile_reduce
from patterndsl.codegen.predicate import AuxTables, render_predicate
from patterndsl.errors import PatternError
from patterndsl.primitives import MISSING, REGISTRY, Primitive, register, validate
from patterndsl.sizes import Sizes

GRID = "layout grid(y = 5, x = 6)\n"
#: Example uses of every static primitive (a new primitive must add its own).
EXAMPLES = {
    "full": ["full"],
    "empty": ["empty"],
    "causal": ["causal"],
    "window": ["window(3, 2)", "window(4, 1, dilation = 3)"],
    "strided": ["strided(5)"],
    "blocks": ["blocks(6)"],
    "random": ["random(2, 8, seed = 1)"],
    "sink": ["sink(3)"],
    "global": ["global(4)"],
    "summary": ["summary(6, 2)"],
    "landmarks": ["landmarks(5)"],
    "where": ["where(q - k >= 3)", "where(2 * k <= q + 4)", "where(k % 3 == q % 2)", "where(k <= q + 3 * h - 2)"],
    "neighborhood": [
        GRID + "neighborhood(3)",
        GRID + "neighborhood((3, 2), dilation = (1, 2), causal = (true, false))",
    ],
}
#: Dynamic primitives are chosen from the data; tests/unit/test_plan_route.py and friends cover them.
DYNAMIC = {"route"}
#: Primitives that read run-time inputs or label tokens from the data: planned per call
#: (tests/unit/test_inputs_plan.py and tests/unit/test_clusters.py check their tiles).
DATA = {"within", "cluster", "lsh"}
SIZES = [(30, 30), (21, 30), (30, 21)]
HEADS = 3


def _complete(name: str = "test_half") -> Primitive:
    return Primitive(
        name,
        params=(),
        check=None,
        shape_args=None,
        check_sizes=None,
        reads_head=None,
        meaning=lambda prim, q, k, h, ctx, selection: 2 * k <= q,
        classify=None,
        needed_keys=None,
        candidates=None,
        cost=5,
        band=None,
        total=None,
        count=None,
        triton=lambda r, p: "2 * k <= q",
    )


RULES = [f.name for f in dataclasses.fields(Primitive) if f.name not in ("name", "grid", "dynamic")]


def test_every_registered_primitive_gives_every_rule():
    assert REGISTRY, "no primitive registered"
    for name, record in REGISTRY.items():
        assert record.name == name
        validate(record)
        for field in RULES:
            assert getattr(record, field) is not MISSING, (name, field)
        assert ir.SIGNATURES[name] == record.params


def test_ir_views_follow_the_registry():
    assert list(ir.SIGNATURES) == list(REGISTRY)
    assert set(ir.GRID_PRIMITIVES) == {n for n, r in REGISTRY.items() if r.grid} == {"neighborhood"}
    assert set(ir.DYNAMIC_PRIMITIVES) == {n for n, r in REGISTRY.items() if r.dynamic} == DYNAMIC
    assert "window" not in ir.DYNAMIC_PRIMITIVES and "route" in ir.DYNAMIC_PRIMITIVES
    assert "nope" not in ir.SIGNATURES
    with pytest.raises(KeyError):
        ir.SIGNATURES["nope"]


@pytest.mark.parametrize("field", RULES)
def test_a_record_that_leaves_a_rule_out_is_rejected(field):
    incomplete = dataclasses.replace(_complete(), **{field: MISSING})
    with pytest.raises(TypeError, match=f"'{field}' is not given"):
        validate(incomplete)
    with pytest.raises(TypeError, match="is incomplete"):
        register(incomplete)
    assert "test_half" not in REGISTRY


def test_a_record_built_without_a_rule_is_rejected():
    # What forgetting looks like when writing a new family module: the keyword is simply absent.
    forgotten = Primitive("test_half", params=(), check=None, shape_args=None, meaning=lambda *a: None, cost=1)
    with pytest.raises(TypeError) as err:
        register(forgotten)
    for field in ("check_sizes", "reads_head", "classify", "needed_keys", "candidates", "band", "total", "count"):
        assert f"'{field}' is not given" in str(err.value)
    assert "test_half" not in REGISTRY


def test_malformed_rules_are_rejected():
    record = _complete()
    validate(record)  # the explicit None opt-outs are accepted
    for change, message in [
        ({"meaning": None}, "'meaning' is required"),
        ({"classify": 3}, "'classify' must be a function or None"),
        ({"cost": True}, "'cost' must be int"),
        ({"params": ("x",)}, "ir.Param"),
    ]:
        with pytest.raises(TypeError, match=message):
            validate(dataclasses.replace(record, **change))


def test_registering_twice_and_unregistering():
    record = _complete()
    with primitives.registered(record):
        assert REGISTRY["test_half"] is record and "test_half" in ir.SIGNATURES
        with pytest.raises(ValueError, match="already registered"):
            register(record)
    assert "test_half" not in REGISTRY and "test_half" not in ir.SIGNATURES


def test_every_static_primitive_has_an_example():
    assert set(EXAMPLES) | DYNAMIC | DATA == set(REGISTRY), "add examples for new primitives to EXAMPLES"


CASES = [(name, body) for name, bodies in EXAMPLES.items() for body in bodies]


@pytest.mark.parametrize(("name", "body"), CASES)
def test_rules_agree_with_the_meaning(name, body):
    p = pd.compile(f"pattern t {{ {body} }}")
    node = p.ir.default
    assert isinstance(node, ir.Prim) and node.name == name
    record = REGISTRY[node.name]
    sizes = [(30, 30)] if p.ir.layout is not None else SIZES
    for lq, lk in sizes:
        dense = p.mask(lq, lk, HEADS)
        ctx = semantics.Context(lq, lk, p.ir.layout)
        for h in range(HEADS):  # heads share a mask only when the primitive does not read h
            assert torch.equal(dense[h], semantics.evaluate(node, torch.arange(lq)[:, None], torch.arange(lk), h, ctx))
        for order in ("identity", "auto"):
            for block in ((8, 8), (4, 16), (16, 4)):
                plan = p.plan(lq, lk, HEADS, block=block, order=order)
                ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
                assert torch.equal(plan.tiles(), ref), (body, lq, lk, order, block)
                assert plan.stats.allowed_pairs == int(dense.sum()), (body, lq, lk, order, block)
        env = Env(Sizes(lq, lk, p.ir.layout), 0)
        total = eng.symbolic_total(node, lq, lk, p.ir.layout, env)
        assert total is None or total == int(dense[0].sum()), (body, lq, lk)
        band = record.band(node, env) if record.band is not None else None
        if band is not None:
            lo, hi, mod = band
            d = torch.arange(lq)[:, None] + (lk - lq) - torch.arange(lk)[None, :]
            assert torch.equal(dense[0], (d >= lo) & (d <= hi) & (d % mod == 0)), (body, lq, lk)
        text = render_predicate("_allowed", node, p.ir.layout, lq, lk, AuxTables())
        assert text.startswith("@triton.jit")


def test_route_has_no_static_fragment():
    p = pd.compile("pattern t { causal & route(2, 8) }")
    route = next(s for s in ir.walk(p.ir.default) if isinstance(s, ir.Prim) and s.name == "route")
    with pytest.raises(PatternError, match="route"):
        render_predicate("_allowed", route, None, 32, 32, AuxTables())


def test_the_engine_names_no_primitive():
    # Capabilities (joint search, periods) are fields of the records, not names in the engine.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(eng))
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not named & set(REGISTRY), named & set(REGISTRY)


def test_where_capabilities():
    where = REGISTRY["where"]
    env = Env(Sizes(64, 64, None, 1), 0)
    boxed = pd.compile("pattern p { where(abs(q // 8 - k // 8) <= 1) }").ir.default
    half = pd.compile("pattern p { where(q - k >= 3) }").ir.default
    assert where.joint_search(boxed, env) and not where.joint_search(half, env)
    mod = pd.compile("pattern p { where(q % 4 == k % 6) }").ir.default
    assert sorted(set(where.periods(mod))) == [4, 6]
    assert REGISTRY["window"].joint_search is None and REGISTRY["window"].periods is None
    grid = pd.compile("pattern p { layout grid(y = 4, x = 4)\n where(k.x >= q.x // 2 + h) }")
    assert where.axes(grid.ir.default, grid.ir.layout) == (1,)
    flat = pd.compile("pattern p { layout grid(y = 4, x = 4)\n where(k.x >= q) }")
    assert where.axes(flat.ir.default, flat.ir.layout) is None
