"""Kernels of plans that run as parts (issue 17) on the Triton backend: every part gets kernels at its own
tile shape (thin 16-row or 16-key tiles included) fitted into the launch table's row, in its own token
order; ``kernel_source``, ``show --stage triton`` and the AOT builds show exactly those passes. Numerics
under the interpreter are in ``tests/interpreter/part_cases.py``; the AOT builds (zero spills on sm_80
and sm_90) are ``slow``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import patterndsl as pd
from patterndsl.analysis import parts
from patterndsl.codegen import kernel_source, launch_tiles, passes, specs_for
from patterndsl.codegen.launch import PLAN_TILES, fit_tiles

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

#: Splits pay at these sizes: no cost per pass or tile, thin tiles counted by their pairs alone.
EAGER = parts.PartOptions(pass_tiles=0, keep_above=1.0, tile_pairs=0, min_side=0)
DILATED_GLOBAL = "pattern p { window(4, 4, dilation = 8) | global(2) }"
#: Its parts at the runtime's 64 x 64 plan: the global keys in 64 x 16 tiles, its rows in 16 x 64 tiles,
#: the dilated window in residue classes.
SHAPES = [("identity", (64, 16)), ("identity", (16, 64)), ("classes mod 8", (64, 64))]


@pytest.fixture
def eager():
    with parts.options(EAGER) as opts:
        yield opts


def _shapes(specs):
    return [(s.order, (s.block_m, s.block_n)) for s in specs]


def test_the_runtime_plans_triton_calls_at_plan_tiles():
    from patterndsl import runtime

    assert runtime.TRITON_BLOCK == PLAN_TILES  # kernel_source splits where the launcher does


def test_fit_tiles_keeps_a_parts_narrow_side():
    assert fit_tiles((64, 64), (16, 64)) == (16, 64)
    assert fit_tiles((64, 32), (16, 64)) == (16, 32)
    assert fit_tiles((32, 16), (64, 16)) == (32, 16)
    assert fit_tiles((64, 64), (128, 128)) == (64, 64)


def test_each_part_gets_kernels_at_its_own_shape_on_every_row(eager):
    p = pd.compile(DILATED_GLOBAL)
    plan = p.plan(256, block=PLAN_TILES)
    assert [(part.order, part.block) for part in plan.parts] == SHAPES
    # float16 at head dim 64: the row is 64 x 64, every part keeps its shape
    assert _shapes(specs_for(p, 256)) == SHAPES
    # float32 at head dim 256, backward: the narrowest row; the thin sides stay 16
    row = launch_tiles(256, "sm_90", "backward", "float32")
    specs = specs_for(p, 256, kind="backward", head_dim=256, dtype=torch.float32, target="sm_80")
    assert _shapes(specs) == [(order, fit_tiles(row, shape)) for order, shape in SHAPES]
    assert [s.num_warps for s in specs] == [4, 4, 4]
    # the plans the launcher runs are the ones the specs describe
    for part, spec in zip(plan.parts, specs, strict=True):
        run = passes.fitted(part, row)
        assert run.block == (spec.block_m, spec.block_n) and run.order == part.order
        assert run.stats.allowed_pairs == part.stats.allowed_pairs and not run.parts
    # the interpreter runs any tiles: the parts' own
    assert all(passes.fitted(part, None) is part for part in plan.parts)


def test_a_plan_that_does_not_split_keeps_one_spec():
    p = pd.compile(DILATED_GLOBAL)
    [spec] = specs_for(p, 256)  # default options: a pass costs more than 256 tokens waste
    assert (spec.block_m, spec.block_n) == (64, 64) and "===== part" not in kernel_source(p, 256)


def test_kernel_source_and_show_print_every_part(eager, tmp_path, capsys):
    from patterndsl import cli

    p = pd.compile(DILATED_GLOBAL)
    text = kernel_source(p, 256, kind="backward")
    heads = [line for line in text.splitlines() if line.startswith("# ===== part")]
    assert heads == [
        "# ===== part 1 of 3: order identity, tiles 64x16 (passes merged by lse)",
        "# ===== part 2 of 3: order identity, tiles 16x64 (passes merged by lse)",
        "# ===== part 3 of 3: order classes mod 8, tiles 64x64 (passes merged by lse)",
    ]
    for piece in text.split("# ===== part")[1:]:
        compile(piece.split("\n", 1)[1], "part", "exec")  # each part's source is a module of its own
        assert "def bwd_dq_g0" in piece and "def bwd_dkdv_g0" in piece
    path = tmp_path / "dg.pdsl"
    path.write_text(DILATED_GLOBAL + "\n")
    assert cli.main(["show", str(path), "--seq", "256", "--stage", "triton"]) == 0
    out = capsys.readouterr().out
    assert out.count("# ===== part") == 3 and "tiles 16x64" in out and "BM = tl.constexpr(16)" in out


def test_golden_thin_row_part(eager, request):
    """The 16-row part (the global rows) of the forward: its kernel source, cache key line left out."""
    spec = specs_for(pd.compile(DILATED_GLOBAL), 256)[1]
    assert (spec.block_m, spec.block_n) == (16, 64)
    from patterndsl.codegen import render

    text = "".join(line for line in render(spec).splitlines(keepends=True) if not line.startswith("# cache key:"))
    path = GOLDEN / "parts_thin_rows_forward.py"
    if request.config.getoption("--update-golden"):
        path.write_text(text)
    assert path.exists(), f"missing {path}; run pytest --update-golden"
    assert text == path.read_text(), "generated source changed; run pytest --update-golden if intended"


# ----------------------------------------------------------------------------- AOT builds (slow)

#: Largest dynamic shared memory per block (bytes).
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.fixture
def compiled(compiled_triton, monkeypatch, tmp_path_factory):
    """AOT builds: Triton in compiled mode, a private kernel cache."""
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "aot-kernel-cache"))


def _assert_sound(kernels, target: str, rows: dict[str, int]) -> None:
    for k in kernels:
        r = k.resources
        assert r["spills"] == 0, f"{k.name} on {target} spills {r['spills']} bytes: {r}"
        assert max(k.shared, r["shared"]) <= SHARED_LIMIT[target], f"{k.name} shared memory {k.shared}"
        if k.name.endswith("bwd_preprocess"):
            continue
        assert r["mma"] > 0, f"{k.name} on {target} has no MMA instruction"
        # wgmma needs 64 rows per warpgroup: 16-row forward tiles run on mma.sync
        if target == "sm_90" and k.name.endswith("fwd_g0") and rows[k.name.split(".")[0]] >= 64:
            assert r["wgmma"] > 0, f"{k.name} on sm_90 does not use wgmma"
        if target == "sm_80":
            assert r["wgmma"] == 0


@pytest.mark.slow
@pytest.mark.aot
@pytest.mark.parametrize(("kind", "target"), [("forward", "sm_90"), ("backward", "sm_80")])
def test_part_kernels_build_without_spills(compiled, eager, kind, target):
    """Every part's kernels (64 x 16, 16 x 64 and 64 x 64 tiles) as ``show --stage sass`` builds them."""
    from patterndsl.codegen import inspect as aot

    p = pd.compile(DILATED_GLOBAL)
    rows = {f"part{i}": s.block_m for i, s in enumerate(specs_for(p, 256, kind=kind, target=target), 1)}
    kernels = aot.aot_kernels(p, 256, target=target, kind=kind)
    per_part = 1 if kind == "forward" else 3
    assert [k.name.split(".")[0] for k in kernels] == [name for name in rows for _ in range(per_part)]
    _assert_sound(kernels, target, rows)


