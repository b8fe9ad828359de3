"""The band path of the CPU executor (``CpuOptions(band=True)``): our own batched matmuls on a split affine segment.

Values, log-sum-exp and gradients against the float64 reference (sliding, two-sided, empty rows inside the
shared sub-tile mask, grouped-query heads), the path actually taken, and NaN in blocked keys confined.
"""

from __future__ import annotations

import pytest
import torch

from patterndsl import runtime
from patterndsl.runtime import cpu
from patterndsl.runtime.cpu import band
from tests.unit.test_cpu_attention import SPLIT_CASES, _check, _compile, _inputs


@pytest.fixture
def calls(monkeypatch):
    seen = []
    for name in ("forward", "backward", "backward_skewed"):
        real = getattr(band, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name.split("_")[0])
            return _real(*args, **kwargs)

        monkeypatch.setattr(band, name, spy)
    return seen


FAST = {("empty_rows", 32), ("two_sided", 0)}
CASES = [
    pytest.param(name, rows, marks=() if (name, rows) in FAST else pytest.mark.slow)
    for name in sorted(SPLIT_CASES)
    for rows in (32, 0)
]


@pytest.mark.parametrize(("name", "rows_bwd"), CASES)
def test_band_matches_reference(name, rows_bwd, calls, monkeypatch):
    monkeypatch.setattr(runtime, "CPU_BLOCK", (64, 64))
    body, length = SPLIT_CASES[name]
    # Small steps so every head runs several of them; GQA (4 query heads on 2 key/value heads).
    opts = cpu.CpuOptions(band=True, band_rows_bwd=rows_bwd, band_bytes=64 << 10)
    with cpu.options(opts):
        _check(_compile(body), *_inputs(2, 4, 2, length, length, 16, torch.float32))
    assert "forward" in calls and ("backward" in calls) == bool(rows_bwd)


def test_band_confines_nan_in_blocked_keys(calls, monkeypatch):
    """A NaN key and value outside every window of some rows: those rows stay exact (the call reruns selecting)."""
    monkeypatch.setattr(runtime, "CPU_BLOCK", (64, 64))
    pattern = _compile("causal & window(100)")
    q, k, v = (x.detach() for x in _inputs(1, 2, 2, 512, 512, 16, torch.float32))
    k[:, :, 300] = float("nan")
    v[:, :, 300] = float("nan")
    with cpu.options(band=True):
        out = pattern(q, k, v)
    assert "forward" in calls
    mask = pattern.mask(512, 512, 1)[0]
    reach = mask[:, 300]
    assert bool(torch.isnan(out[:, :, reach]).all())
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[:, :, 300] = 0
    clean_v[:, :, 300] = 0
    ref = pattern(q, clean_k, clean_v)
    torch.testing.assert_close(out[:, :, ~reach], ref[:, :, ~reach])
