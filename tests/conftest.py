"""Suite-wide pytest options and fixtures. Keep this minimal; folders add their own conftest.py."""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/* from the current code generator instead of comparing against it",
    )


@pytest.fixture(scope="session")
def compiled_triton():
    """Skip unless Triton runs in compiled mode here (AOT builds cannot run under TRITON_INTERPRET=1,
    which Triton reads once at import: only a run started with it set for the whole process skips)."""
    import triton

    if not isinstance(triton.language.zeros, triton.runtime.JITFunction):
        pytest.skip("Triton was imported with TRITON_INTERPRET=1 in this process; AOT builds need compiled mode")


#: Matrix-style tests: of each test function listed, the cases whose parameter id matches the pattern
#: run by default and the others are marked slow (CI runs them all). Every kind of check keeps at least
#: one case in the default run; the rest repeat it over more seeds, tilings, targets or dtypes.
DEFAULT_CASES = {
    # 13 route patterns x 2 head layouts at the 8x8 CPU tiling; 4x8 and 64x64 repeat them.
    "tests/unit/test_route_attention.py::test_route_attention_matches_reference": r"tiles8x8-.*",
    # Every pattern with the fused kernel; the math kernel has its own matrix (test_patterns_fp32).
    "tests/unit/test_cpu_attention.py::test_wide_full_runs_merge_by_lse": r"fused-.*",
    # Random property runs: two seeds (or chunks) by default.
    "tests/unit/test_plan_property.py::test_random_patterns_match_dense": r"[01]",
    "tests/unit/test_plan_property.py::test_dynamic_patterns_static_parts_exact": r"[01]",
    "tests/unit/test_cpu_property.py::test_random_patterns_match_reference": r"[01]",
    "tests/unit/test_cpu_property.py::test_random_route_patterns_match_reference": r"0",
    "tests/unit/test_fuzz.py::test_mutated_sources_give_a_pattern_or_a_pattern_error": r"0",
    "tests/contract/test_contract_properties.py::test_random_expressions_larger": r"[01]",
    # Ahead-of-time builds (about 2 s each): one target and dtype by default.
    "tests/unit/test_routing.py::test_routed_kernels_build_for_gpus_without_spills": r"float16-64-sm_90",
    "tests/unit/test_aot.py::test_backward_that_used_to_spill_builds_clean": r"fp32-64-sm80",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marks
def pytest_collection_modifyitems(config, items):
    import re

    seen: dict[str, list[bool]] = {}
    for item in items:
        function, _, param = item.nodeid.partition("[")
        pattern = DEFAULT_CASES.get(function)
        if pattern is None:
            continue
        kept = re.fullmatch(pattern, param[:-1]) is not None
        seen.setdefault(function, []).append(kept)
        if not kept:
            item.add_marker(pytest.mark.slow)
    for function, kept in seen.items():
        # A pattern that no longer matches would silently drop a kind of check from the default run.
        if len(kept) > 1 and not any(kept):
            raise pytest.UsageError(f"DEFAULT_CASES[{function!r}] matches none of its {len(kept)} cases")
