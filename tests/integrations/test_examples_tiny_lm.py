"""examples/train_tiny_lm.py runs end to end (a few steps) and prints both models' losses and speeds."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_tiny_lm.py"


def test_train_tiny_lm_runs(capsys):
    module = runpy.run_path(str(EXAMPLE))
    module["main"](["--steps", "2", "--batch", "2", "--length", "24", "--generate", "6"])
    out = capsys.readouterr().out
    assert "loss patterndsl" in out and "training sdpa" in out and "generation patterndsl" in out
    first = next(line for line in out.splitlines() if line.strip().startswith("1 "))
    ours, theirs = (float(x) for x in first.split()[1:3])
    assert abs(ours - theirs) < 0.05  # same initial weights and batch; only far-away keys differ
