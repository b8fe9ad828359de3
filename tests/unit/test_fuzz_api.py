"""Fuzzing the API, the command line and the kernel cache (issue 11): the campaign's cases, counted.

API calls with edge values (zero, negative, huge, wrong types, unknown options, odd tensors) must
return a correct result or raise a PatternError; ``patterndsl`` command lines must end with status
0, 1 or 2 and a message; a kernel must load from a cache damaged in any of the known ways. The
cases come from ``tests/campaign.py``, which runs many more of them (and the sources) as a script.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests import campaign


def _run_api(seed: int, count: int, tmp_path) -> Counter:
    rng, tally, failures = random.Random(seed), Counter(), []
    for n in range(count):
        label, thunk = campaign.api_case(rng) if n % 3 else campaign.cli_case(rng, tmp_path)
        campaign._run(tally, failures, "api" if n % 3 else "cli", label, thunk)
    assert not failures, "\n".join(f"{label}\n{info}" for _, label, info in failures[:3])
    return tally


def test_api_and_cli_calls_give_a_result_or_a_pattern_error(tmp_path):
    tally = _run_api(5, 240, tmp_path)
    # Every kind of outcome occurs, or the cases are not exercising anything.
    assert tally["api", "ok"] > 20 and tally["api", "error"] > 20 and tally["cli", "status0"] > 5, tally


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_api_and_cli_calls_many(seed, tmp_path):
    _run_api(100 + seed, 600, tmp_path)


@pytest.mark.parametrize("fault", campaign.CACHE_FAULTS)
def test_kernels_load_from_a_damaged_cache(fault, tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    campaign.cache_fault(fault, 5, tmp_path)
