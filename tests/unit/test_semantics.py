"""semantics.evaluate / semantics.mask against the element-by-element oracle of tests/brute.py."""

from __future__ import annotations

import pytest
import torch

from patterndsl import ir, semantics
from patterndsl.errors import InputError, PatternError, PatternValueError
from tests.brute import brute_mask, drawn_blocks, pattern, prim

# Lq == Lk, Lq < Lk (chunked prefill / decoding), Lq > Lk (negative query positions).
SIZES = [(7, 7), (5, 13), (1, 6), (12, 5), (6, 1), (16, 16)]

STATIC = [
    prim("full"),
    prim("empty"),
    prim("causal"),
    prim("window", 2),
    prim("window", 3, 3),
    prim("window", 0),
    prim("window", 2, 1, 3),
    prim("window", 1, 0, 20),  # dilation beyond the sequence: only the diagonal
    prim("strided", 3),
    prim("strided", 1),
    prim("blocks", 4),
    prim("blocks", 1),
    prim("summary", 4),
    prim("summary", 4, 2),
    prim("summary", 3, 3),  # width == stride: every key
    prim("sink", 0),
    prim("sink", 2),
    prim("global", 0),
    prim("global", 3),
    prim("landmarks", 3),
    prim("landmarks", 1),
    prim("random", 2, 3),
    prim("random", 1, 2, 7),
    prim("random", 9, 2, 1),  # more blocks asked than exist
    prim("random", 0, 2),
    prim("random", 2, 4, -5),
]


def expr_pred(op, a, b):
    return ir.Cmp(op, a, b)


def V(name):
    return ir.Var(name)


def C(value):
    return ir.Const(value)


def A(op, a, b):
    return ir.Arith(op, a, b)


WHERE = [
    # (q - k) // 3 == -1 with negative operands: floor, not truncation.
    prim("where", expr_pred("==", A("//", A("-", V("q"), V("k")), C(3)), C(-1))),
    prim("where", expr_pred("==", A("%", A("-", V("q"), V("k")), C(4)), C(3))),
    prim("where", expr_pred("<=", ir.Func("abs", (A("-", V("q"), V("k")),)), C(2))),
    prim("where", expr_pred(">", ir.Func("min", (V("q"), V("k"))), C(2))),
    prim("where", expr_pred("<", ir.Func("max", (V("q"), ir.Neg(V("k")))), C(4))),
    prim("where", ir.Logic("or", (expr_pred("==", V("k"), C(0)), expr_pred("==", V("q"), A("*", C(2), V("k")))))),
    prim("where", ir.LNot(ir.Logic("and", (expr_pred(">=", V("k"), C(1)), expr_pred("!=", V("q"), V("k")))))),
    prim("where", expr_pred(">=", A("+", V("k"), V("Lq")), V("Lk"))),
    prim("where", C(True)),
    prim("where", C(False)),
    prim("where", expr_pred("<", V("Lq"), V("Lk"))),
]

COMBOS = [
    ir.inter(prim("causal"), ir.union(prim("window", 3), prim("sink", 2))),
    ir.difference(prim("causal"), prim("blocks", 2)),
    ir.complement(prim("causal")),
    ir.union(prim("strided", 2), ir.complement(prim("window", 1, 1))),
    ir.inter(prim("global", 2), ir.complement(prim("random", 1, 2))),
]


@pytest.mark.parametrize("Lq,Lk", SIZES)
@pytest.mark.parametrize("node", STATIC + WHERE + COMBOS, ids=str)
def test_matches_brute_force(node, Lq, Lk):
    pir = pattern(node)
    got = semantics.mask(pir, Lq, Lk)
    assert got.shape == (1, Lq, Lk) and got.dtype == torch.bool
    assert torch.equal(got, brute_mask(pir, Lq, Lk))


def test_end_alignment():
    # Decoding: one query at the end sees every key under causal.
    assert semantics.mask(pattern(prim("causal")), 1, 9).all()
    # Lq > Lk: the first Lq - Lk queries sit at negative positions and see nothing under causal.
    m = semantics.mask(pattern(prim("causal")), 6, 4)[0]
    assert not m[:2].any() and torch.equal(m[2:], torch.ones(4, 4, dtype=torch.bool).tril())


def test_causal_window_sees_before_plus_one_keys():
    before = 4
    m = semantics.mask(pattern(ir.inter(prim("causal"), prim("window", before))), 20)[0]
    counts = m.sum(1)
    assert (counts[before:] == before + 1).all()
    assert torch.equal(counts[:before], torch.arange(1, before + 1))


def test_window_3_3_is_band_of_width_7():
    m = semantics.mask(pattern(prim("window", 3, 3)), 20)[0]
    assert (m.sum(1)[3:-3] == 7).all()
    i, j = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    assert torch.equal(m, (i - j).abs() <= 3)


