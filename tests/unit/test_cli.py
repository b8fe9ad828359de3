"""The ``patterndsl`` command, run in-process through ``cli.main``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl import cli, pictures
from patterndsl.analysis.plan import DYNAMIC, EMPTY, FULL, PARTIAL, plan_from_mask

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STREAMING = str(EXAMPLES / "streaming_llm.pdsl")


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.pdsl"
    path.write_text("pattern ok { causal }\n\npattern bad(n = 4) {\n    causal & windw(n)\n}\n")
    return path


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "text, expected",
    [
        ("n=4", ("n", 4)),
        ("n = -3", ("n", -3)),
        ("causal=true", ("causal", True)),
        ("causal=false", ("causal", False)),
        ("size=(3,7,7)", ("size", (3, 7, 7))),
        ("size=3,7,7", ("size", (3, 7, 7))),
        ("size=(3,)", ("size", (3,))),
        ("c=(true, false)", ("c", (True, False))),
    ],
)
def test_parse_param(text, expected):
    assert cli.parse_param(text) == expected


@pytest.mark.parametrize("text", ["n", "=4", "n=", "n=1.5", "n=__import__('os')", "n=()", "n=(1,(2))", "1n=3"])
def test_parse_param_rejects_anything_else(text):
    with pytest.raises(cli.UsageError):
        cli.parse_param(text)


def test_parse_block():
    assert cli.parse_block("128x64") == (128, 64)
    assert cli.parse_block("32") == (32, 32)
    for bad in ("0x64", "ax4", "64x", "-1x4"):
        with pytest.raises(cli.UsageError):
            cli.parse_block(bad)


# --------------------------------------------------------------------------- check


def test_check_ok(capsys):
    code, out, _ = run(capsys, "check", STREAMING)
    assert code == 0
    assert "OK" in out and "streaming" in out


def test_check_error_is_located_with_caret(capsys, bad_file):
    code, _, err = run(capsys, "check", bad_file)
    assert code != 0
    assert f"{bad_file}:4:14: unknown primitive 'windw'" in err
    assert "did you mean 'window'" in err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if "causal & windw(n)" in line)
    assert lines[at + 1].index("^") == lines[at].index("windw")


def test_check_syntax_error(capsys, tmp_path):
    path = tmp_path / "syntax.pdsl"
    path.write_text("pattern p {\n    causal & (window(4)\n}\n")
    code, _, err = run(capsys, "check", path)
    assert code == 1
    assert re.search(rf"{re.escape(str(path))}:3:1: ", err)
    assert "^" in err


def test_check_missing_file(capsys, tmp_path):
    code, _, err = run(capsys, "check", tmp_path / "nope.pdsl")
    assert code == 1
    assert "cannot read" in err


# --------------------------------------------------------------------------- show


def test_show_ir_round_trips(capsys):
    code, out, _ = run(capsys, "show", STREAMING, "--stage", "ir", "--param", "span=7", "--param", "sinks=2")
    assert code == 0
    assert patterndsl.compile(out) == patterndsl.load(STREAMING, span=7, sinks=2)


def test_show_picks_a_pattern_by_name(capsys):
    path = EXAMPLES / "sparse_transformer.pdsl"
    code, out, _ = run(capsys, "show", path, "--pattern", "sparse_fixed", "--stage", "ir")
    assert code == 0 and "summary(" in out
    code, _, err = run(capsys, "show", path, "--pattern", "nosuch", "--stage", "ir")
    assert code == 1 and "nosuch" in err


def _map_rows(out: str) -> list[str]:
    return [line[1:-1] for line in out.splitlines() if line.startswith("|") and line.endswith("|")]


def test_show_plan_draws_the_exact_tile_map(capsys):
    # causal at 512 tokens in 128x128 tiles: the diagonal is partial, below it full, above empty.
    code, out, _ = run(capsys, "show", STREAMING, "--param", "span=4096", "--seq", 512, "--stage", "plan")
    assert code == 0
    assert _map_rows(out) == ["░   ", "█░  ", "██░ ", "███░"]
    for name in ("density", "empty", "partial", "full", "visited pairs", "block efficiency", "FLOP", "plan time"):
        assert name in out
    assert "order" in out
    allowed = 512 * 513 // 2
    assert f"{allowed:,}" in out


def test_show_plan_ascii_and_block(capsys):
    argv = ["show", STREAMING, "--param", "span=4096", "--seq", 256, "--block", "64x128", "--stage", "plan"]
    code, out, _ = run(capsys, *argv, "--ascii")
    assert code == 0
    assert _map_rows(out) == [". ", ". ", "#.", "#."]


def test_show_plan_one_map_per_head_group(capsys):
    path = EXAMPLES / "s2_attention.pdsl"
    code, out, _ = run(capsys, "show", path, "--seq", 1024, "--heads", 6, "--stage", "plan", "--order", "identity")
    assert code == 0
    titles = [line for line in out.splitlines() if line.startswith("group ")]
    assert len(titles) == 5  # four sharded heads and the dense heads 4-5
    assert "heads 4-5" in titles[-1]


def test_show_plan_marks_run_time_tiles(capsys):
    path = EXAMPLES / "moba.pdsl"
    code, out, _ = run(capsys, "show", path, "--param", "block=64", "--seq", 512, "--block", "64x64", "--stage", "plan")
    assert code == 0
    # Own block on the diagonal (partial: causal inside it), earlier blocks chosen at run time, later ones
    # empty; the first topk = 2 query blocks have at most 2 candidates, all always chosen (full).
    assert _map_rows(out) == [("█" if m <= 2 else "?") * m + "░" + " " * (7 - m) for m in range(8)]
    assert "25 run-time" in out and "decided at run time" in out
    assert "up to 102,400 more" in out  # the 25 run-time tiles' 64 x 64 pairs, bounded and not counted


def test_show_plan_subsamples_large_maps(capsys):
    code, out, _ = run(capsys, "show", STREAMING, "--seq", 65536, "--stage", "plan", "--order", "identity")
    assert code == 0
    assert "one character = 11 x 11 tiles" in out  # 512 x 512 tiles into at most 48 x 96 characters
    rows = _map_rows(out)
    assert len(rows) <= pictures.MAX_ROWS and all(len(r) <= pictures.MAX_COLS for r in rows)


def test_show_plan_uses_the_layout_size(capsys):
    path = EXAMPLES / "video_neighborhood_3d.pdsl"
    code, out, _ = run(capsys, "show", path, "--param", "T=4", "--param", "H=8", "--param", "W=8", "--stage", "plan")
    assert code == 0
    assert "Lq 256" in out


def test_show_triton(capsys):
    code, out, _ = run(capsys, "show", STREAMING, "--seq", 256, "--stage", "triton", "--param", "span=64")
    assert code == 0
    assert "@triton.jit" in out


def test_show_reach_matches_the_receptive_field_argument(capsys):
    # Sparse Transformer: two layers of the strided pattern connect every causal pair.
    path = EXAMPLES / "sparse_transformer.pdsl"
    argv = ["show", path, "--pattern", "sparse_strided", "--param", "stride=16", "--seq", 256, "--stage", "reach"]
    code, out, _ = run(capsys, *argv, "--layers", 2)
    assert code == 0
    assert "after 2 layer(s): yes" in out and "smallest number of layers that does: 2" in out
    # A window of 16 moves information at most 16 positions per layer: query 255 needs key 4
    # (the first one that is not a sink) after ceil(251 / 16) = 16 layers.
    argv = ["show", STREAMING, "--param", "span=16", "--seq", 256, "--stage", "reach", "--layers", 4]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "after 4 layer(s): no" in out and "smallest number of layers that does: 16" in out


def test_show_reach_per_head_group_and_errors(capsys):
    path = EXAMPLES / "s2_attention.pdsl"
    code, out, _ = run(capsys, "show", path, "--param", "local=8", "--seq", 64, "--heads", 6, "--stage", "reach")
    assert code == 0
    assert out.count("smallest number of layers") == 5 and "heads 4, 5:" in out
    code, _, err = run(capsys, "show", EXAMPLES / "moba.pdsl", "--seq", 128, "--stage", "reach")
    assert code == 1 and "static" in err
    code, _, err = run(capsys, "show", STREAMING, "--seq", 128, "--kv-seq", 64, "--stage", "reach")
    assert code == 2 and "--kv-seq" in err


@pytest.mark.aot
@pytest.mark.parametrize("stage, target, needle", [("ptx", "sm_90", ".target sm_90"), ("sass", "sm_80", "regs")])
def test_show_ahead_of_time(capsys, stage, target, needle):
    argv = ["show", STREAMING, "--param", "span=64", "--seq", 256, "--stage", stage, "--target", target]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert needle in out and "fwd_g0" in out


# --------------------------------------------------------------------------- plot


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(capsys, tmp_path):
    out_file = tmp_path / "s.png"
    code, out, _ = run(
        capsys, "plot", STREAMING, "--param", "span=64", "--seq", 512, "--block", "64x64", "-o", out_file
    )
    assert code == 0 and _is_png(out_file) and str(out_file) in out


def test_plot_reordered_plan(capsys, tmp_path):
    out_file = tmp_path / "nat.png"
    path = EXAMPLES / "image_neighborhood_2d.pdsl"
    argv = ["plot", path, "--param", "H=16", "--param", "W=16", "--param", "dilation=2", "--block", "32x32"]
    code, _, _ = run(capsys, *argv, "-o", out_file)
    assert code == 0 and _is_png(out_file)


def test_plot_large_skips_the_mask_but_draws_tiles(capsys, tmp_path):
    out_file = tmp_path / "big.png"
    code, _, err = run(capsys, "plot", STREAMING, "--seq", 8192, "-o", out_file)
    assert code == 0 and _is_png(out_file)
    assert "mask not drawn" in err


def test_plot_route_pattern(capsys, tmp_path):
    out_file = tmp_path / "moba.png"
    path = EXAMPLES / "moba.pdsl"
    code, _, _ = run(capsys, "plot", path, "--param", "block=64", "--seq", 512, "--block", "64x64", "-o", out_file)
    assert code == 0 and _is_png(out_file)


# --------------------------------------------------------------------------- demo and bench


def test_demo(capsys):
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert "pattern video" in out
    assert "skipped" not in out, out
    err = re.search(r"max \|out - reference\| = ([0-9.e+-]+)", out)
    assert err and float(err.group(1)) < 1e-4


def test_bench_tiny(capsys):
    code, out, _ = run(capsys, "bench", STREAMING, "--param", "span=16", "--seq", 64, "--repeat", 1, "--no-flex")
    assert code == 0
    assert "patterndsl cpu" in out and "SDPA dense mask" in out
    diff = re.search(r"max \|diff\| vs SDPA ([0-9.e+-]+)", out)
    assert diff and float(diff.group(1)) < 1e-4


# --------------------------------------------------------------------------- bad command lines


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["frobnicate"], "invalid choice"),
        (["show", STREAMING], "--stage"),
        (["show", STREAMING, "--stage", "asm"], "invalid choice"),
        (["show", STREAMING, "--stage", "plan", "--seq", "-3"], "positive integer"),
        (["show", STREAMING, "--stage", "plan", "--seq", "64", "--block", "0x4"], "--block"),
        (["show", STREAMING, "--stage", "plan"], "--seq"),
        (["show", STREAMING, "--stage", "ir", "--param", "span"], "NAME=VALUE"),
        (["plot", STREAMING, "--seq", "64"], "-o"),
    ],
)
def test_usage_errors(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["show", STREAMING, "--stage", "ir", "--param", "spam=3"], "spam"),
        (["show", STREAMING, "--stage", "ir", "--param", "span=(1,2)"], "span"),
        (["show", str(EXAMPLES / "halonet.pdsl"), "--stage", "plan", "--seq", "100"], "100"),
        (["show", str(EXAMPLES / "sparse_transformer.pdsl"), "--stage", "ir"], "sparse_"),
    ],
)
def test_pattern_errors_exit_1(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert needle in err
    assert len(err.splitlines()) < 25


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"], ["plot", "--help"], ["bench", "--help"]])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "usage:" in out


# --------------------------------------------------------------------------- pictures


def test_cell_states_summarise_blocks_of_tiles():
    tiles = torch.tensor(
        [
            [FULL, FULL, EMPTY, EMPTY, PARTIAL],
            [FULL, FULL, EMPTY, EMPTY, EMPTY],
            [FULL, EMPTY, EMPTY, DYNAMIC, FULL],
        ],
        dtype=torch.int8,
    )
    cells = cli_cells = pictures.cell_states(tiles, 2, 2)
    assert cli_cells.shape == (2, 3)
    assert cells.tolist() == [[FULL, EMPTY, PARTIAL], [PARTIAL, DYNAMIC, FULL]]


def test_draw_plan_from_a_reference_plan():
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0] = torch.ones(8, 8, dtype=torch.bool).tril()
    mask[1, :, :4] = True
    plan = plan_from_mask(mask, block=(4, 4))
    text = pictures.draw_plan(plan, ascii_only=True)
    assert "group 0 (head 0)" in text and "group 1 (head 1)" in text
    assert _map_rows(text) == [". ", "#.", "# ", "# "]
    stats = pictures.format_stats(plan)
    assert "density           53.12%" in stats  # (36 + 32) / 128 pairs
