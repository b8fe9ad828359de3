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