def test_where_zero_divisor_at_evaluation():
    # k // (Lq - Lk): zero only when the lengths are equal.
    node = prim("where", expr_pred("==", A("//", V("k"), A("-", V("Lq"), V("Lk"))), C(0)))
    semantics.mask(pattern(node), 5, 7)
    with pytest.raises(PatternValueError, match="division by zero"):
        semantics.mask(pattern(node), 5, 5)
    # a divisor that is zero for some elements only
    node = prim("where", expr_pred("==", A("%", V("q"), V("k")), C(0)))
    with pytest.raises(PatternValueError):
        semantics.mask(pattern(node), 4)


def test_heads_rules_and_h_in_where():
    h_even = prim("where", expr_pred("==", A("%", V("h"), C(2)), C(0)))
    per_head = ir.inter(prim("causal"), ir.union(h_even, prim("window", 1)))
    pir = pattern(per_head, heads=[(1, 3, prim("sink", 2)), (4, 5, prim("full"))])
    got = semantics.mask(pir, 6, 9, heads=6)
    assert torch.equal(got, brute_mask(pir, 6, 9, 6))
    assert torch.equal(got[1], got[2]) and not torch.equal(got[0], got[3])


def test_where_on_grid_coordinates():
    layout = {"t": 2, "y": 3, "x": 4}
    same_row = expr_pred("==", ir.Coord("q", "y"), ir.Coord("k", "y"))
    near_x = expr_pred("<=", ir.Func("abs", (A("-", ir.Coord("q", "x"), ir.Coord("k", "x")),)), C(1))
    later_t = expr_pred("<=", ir.Coord("k", "t"), ir.Coord("q", "t"))
    node = prim("where", ir.Logic("and", (same_row, near_x, later_t)))
    pir = pattern(node, layout)
    assert torch.equal(semantics.mask(pir, 24), brute_mask(pir, 24))
    x = semantics.grid_coords(torch.arange(24), ir.Layout(tuple(layout.items())))
    expected = [[t, y, xx] for t in range(2) for y in range(3) for xx in range(4)]
    assert torch.equal(torch.stack(x, 1), torch.tensor(expected))


def test_evaluate_broadcasts_and_flat_pairs():
    node = ir.inter(prim("causal"), ir.union(prim("window", 2), prim("random", 1, 4, 3)))
    ctx = semantics.Context(10, 16)
    dense = semantics.evaluate(node, torch.arange(10)[:, None], torch.arange(16)[None, :], 0, ctx)
    i = torch.randint(0, 10, (50,))
    j = torch.randint(0, 16, (50,))
    assert torch.equal(semantics.evaluate(node, i, j, 0, ctx), dense[i, j])
    # h as a tensor broadcasts as a leading dimension
    h_node = prim("where", expr_pred("==", V("h"), V("k")))
    heads = torch.arange(2)[:, None, None]
    out = semantics.evaluate(h_node, torch.arange(3)[:, None], torch.arange(4)[None, :], heads, ctx)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out[1], torch.tensor([[False, True, False, False]] * 3))


@pytest.mark.parametrize("seed", [0, 1, -3, 2**40 + 7])
def test_random_generator_matches_documented_definition(seed):
    for qblock in (-3, 0, 1, 5, 1000):
        for n_key_blocks, count in ((1, 1), (5, 2), (8, 8), (17, 3), (4, 9), (6, 0)):
            got = semantics.random_blocks(seed, qblock, n_key_blocks, count)
            assert list(got) == drawn_blocks(seed, qblock, n_key_blocks, count)
            assert len(set(got)) == len(got) == min(count, n_key_blocks)
            assert all(0 <= b < n_key_blocks for b in got)
        table = semantics.random_table(seed, range(-3, 40), 17, 3)
        assert table.tolist() == [list(semantics.random_blocks(seed, a, 17, 3)) for a in range(-3, 40)]


def test_random_depends_on_seed_and_query_block():
    rows = {semantics.random_blocks(0, a, 64, 4) for a in range(32)}
    assert len(rows) > 20
    assert semantics.random_blocks(0, 3, 64, 4) != semantics.random_blocks(1, 3, 64, 4)


def test_route_mask_needs_q_and_k():
    pir = pattern(ir.inter(prim("causal"), prim("route", 2, block=4)))
    with pytest.raises(PatternError, match="q= and k="):
        semantics.mask(pir, 8)


