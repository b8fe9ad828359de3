"""Suite-wide pytest options. Keep this minimal; folders add their own conftest.py."""


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/* from the current code generator instead of comparing against it",
    )
