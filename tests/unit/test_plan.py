"""Block plan: exactness on named patterns, symbolic classification (no element evaluation where the
rules are exact), closed forms, statistics, routing bounds, head groups and argument errors."""

from __future__ import annotations

import pytest
import sympy as sp
import torch

import patterndsl as pd
from patterndsl import analysis, ir, semantics
from patterndsl.analysis.forms import evaluate_form
from patterndsl.analysis.plan import tile_reduce
from patterndsl.errors import PatternError


def reference(p: pd.Pattern, lq, lk=None, heads=1, block=(16, 16), order="auto"):
    plan = p.plan(lq, lk, heads, block=block, order=order)
    dense = p.mask(lq, lk, heads)
    ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
    return plan, dense, ref


SYMBOLIC = [
    "causal",
    "causal & window(37)",
    "window(5, 9)",
    "window(6, 2, dilation = 3)",
    "causal & window(20, dilation = 4)",
    "strided(5)",
    "causal & strided(7)",
    "blocks(24)",
    "summary(8, 3) | sink(5)",
    "global(9)",
    "landmarks(16) & causal",
    "causal & (window(32) | sink(4))",
    "random(2, 16, seed = 3)",
    "where(q - k >= 3 and k >= 2 * q - 90)",
    "causal - window(10)",
]


@pytest.mark.parametrize("body", SYMBOLIC)
@pytest.mark.parametrize("sizes", [(200, 200), (77, 200), (200, 77), (33, 33)])
def test_named_patterns_exact_and_symbolic(body, sizes):
    p = pd.compile(f"pattern t {{ {body} }}")
    for order in ("identity", "auto"):
        plan, dense, ref = reference(p, *sizes, block=(16, 8), order=order)
        assert torch.equal(plan.tiles(), ref), (body, sizes, order)
        assert plan.stats.allowed_pairs == int(dense.sum())
    # single primitives and plain bands never need element-wise evaluation in identity order
    if "&" not in body and "|" not in body and "-" not in body.replace("q - k", ""):
        assert p.plan(*sizes, block=(16, 8), order="identity").stats.tiles_evaluated == 0


def test_sliding_window_needs_no_evaluation_and_has_closed_form():
    p = pd.compile("pattern s(span = 100) { causal & window(span) }")
    plan = p.plan(5000, block=(64, 32))
    assert plan.stats.tiles_evaluated == 0
    g = plan.groups[0]
    assert g.forms is not None
    m = sp.Symbol("m", integer=True, nonnegative=True)
    assert g.forms.lo.free_symbols <= {m}
    ms = torch.arange(plan.n_q_tiles).numpy()
    lo, hi = evaluate_form(g.forms.lo, ms), evaluate_form(g.forms.hi, ms)
    for row in range(plan.n_q_tiles):
        cols = g.tiles.cols[g.tiles.row_ptr[row] : g.tiles.row_ptr[row + 1]]
        assert cols.tolist() == list(range(lo[row], hi[row]))


def test_closed_forms_checked_against_lists():
    for body in ["window(7, 3)", "causal", "full", "causal & window(40)"]:
        p = pd.compile(f"pattern t {{ {body} }}")
        for lq, lk in [(100, 100), (37, 100), (100, 37), (129, 300)]:
            plan = p.plan(lq, lk, block=(16, 32))
            f = plan.groups[0].forms
            assert f is not None, (body, lq, lk)
            ms = torch.arange(plan.n_q_tiles).numpy()
            vals = [evaluate_form(e, ms) for e in (f.lo, f.hi, f.full_lo, f.full_hi)]
            dense = plan.tiles()[0]
            for row in range(plan.n_q_tiles):
                lo, hi, flo, fhi = (int(v[row]) for v in vals)
                got = dense[row]
                want = torch.zeros_like(got)
                if hi > lo:
                    want[lo:hi] = 1
                if min(fhi, hi) > max(flo, lo):
                    want[max(flo, lo) : min(fhi, hi)] = 2
                assert torch.equal(got, want), (body, lq, lk, row)


def test_forms_absent_where_no_single_band():
    p = pd.compile("pattern t { blocks(16) | strided(5) }")
    assert p.plan(100, block=(16, 16)).groups[0].forms is None


