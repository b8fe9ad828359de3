"""Parts with their own token orders (issue 17): the split is exact (disjoint parts covering the
pattern, each part's tiles exact in its own order), never chosen when it does not pay, exposed by
``Pattern.plan``, and attention through parts equals the float64 reference on the CPU path."""

from __future__ import annotations

import pytest
import torch

import patterndsl as pd
from patterndsl import ir, runtime, semantics
from patterndsl.analysis import parts
from patterndsl.analysis.plan import tile_reduce
from patterndsl.runtime import combine, plans

#: Every split pays at these small sizes: no cost per pass, no shortcut on efficient plans, thin
#: tiles cheaper than the plan's (they are not by default at 64x64).
EAGER = parts.PartOptions(pass_tiles=0, keep_above=1.0, min_side=32)

DILATED_GLOBAL = "pattern p { window(4, 4, dilation = 8) | global(2) }"
STRIDED = "pattern p { causal & (window(15) | strided(16)) }"
FIXED = "pattern p { causal & (blocks(32) | summary(32, 4)) }"
PER_HEAD = """pattern p {
    heads 0..1: causal & (window(7) | window(24, dilation = 4))
    heads 1..2: causal & window(20, dilation = 4)
    causal & window(20)
}"""


@pytest.fixture
def eager():
    """Split options that split small plans, with the runtime's plan cache cleared around the test."""
    plans.clear()
    with parts.options(EAGER) as opts:
        yield opts
    plans.clear()


def test_terms_cover_the_node():
    p = pd.compile(STRIDED)
    found = parts.terms(p.ir.default, 6)
    assert len(found) == 2
    mask = p.mask(96)
    union = torch.zeros_like(mask)
    ctx = semantics.Context(96, 96, None)
    i, j = torch.arange(96)[:, None], torch.arange(96)[None, :]
    for term in found:
        union |= semantics.evaluate(term, i, j, 0, ctx)
    assert torch.equal(union[0], mask[0])
    # global(n) becomes its keys and its rows; past the limit the node stays whole
    g = pd.compile("pattern p { global(3) }").ir.default
    assert [str(t) for t in parts.terms(g, 6)] == ["sink(3)", "where(q < 3)"]
    assert parts.terms(p.ir.default, 1) == [p.ir.default]


def _part_masks(plan):
    return [semantics.mask(part.pattern, plan.q_len, plan.kv_len, plan.heads) for part in plan.parts]


@pytest.mark.parametrize(
    "src,lq,lk,heads",
    [
        (DILATED_GLOBAL, 256, 256, 1),
        pytest.param(DILATED_GLOBAL, 160, 256, 2, marks=pytest.mark.slow),
        pytest.param(STRIDED, 1024, 1024, 1, marks=pytest.mark.slow),
        (FIXED, 256, 256, 1),
        (PER_HEAD, 256, 256, 3),
    ],
)
def test_parts_are_disjoint_cover_the_pattern_and_are_exact(eager, src, lq, lk, heads):
    p = pd.compile(src)
    plan = p.plan(lq, lk, heads, block=(64, 64))
    assert len(plan.parts) >= 2
    mask = p.mask(lq, lk, heads)
    total = torch.zeros(mask.shape, dtype=torch.int64)
    for part, pmask in zip(plan.parts, _part_masks(plan), strict=True):
        total += pmask.to(torch.int64)
        for perm, n in ((part.q_order, lq), (part.kv_order, lk)):
            assert torch.equal(torch.sort(perm).values, torch.arange(n))
        bm, bn = part.block
        assert torch.equal(part.tiles(), tile_reduce(pmask[:, part.q_order][:, :, part.kv_order], bm, bn))
        assert part.stats.allowed_pairs == int(pmask.sum())
        assert not part.parts
    assert torch.equal(total, mask.to(torch.int64))  # disjoint, and the union is the pattern
    # tiles() keeps its contract for the whole pattern in the plan's one order
    assert torch.equal(plan.tiles(), tile_reduce(mask[:, plan.q_order][:, :, plan.kv_order], 64, 64))
    s = plan.stats
    assert s.part_stats == tuple(part.stats for part in plan.parts)
    assert s.executed_pairs == sum(part.stats.visited_pairs for part in plan.parts) <= s.visited_pairs
    assert s.executed_efficiency == pytest.approx(s.allowed_pairs / s.executed_pairs)
    assert s.flops(64)["executed"] == 4 * 64 * s.executed_pairs