def test_route_mask_input_checks():
    pir = pattern(prim("route", 1, block=4))
    q = torch.randn(1, 2, 8, 4)
    k = torch.randn(1, 2, 8, 4)
    assert semantics.mask(pir, 8, heads=2, q=q, k=k).shape == (1, 2, 8, 8)
    with pytest.raises(InputError):
        semantics.mask(pir, 8, heads=2, q=q[:, :, :7], k=k)
    with pytest.raises(InputError):
        semantics.mask(pir, 8, heads=2, q=q, k=torch.randn(1, 3, 8, 4))
    with pytest.raises(InputError):
        semantics.mask(pir, 8, heads=2, q=q, k=torch.randn(1, 2, 8, 5))
    with pytest.raises(InputError):
        semantics.mask(pir, 8, heads=2, q=q[0], k=k)
    with pytest.raises(InputError):
        semantics.mask(pir, 8, heads=2, q=q, k=None)


def test_static_mask_with_q_and_k_gets_a_batch_dimension():
    pir = pattern(prim("causal"))
    q = torch.randn(3, 2, 5, 4)
    got = semantics.mask(pir, 5, heads=2, q=q, k=q)
    assert got.shape == (3, 2, 5, 5) and torch.equal(got[2, 1], semantics.mask(pir, 5)[0])


def test_mask_raises_the_length_checks():
    from patterndsl.errors import HeadsError, LayoutError

    grid = pattern(prim("where", C(True)), {"y": 2, "x": 3})
    with pytest.raises(LayoutError):
        semantics.mask(grid, 7)
    with pytest.raises(LayoutError):
        semantics.mask(grid, 6, 12)
    partial = ir.PatternIR("p", (), None, (ir.HeadRule(0, 2, prim("causal")),), None)
    assert semantics.mask(partial, 4, heads=2).shape == (2, 4, 4)
    with pytest.raises(HeadsError):
        semantics.mask(partial, 4, heads=3)


COMPILED = [
    ("pattern s(span = 3, sinks = 2) { causal & (window(span) | sink(sinks)) }", [(9, 9, 1), (4, 11, 1), (10, 3, 1)]),
    ("pattern b { causal - blocks(3) | global(2) }", [(8, 8, 1), (5, 9, 1)]),
    ("pattern w { where((q - k) % 3 == h and k >= Lk - Lq - 1) }", [(6, 6, 3), (4, 9, 2)]),
    (
        "pattern g {\n layout grid(t = 2, y = 3, x = 6)\n"
        " neighborhood((2, 3, 3), dilation = (1, 1, 2), causal = (true, false, false)) | where(q.x == k.y)\n}",
        [(36, 36, 1)],
    ),
    ("pattern hd {\n heads 0..2: causal & window(2)\n heads 3..4: random(2, 3, seed = 5)\n full\n}", [(9, 9, 5)]),
]


@pytest.mark.parametrize("source,sizes", COMPILED)
def test_compiled_patterns_match_brute_force(source, sizes):
    import patterndsl

    pat = patterndsl.compile(source)
    for Lq, Lk, heads in sizes:
        assert torch.equal(pat.mask(Lq, Lk, heads=heads), brute_mask(pat.ir, Lq, Lk, heads))


def test_splitmix_is_the_published_generator():
    # splitmix64's published first outputs from state 0 (Vigna's reference implementation).
    state, first = semantics._splitmix_next(0)
    _, second = semantics._splitmix_next(state)
    assert (first, second) == (0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4)


@pytest.mark.parametrize("node", [prim("full"), prim("sink", 2), prim("summary", 3), prim("where", C(True))], ids=str)
def test_evaluate_returns_writable_tensors(node):
    out = semantics.evaluate(node, torch.arange(4)[:, None], torch.arange(5)[None, :], 0, semantics.Context(4, 5))
    out &= torch.zeros(4, 5, dtype=torch.bool)
    assert out.shape == (4, 5) and not out.any()


def test_where_of_an_integer_is_a_type_error():
    from patterndsl.errors import PatternTypeError

    with pytest.raises(PatternTypeError):
        semantics.evaluate(prim("where", A("-", V("q"), V("k"))), 0, 0, 0, semantics.Context(3, 3))


def test_one_sizes_value_serves_semantics_analysis_and_plans():
    from patterndsl.analysis.classify import Env
    from patterndsl.sizes import Sizes

    layout = ir.Layout((("y", 2), ("x", 3)))
    sizes = Sizes(6, 6, layout, heads=4)
    assert semantics.Context is Sizes and semantics.Context(4, 9).offset == 5
    env = Env(sizes, head=2)
    assert (env.q_len, env.kv_len, env.layout, env.heads, env.head, env.offset) == (6, 6, layout, 4, 2, 0)
    import patterndsl

    plan = patterndsl.compile("pattern p { causal }").plan(12, 20, heads=3, block=(4, 4))
    assert plan.sizes == Sizes(12, 20, None, 3)