@pytest.mark.slow
@pytest.mark.aot
@pytest.mark.parametrize("head_dim", [96, 256])
def test_thin_row_float32_tiles_build_without_spills_on_sm90(compiled, eager, head_dim):
    """The two thin shapes that spilled on 8 warps (float32 forward, 16 x 64 and 16 x 16 tiles on sm_90)."""
    from patterndsl.codegen import inspect as aot

    p = pd.compile(DILATED_GLOBAL)
    spec = specs_for(p, 256, head_dim=head_dim, dtype=torch.float32)[1]
    assert spec.block_m == 16 and spec.num_warps == 4
    _assert_sound(aot.compile_spec(spec, "sm_90"), "sm_90", {"fwd_g0": 16})


@pytest.mark.slow
@pytest.mark.aot
def test_reordered_backward_at_head_dim_256_builds_without_spills_on_sm80(compiled):
    """A dilated window in residue classes, bfloat16 backward at head dim 256: 32-row tiles (64 rows spilled)."""
    from patterndsl.codegen import inspect as aot
    from patterndsl.codegen import spec_for

    spec = spec_for(pd.compile("pattern p { window(4, 4, dilation = 8) }"), 256, kind="backward", head_dim=256,
                    dtype=torch.bfloat16, target="sm_80")  # fmt: skip
    assert spec.q_reordered and (spec.block_m, spec.block_n, spec.num_stages) == (32, 16, 1)
    _assert_sound(aot.compile_spec(spec, "sm_80"), "sm_80", {})