def test_stats_fields():
    p = pd.compile("pattern t { causal & window(15) }")
    plan, dense, ref = reference(p, 100, block=(10, 10))
    s = plan.stats
    assert s.allowed_pairs == int(dense.sum())
    assert s.total_pairs == 100 * 100
    assert s.tiles_full + s.tiles_partial + s.tiles_empty == 100
    assert s.visited_pairs == 100 * int((ref > 0).sum())
    assert s.block_efficiency == pytest.approx(s.allowed_pairs / s.visited_pairs)
    assert s.density == pytest.approx(int(dense.sum()) / 10000)
    assert s.plan_seconds > 0
    flops = s.flops(64)
    assert flops["executed"] >= flops["useful"] > 0
    text = analysis.describe(plan)
    for word in ("density", "block efficiency", "visited pairs", "plan time", "tiles evaluated"):
        assert word in text


def test_heads_share_groups_and_per_head_rules():
    src = """
    pattern t {
        heads 0..2: causal & window(8)
        heads 2..3: where(k % 4 == h % 4)
        causal
    }
    """
    p = pd.compile(src)
    plan, _dense, ref = reference(p, 40, heads=6, block=(8, 8))
    assert torch.equal(plan.tiles(), ref)
    # heads 0,1 share; head 2 reads h (own group); heads 3..5 share the default
    assert plan.head_group[0] == plan.head_group[1]
    assert plan.head_group[3] == plan.head_group[4] == plan.head_group[5]
    assert len(plan.groups) == 3
    assert plan.transposed(0)[0].shape == (plan.n_kv_tiles + 1,)


def test_where_reading_h_gets_one_group_per_head():
    p = pd.compile("pattern t { where(k % 3 == h % 3) & causal }")
    plan, _, ref = reference(p, 30, heads=4, block=(4, 4))
    assert torch.equal(plan.tiles(), ref)
    assert len(plan.groups) == 4


def test_grid_neighborhoods_exact_and_symbolic_in_box_order():
    src = "pattern n { layout grid(y = 24, x = 24)\n neighborhood((5, 7), dilation = (1, 2)) }"
    p = pd.compile(src)
    plan, _dense, ref = reference(p, 576, block=(32, 32))
    assert torch.equal(plan.tiles(), ref)
    assert plan.order != "identity"
    assert plan.stats.tiles_evaluated == 0
    ident = p.plan(576, block=(32, 32), order="identity")
    assert plan.stats.visited_pairs < ident.stats.visited_pairs


