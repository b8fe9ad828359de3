"""Contract section 4: the ``patterndsl`` command (check, show, plot, bench), in-process and as a real process."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from patterndsl import cli

GOOD = """# two patterns
pattern streaming(span = 4, sinks = 1) {
    causal & (window(span) | sink(sinks))
}

pattern grid2 {
    layout grid(y = 4, x = 4)
    neighborhood(3)
}
"""
BAD = "pattern ok { causal }\n\npattern bad(n = 4) {\n    causal & windw(n)\n}\n"


def run(capsys, *argv):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse-style exits are also an exit status
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code or 0, out, err


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.pdsl"
    p.write_text(GOOD)
    return p


@pytest.fixture
def bad(tmp_path):
    p = tmp_path / "bad.pdsl"
    p.write_text(BAD)
    return p


def test_check_ok_exits_zero(capsys, good):
    code, _out, _err = run(capsys, "check", good)
    assert code == 0


def test_check_error_names_file_line_column_with_line_and_caret(capsys, bad):
    code, out, err = run(capsys, "check", bad)
    text = out + err
    assert code != 0
    assert re.search(re.escape(str(bad)) + r":4:14\b", text), text
    lines = text.splitlines()
    idx = next(i for i, line in enumerate(lines) if "causal & windw(n)" in line)
    caret = lines[idx + 1]
    # The caret sits under the offending name, in the same columns as the echoed line.
    col = lines[idx].index("windw")
    assert caret.index("^") == col, (lines[idx], caret)


def test_check_missing_file_exits_nonzero(capsys, tmp_path):
    code, out, err = run(capsys, "check", tmp_path / "absent.pdsl")
    assert code != 0 and "absent.pdsl" in out + err


def test_check_as_a_real_process(bad, good):
    r = subprocess.run(
        [sys.executable, "-m", "patterndsl.cli", "check", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr and ":4:14" in r.stdout + r.stderr
    r = subprocess.run(["patterndsl", "check", str(good)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_show_ir(capsys, good):
    code, out, _ = run(
        capsys, "show", good, "--pattern", "streaming", "--param", "span=2", "--seq", "16", "--stage", "ir"
    )
    assert code == 0 and "window" in out and "sink" in out and "causal" in out


def test_show_plan_prints_tile_map_and_statistics(capsys, good):
    code, out, _ = run(
        capsys,
        "show",
        good,
        "--pattern",
        "streaming",
        "--seq",
        "32",
        "--kv-seq",
        "48",
        "--heads",
        "2",
        "--block",
        "8x8",
        "--stage",
        "plan",
    )
    assert code == 0
    assert re.search(r"densit", out, re.I) and re.search(r"efficien", out, re.I)
    assert re.search(r"empty|partial|full", out, re.I)
    # A tile map: at least 4 rows (32 / 8) of drawing.
    assert len(out.strip().splitlines()) >= 4


def test_show_plan_grid_default_seq_from_layout(capsys, good):
    code, out, _ = run(capsys, "show", good, "--pattern", "grid2", "--block", "4x4", "--stage", "plan")
    assert code == 0 and out.strip()


def test_show_triton(capsys, good):
    code, out, _ = run(capsys, "show", good, "--pattern", "streaming", "--seq", "128", "--stage", "triton")
    assert code == 0 and "triton" in out and "def " in out


def test_show_bad_param_is_a_clean_error(capsys, good):
    code, out, err = run(
        capsys, "show", good, "--pattern", "streaming", "--param", "spam=2", "--seq", "8", "--stage", "ir"
    )
    assert code != 0 and "spam" in out + err


def test_show_layout_mismatch_is_a_clean_error(capsys, good):
    code, out, err = run(capsys, "show", good, "--pattern", "grid2", "--seq", "15", "--stage", "plan")
    assert code != 0 and (out + err).strip()


@pytest.mark.slow
@pytest.mark.parametrize("stage,needle", [("ptx", ".visible"), ("sass", "")])
def test_show_ptx_sass(capsys, good, stage, needle):
    code, out, err = run(capsys, "show", good, "--pattern", "streaming", "--seq", "128", "--stage", stage)
    assert code == 0, err
    assert out.strip() and needle in out


def test_plot_writes_png(capsys, good, tmp_path):
    target = tmp_path / "m.png"
    code, _out, err = run(capsys, "plot", good, "--pattern", "streaming", "--seq", "24", "--block", "8x8", "-o", target)
    assert code == 0, err
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_runs_on_a_tiny_size(capsys, good):
    code, out, err = run(
        capsys, "bench", good, "--pattern", "streaming", "--seq", "32", "--head-dim", "8", "--repeat", "1", "--no-flex"
    )
    assert code == 0, err
    assert re.search(r"\d", out)


def test_show_on_a_bad_file_names_the_location(capsys, bad):
    code, out, err = run(capsys, "show", bad, "--pattern", "bad", "--seq", "8", "--stage", "ir")
    assert code != 0 and re.search(re.escape(str(bad)) + r":4:14\b", out + err)


def test_show_params_accept_bools_and_tuples(capsys, tmp_path):
    path = tmp_path / "na.pdsl"
    path.write_text(
        "pattern na(s = (3, 3), c = false) {\n layout grid(y = 5, x = 5)\n neighborhood(s, causal = c)\n}\n"
    )
    code, out, err = run(capsys, "show", path, "--param", "s=(5,3)", "--param", "c=true", "--stage", "ir")
    assert code == 0, err
    assert re.search(r"\(\s*5\s*,\s*3\s*\)", out) and "true" in out


@pytest.mark.parametrize(
    "extra",
    [
        ["--block", "64by64"],
        ["--param", "span"],
        ["--param", "span=abc"],
        ["--seq", "0"],
        ["--heads", "0"],
        ["--pattern", "nosuch"],
    ],
)
def test_show_bad_options_are_clean_errors(capsys, good, extra):
    code, out, err = run(capsys, "show", good, "--pattern", "streaming", "--seq", "16", "--stage", "plan", *extra)
    assert code != 0 and (out + err).strip()


def test_show_uncovered_heads_is_a_clean_error(capsys, tmp_path):
    path = tmp_path / "h.pdsl"
    path.write_text("pattern h {\n    heads 0..2: causal\n}\n")
    code, out, err = run(capsys, "show", path, "--seq", "16", "--heads", "3", "--stage", "plan")
    assert code != 0 and "head" in (out + err).lower()


@pytest.mark.parametrize(
    "text,loc",
    [
        ("pattern p(n = 2) {\n    let w = window(n)\n    causal & where(q % 0 == 0)\n}\n", ":3:"),
        ("pattern p {\n    layout grid(y = 2)\n    layout grid(x = 2)\n    full\n}\n", ":3:"),
        ("pattern p {\n    causal &\n}\n", ":2:"),  # at the dangling operator (issue 11)
        ("pattern p {\n    window(2, dilation = true)\n}\n", ":2:"),
    ],
)
def test_check_reports_semantic_errors_with_location(capsys, tmp_path, text, loc):
    path = tmp_path / "e.pdsl"
    path.write_text(text)
    code, out, err = run(capsys, "check", path)
    assert code != 0 and f"{path}{loc}" in out + err and "^" in out + err