def test_parts_have_their_own_orders_and_tiles(eager):
    plan = pd.compile(DILATED_GLOBAL).plan(256, block=(64, 64))
    shapes = {(part.order, part.block) for part in plan.parts}
    assert ("classes mod 8", (64, 64)) in shapes  # the dilated window in its residue classes
    assert ("identity", (64, 16)) in shapes  # the four sink keys in thin key tiles
    per_head = pd.compile(PER_HEAD).plan(256, heads=3, block=(64, 64))
    # heads wanting different orders get different passes; a head a part does not touch is empty there
    assert {part.order for part in per_head.parts} == {"identity", "classes mod 4"}
    assert any(ir.EMPTY in {g.node for g in part.groups} for part in per_head.parts)


@pytest.mark.parametrize("src", [DILATED_GLOBAL, STRIDED, FIXED, "pattern p { causal & window(40) }"])
def test_split_is_never_chosen_when_it_does_not_pay(src):
    p = pd.compile(src)
    with parts.options(EAGER):
        eager = p.plan(512, block=(64, 64))
    assert eager.stats.executed_pairs <= eager.stats.visited_pairs
    with parts.options(EAGER, pass_tiles=1 << 20):
        assert p.plan(512, block=(64, 64)).parts == ()  # one more pass costs more than anything saved
    single = p.plan(512, block=(64, 64), order="identity")
    assert single.parts == ()  # identity order means one order
    if "window(40)" in src:
        assert eager.parts == ()  # a plain band: its own order is the best there is
    # the default options keep small plans whole (a pass costs more than the pairs they waste)
    assert p.plan(256, block=(64, 64)).parts == ()


def test_default_options_split_long_sequences():
    plan = pd.compile("pattern p { window(32, 32, dilation = 8) | global(4) }").plan(4096, block=(64, 64))
    assert len(plan.parts) >= 2
    assert plan.stats.executed_efficiency >= 1.5 * plan.stats.block_efficiency


def _reference(pir, q, k, v, scale):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = semantics.attention(pir, q64, k64, v64, scale)
    return out, lse, (q64, k64, v64)


@pytest.mark.parametrize(
    "src,lq,lk,heads,kv_heads",
    [
        (DILATED_GLOBAL, 256, 256, 2, 1),  # grouped-query heads
        (DILATED_GLOBAL, 160, 256, 2, 2),  # Lq != Lk
        (PER_HEAD, 192, 192, 3, 3),  # per-head rules
        pytest.param(FIXED, 256, 256, 1, 1, marks=pytest.mark.slow),  # keys-first order
    ],
)
def test_cpu_attention_through_parts_matches_the_reference(eager, src, lq, lk, heads, kv_heads):
    p = pd.compile(src)
    assert p.plan(lq, lk, heads, block=runtime.CPU_BLOCK).parts, "the case must run as parts"
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(2, heads, lq, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, lk, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, lk, 16, generator=gen, requires_grad=True)
    dout = torch.randn(2, heads, lq, 16, generator=gen)
    dlse = torch.randn(2, heads, lq, generator=gen)
    scale = 0.3
    out, lse = p(q, k, v, scale=scale, return_lse=True, backend="cpu")
    ref_out, ref_lse, leaves = _reference(p.ir, q, k, v, scale)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    torch.autograd.backward((out, lse), (dout, dlse))
    torch.autograd.backward((ref_out, ref_lse), (dout.double(), dlse.double()))
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in leaves), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_combine_merges_disjoint_key_sets_exactly():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    s = q @ k.transpose(-1, -2)
    half = torch.zeros(8, 8, dtype=torch.bool)
    half[:, :3] = True
    half[5] = False  # a row the first part does not touch

    def part(allowed):
        lse = torch.where(allowed, s, float("-inf")).logsumexp(-1)
        p = torch.where(allowed, (s - lse[..., None]).exp(), 0.0).nan_to_num()
        return p @ v, lse

    out, lse = combine.forward([lambda: part(half), lambda: part(~half)])
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, s.logsumexp(-1))
    grads = combine.backward([lambda: (torch.ones(2), torch.full((3,), 2.0)), lambda: (torch.ones(2), torch.ones(3))])
    assert [g.tolist() for g in grads] == [[2.0, 2.0], [3.0, 3.0, 3.0]]


def test_show_plan_draws_each_part(tmp_path, capsys):
    from patterndsl import cli

    path = tmp_path / "dg.pdsl"
    path.write_text(DILATED_GLOBAL + "\n")
    with parts.options(EAGER):
        code = cli.main(["show", str(path), "--seq", "256", "--block", "64x64", "--stage", "plan", "--ascii"])
    out = capsys.readouterr().out
    assert code == 0
    assert "parts" in out and "part 1 of 3" in out and "part 3 of 3: order classes mod 8, tiles 64x64" in out
    assert "window(4, after = 4, dilation = 8) & ~(sink(2) | where(q < 2))" in out