def test_route_static_parts_exact_and_dynamic_bounded():
    src = (
        "pattern moba { causal & (blocks(16) | route(topk = 2, block = 16, qblock = 4, among = causal - blocks(16))) }"
    )
    p = pd.compile(src)
    plan = p.plan(96, block=(8, 8))
    tiles = plan.tiles()[0]
    static = pd.compile("pattern s { causal & blocks(16) }").plan(96, block=(8, 8)).tiles()[0]
    # the static part's full tiles stay full; groups with at most topk candidates (here the
    # groups of key block 1, whose only candidate is block 0) make more tiles full statically
    assert ((static == 2) <= (tiles == 2)).all()
    assert ((tiles == 2) & (static != 2)).any()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, 1, 96, 8, generator=g)
        k = torch.randn(1, 1, 96, 8, generator=g)
        actual = tile_reduce(p.mask(96, q=q, k=k)[0], 8, 8)[0]
        assert ((tiles == 0) <= (actual == 0)).all()
        decided = (tiles == 1) | (tiles == 2)
        assert torch.equal(tiles[decided], actual[decided])
    # candidates bound: a tile that no candidate block meets is never 3
    among = pd.compile("pattern a { causal - blocks(16) }")
    cand_tiles = among.plan(96, block=(16, 16)).tiles()[0] > 0
    assert (tiles == 3).any()
    for m, n in (tiles == 3).nonzero().tolist():
        # query tile m (8 rows) lies in query group m*8//4 .. ; key block n*8//16
        groups = {(m * 8 + r) // 16 for r in range(8)}
        assert any(cand_tiles[a, n * 8 // 16] for a in groups)


def test_dynamic_tiles_on_grid_boxes():
    src = "pattern b { layout grid(y = 8, x = 8)\n route(topk = 1, block = (4, 4), among = neighborhood(3)) }"
    p = pd.compile(src)
    plan = p.plan(64, block=(8, 8))
    tiles = plan.tiles()[0]
    assert set(tiles.unique().tolist()) <= {0, 3}
    q = torch.randn(1, 1, 64, 4)
    actual = tile_reduce(p.mask(64, q=q, k=q)[0], 8, 8)[0]
    assert ((tiles == 0) <= (actual == 0)).all()


def test_arguments_are_validated():
    p = pd.compile("pattern t { causal }")
    for bad in [(0, 16), (16,), (16, 16, 16), "16x16", (16.0, 16), (True, 16)]:
        with pytest.raises(PatternError):
            p.plan(64, block=bad)
    with pytest.raises(PatternError):
        p.plan(64, order="fancy")
    with pytest.raises(PatternError):
        p.plan(0)
    grid = pd.compile("pattern g { layout grid(y = 4, x = 4)\n neighborhood(3) }")
    with pytest.raises(PatternError):
        grid.plan(15)


def test_identity_orders_are_aranges():
    p = pd.compile("pattern t { window(3, 3, dilation = 4) }")
    plan = p.plan(50, block=(8, 8), order="identity")
    assert plan.order == "identity"
    assert torch.equal(plan.q_order, torch.arange(50)) and plan.q_order.dtype == torch.int64
    assert torch.equal(plan.kv_order, torch.arange(50))


def test_no_dense_tensor_for_long_sparse_patterns():
    # 256K tokens at 64x64 tiles: a dense tile map alone would be 16M entries; the plan stays small.
    p = pd.compile("pattern s { causal & window(127) }")
    plan = p.plan(1 << 18, block=(64, 64))
    # each query tile meets its diagonal tile and at most two before it
    assert plan.groups[0].tiles.nnz <= 3 * (1 << 12)
    assert plan.stats.allowed_pairs == sum(min(i, 127) + 1 for i in range(1 << 18))


def test_ambiguous_union_is_settled_by_boxes():
    # two partial operands in one tile: refining the tile into boxes decides the union symbolically
    p = pd.compile("pattern t { where((q + k) % 2 == 0) | where((q + k) % 2 == 1) }")
    plan, _, ref = reference(p, 32, block=(8, 8), order="identity")
    assert torch.equal(plan.tiles(), ref)
    assert (ref == 2).all()
    assert plan.stats.tiles_evaluated == 0 and plan.stats.elements_evaluated == 0
    # read on one side, each operand is decided on that side's pieces: at most once per query
    p = pd.compile("pattern t { where(q % 2 == 0) | where(q % 2 == 1) }")
    plan, _, ref = reference(p, 32, block=(8, 8), order="identity")
    assert torch.equal(plan.tiles(), ref)
    assert (ref == 2).all()
    assert plan.stats.tiles_evaluated == 0 and plan.stats.elements_evaluated <= 2 * 32


def test_evaluate_counts_ambiguous_tiles():
    # a predicate no box smaller than the tile decides (not periodic: ``//`` of a product): the
    # tiles are evaluated, and counted
    p = pd.compile("pattern t { where((q * k // 2) % 3 == 0) | where((q * k // 2) % 3 == 1) }")
    plan, _, ref = reference(p, 64, block=(32, 32), order="identity")
    assert torch.equal(plan.tiles(), ref)
    assert plan.stats.tiles_evaluated > 0
    assert 0 < plan.stats.elements_evaluated <= 2 * 4 * 32 * 32


def test_semantic_context_matches_plan_ir():
    node = ir.inter(ir.CAUSAL, ir.Prim("window", (("before", 4), ("after", 0), ("dilation", 1))))
    pir = ir.PatternIR("x", (), None, (), node)
    plan = analysis.plan(pir, 20, block=(4, 4))
    ref = tile_reduce(semantics.mask(pir, 20), 4, 4)
    assert torch.equal(plan.tiles(), ref)


def test_million_tokens_stay_small_in_memory():
    import tracemalloc

    p = pd.compile("pattern s { causal & window(1023) }")
    p.plan(4096)
    tracemalloc.start()
    plan = p.plan(1 << 20, block=(128, 128))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20
    assert plan.stats.tiles_evaluated == 0
    assert plan.stats.allowed_pairs == sum(min(i, 1023) + 1 for i in range(1 << 20))


def test_causal_minus_window_is_symbolic():
    p = pd.compile("pattern s { causal - window(10, 2) }")
    plan, dense, ref = reference(p, 150, 170, block=(16, 16))
    assert torch.equal(plan.tiles(), ref)
    assert plan.stats.tiles_evaluated == 0
    assert plan.stats.allowed_pairs == int(dense.sum())


def test_debug_mode_verifies_against_dense(monkeypatch):
    monkeypatch.setenv("PATTERNDSL_DEBUG", "1")
    p = pd.compile("pattern t { causal & (window(9) | summary(7, 2)) }")
    plan = p.plan(90, 70, block=(16, 8))
    assert plan.stats.allowed_pairs == int(p.mask(90, 70).sum())


@pytest.mark.parametrize("body", ["causal & landmarks(16)", "causal & summary(8, 3)", "causal & strided(6)"])
def test_allowed_pairs_counted_without_quadratic_evaluation(body):
    p = pd.compile(f"pattern t {{ {body} }}")
    plan = p.plan(2048, block=(64, 64), order="identity")
    # only tiles where two operands are partial (the diagonal) may be counted element-wise
    assert plan.stats.extra["tiles_counted_by_evaluation"] <= plan.n_q_tiles
    assert plan.stats.allowed_pairs == int(p.mask(2048).sum())


@pytest.mark.parametrize("body", ["strided(3)", "causal", "window(5)", "causal & window(1023)", "strided(1)"])
@pytest.mark.parametrize("sizes", [(29, 2), (64, 64), (100, 37)])
def test_closed_forms_carry_only_int32_constants(body, sizes):
    """An unbounded band end left in a closed form would overflow the kernels' int32 bounds."""
    p = pd.compile("pattern p { " + body + " }")
    form = p.plan(*sizes, 1, block=(16, 32), order="identity").groups[0].forms
    if form is not None:
        for expr in (form.lo, form.hi, form.full_lo, form.full_hi):
            for atom in sp.sympify(expr).atoms(sp.Rational):
                assert abs(atom.p) < 1 << 30 and atom.q < 1 << 30, (body, sizes, expr)


def test_sizes_beyond_a_plan_are_pattern_errors():
    # issue 11, huge sizes: refused up front, never an overflow, a runaway loop or a huge allocation
    p = pd.compile("pattern s { causal & window(255) }")
    for args, kwargs in (((2**70,), {}), ((64,), {"heads": 2**40}), ((10**12,), {}), ((64, 2**70), {})):
        with pytest.raises(PatternError, match=r"beyond|tiles"):
            p.plan(*args, **kwargs)


def test_plan_that_would_list_too_many_tiles_is_a_pattern_error(monkeypatch):
    from patterndsl.analysis import engine

    monkeypatch.setattr(engine, "MAX_TILES", 1000)
    with pytest.raises(PatternError, match="tiles"):
        pd.compile("pattern s { causal }").plan(1 << 14, block=(128, 128))


def test_identity_orders_are_not_materialised():
    plan = pd.compile("pattern s { causal & window(127) }").plan(1 << 20, block=(128, 128), order="identity")
    assert plan.q_perm is None and plan.kv_perm is None
    assert plan.is_identity_order
    # still readable as the contract's int64 permutations
    assert plan.q_order.dtype == torch.int64 and int(plan.q_order[-1]) == (1 << 20) - 1
    assert torch.equal(plan.kv_order[:5], torch.arange(5))


def test_show_plan_at_a_length_beyond_the_plan_is_a_message(monkeypatch, tmp_path, capsys):
    # `patterndsl show --seq 2147483648 --stage plan` ends in a message, not a traceback
    # (here with a small tile limit so the test does not need the memory to find out).
    from patterndsl import cli
    from patterndsl.analysis import engine

    monkeypatch.setattr(engine, "MAX_TILES", 1 << 20)
    src = tmp_path / "band.pdsl"
    src.write_text("pattern p { causal & window(255) }\n")
    code = cli.main(["show", str(src), "--seq", "2147483648", "--stage", "plan"])
    err = capsys.readouterr().err
    assert code == 1
    assert "tiles" in err and "Traceback" not in err
