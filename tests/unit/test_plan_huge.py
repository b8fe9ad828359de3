"""Issue 11, cause 4 (huge sizes): a plan's time and memory follow its tiles and head groups, never ``L``
or ``heads``; sizes beyond what a plan represents are a PatternError, raised at once.
"""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

import patterndsl as pd
from patterndsl.analysis import engine as eng
from patterndsl.analysis import planner
from patterndsl.analysis.classify import Env
from patterndsl.primitives import sums
from patterndsl.sizes import Sizes

TOTALS = ["global({v})", "blocks({v})", "strided({v})", "window({v}, {w}, dilation = {d})", "sink({v})"]


def _total(source: str, lq: int, lk: int):
    pir = pd.compile(f"pattern p {{ {source} }}").ir
    return eng.symbolic_total(pir.default, lq, lk, None, Env(Sizes(lq, lk, None, 1), 0))


def test_single_primitive_totals_are_formulas_that_agree_with_the_mask():
    rng = random.Random(11)
    for _ in range(60):
        lq, lk = rng.randint(1, 40), rng.randint(1, 40)
        template = rng.choice(TOTALS)
        source = template.format(v=rng.randint(1, 45), w=rng.randint(0, 9), d=rng.randint(1, 5))
        assert _total(source, lq, lk) == int(pd.compile(f"pattern p {{ {source} }}").mask(lq, lk).sum()), (
            source,
            lq,
            lk,
        )


def test_single_primitive_totals_cost_nothing_at_huge_lengths():
    # global, blocks, strided and a dilated window summed O(L) arrays: 16 GiB at L = 2**31.
    tracemalloc.start()
    try:
        for template in TOTALS:
            source = template.format(v=3, w=2, d=3)
            assert _total(source, 2**62, 2**62 - 5) > 0
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    n = 2**62
    assert _total("global(3)", n, n) == 3 * n + (n - 3) * 3
    assert _total("blocks(4)", n, n) == n * 4  # every query sees its whole block


def test_band_pairs_formula_against_counting():
    rng = random.Random(5)
    for _ in range(400):
        lo = rng.randint(-25, 25)
        hi, mod = lo + rng.randint(-3, 30), rng.randint(1, 6)
        lq, lk = rng.randint(1, 25), rng.randint(1, 25)
        off = lk - lq
        want = sum(1 for q in range(off, lk) for k in range(lk) if lo <= q - k <= hi and (q - k) % mod == 0)
        assert sums.band_pairs(lo, hi, mod, off, lk - 1, lk) == want, (lo, hi, mod, lq, lk)


def test_head_groups_follow_heads_lines_not_the_head_count():
    # plan(64, heads=2**20) looped over every head (the heads=2**40 spun there)
    p = pd.compile("pattern p { heads 0..3: causal; heads 3..5: where(k % (h + 1) == 0); window(1) }")
    start = time.process_time()
    plan = p.plan(64, heads=1 << 20, block=(64, 64))
    assert time.process_time() - start < 5.0
    assert len(plan.groups) == 4 and plan.groups[1].heads == (3,) and plan.groups[2].heads == (4,)
    assert plan.head_group[:6] == (0, 0, 0, 1, 2, 3) and plan.head_group[-1] == 3
    assert len(plan.groups[3].heads) == (1 << 20) - 5


def test_heads_planned_one_by_one_beyond_a_plan_are_a_located_error(monkeypatch):
    source = "pattern p {\n  heads 0..2: causal\n  heads 2..9999: where(k % (h + 1) == 0)\n  window(1)\n}"
    p = pd.compile(source)
    start = time.process_time()
    with pytest.raises(pd.PatternError, match=r"heads 2\.\.2000 read h: 1,998 heads planned one by one") as err:
        p.plan(16, heads=2000)
    assert time.process_time() - start < 2.0
    assert err.value.location == "<string>:3:3"
    assert planner.MAX_HEAD_GROUPS >= 128
    monkeypatch.setattr(planner, "MAX_HEAD_GROUPS", 8)
    assert len(p.plan(16, heads=10, block=(16, 16)).groups) == 9
    with pytest.raises(pd.PatternError, match="more than a block plan holds"):
        p.plan(16, heads=11)


@pytest.mark.parametrize("source", ["causal", "causal & window(5) | sink(1)", "global(1)", "causal & window(255)"])
def test_plans_at_two_to_the_31_are_refused_at_once_everywhere(source, tmp_path):
    # Unpatched limits: plan(2**31) and kernel_source(2**31) spent 37-89 s and over 5 GB before a
    # MemoryError (16 GiB before identity orders were implicit); show --stage plan ended in a traceback.
    import contextlib
    import io

    from patterndsl import cli

    p = pd.compile(f"pattern p {{ {source} }}")
    start = time.process_time()
    for call in (lambda: p.plan(2**31), lambda: p.plan(7, 2**31), lambda: p.kernel_source(2**31)):
        with pytest.raises(pd.PatternError, match=r"use larger tiles \(block=\(\d+, 4096\)\)"):
            call()
    path = tmp_path / "p.pdsl"
    path.write_text(f"pattern p {{ {source} }}\n")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["show", str(path), "--seq", "2147483648", "--stage", "plan"])
    assert code == 1 and "a side of more than 524,288 tiles" in err.getvalue(), err.getvalue()
    assert time.process_time() - start < 3.0


def test_orders_other_than_the_identity_are_not_built_beyond_a_length(monkeypatch):
    # window(3, dilation = 2) at 2**31 tokens in 4096-token tiles tried a by-class order: a 16 GiB permutation.
    p = pd.compile("pattern p { window(3, dilation = 2) }")
    assert planner.MAX_ORDER_LENGTH < 2**31 <= planner.MAX_SIDE_TILES * 4096
    assert not p.plan(256, block=(16, 16)).is_identity_order
    monkeypatch.setattr(planner, "MAX_ORDER_LENGTH", 255)
    plan = p.plan(256, block=(16, 16))
    assert plan.is_identity_order and plan.q_perm is None and plan.kv_perm is None
    assert plan.stats.allowed_pairs == int(p.mask(256).sum())
    assert p.plan(255, block=(16, 16)).q_perm is not None