@pytest.mark.slow
def test_debug_mode_verifies_the_parts(monkeypatch):
    from patterndsl import config

    monkeypatch.setattr(config, "debug_verify", lambda: True)
    with parts.options(EAGER):
        plan = pd.compile(DILATED_GLOBAL).plan(256, block=(64, 64))
    assert plan.parts  # planned and verified against the dense meaning
    whole = pd.compile(DILATED_GLOBAL).plan(256, block=(64, 64), order="identity")
    monkeypatch.setattr(parts, "split", lambda pir, single, opts=None: (whole, whole))
    with pytest.raises(AssertionError, match="not a partition"):
        pd.compile(DILATED_GLOBAL).plan(256, block=(64, 64))


def test_a_part_replanned_with_launch_tiles_keeps_its_order(eager):
    from patterndsl.runtime import triton_backend as tb

    plan = pd.compile(FIXED).plan(256, block=(64, 64))
    part = next(p for p in plan.parts if p.order.startswith("keys of"))
    assert part.block == (64, 16)  # the summary keys in thin key tiles
    # a launch row of 32 x 32 tiles: the part takes 32 rows and keeps its 16 keys per tile
    again = tb._tiled(part, (32, 32))
    assert again.block == (32, 16) and again.order == part.order and not again.parts
    assert again.candidate == part.candidate and tb._tiled(part, (32, 32)) is again
    assert torch.equal(again.kv_order, part.kv_order)
    assert tb._tiled(part, (64, 64)) is part  # its own shape fits the row: not re-planned
    assert tb._tiled(part, None) is part  # the interpreter runs any tiles
    # a whole plan takes the row's tiles
    assert tb._tiled(plan, (32, 32)).block == (32, 32)


@pytest.mark.slow
def test_tile_efficiency_targets_hold_at_4k():
    """The benchmark's 1-D suite at 4K tokens and 64x64 tiles: parts never below the single order or
    identity, ``window(32, 32, dilation = 8) | global(4)`` >= 1.8x identity, geometric mean >= 3x."""
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "tile_efficiency.py"
    spec = importlib.util.spec_from_file_location("tile_efficiency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ratios = {}
    for name, src, _, heads in bench.SUITE:
        if "layout" in src:
            continue
        p = pd.compile(src)
        ident = p.plan(4096, heads=heads, block=(64, 64), order="identity")
        auto = p.plan(4096, heads=heads, block=(64, 64))
        assert auto.stats.executed_pairs <= auto.stats.visited_pairs <= ident.stats.visited_pairs, name
        ratios[name] = auto.stats.executed_efficiency / ident.stats.block_efficiency
    assert ratios["dilated window + global"] >= 1.8
    assert math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)) >= 3.0


@pytest.mark.parametrize("src", [DILATED_GLOBAL, STRIDED])
def test_sampled_search_finds_the_parts_of_the_whole_search(src):
    # 128 query tiles: configurations are costed on 16 sampled tile rows plus the first and last
    p = pd.compile(src)
    single = p.plan(2048, block=(16, 16))
    sampled = parts.split(p.ir, single, EAGER)
    whole = parts.split(p.ir, single, parts.PartOptions(**{**vars(EAGER), "sample_rows": 0}))
    assert len(sampled) >= 2
    assert [(q.order, q.block) for q in sampled] == [(q.order, q.block) for q in whole]
    assert sum(q.stats.visited_pairs for q in sampled) == sum(q.stats.visited_pairs for q in whole)


def test_a_split_is_kept_only_when_its_planned_parts_pay():
    # the search may cost configurations on sampled tiles; the parts it settles on are planned and
    # checked exactly against the single order (with one pass more)
    p = pd.compile(DILATED_GLOBAL)
    single = p.plan(2048, block=(16, 16))
    found = parts.split(p.ir, single, EAGER)
    assert len(found) >= 2 and parts.pays(single, list(found), EAGER)
    assert not parts.pays(single, [single, single], EAGER)  # the single order twice costs twice
    assert not parts.pays(single, [single], EAGER)  # the same work: nothing paid for the pass
    costly = parts.PartOptions(**{**vars(EAGER), "pass_tiles": 1 << 20})
    assert not parts.pays(single, list(found), costly)
