"""Primitives registered from outside (``tests/unit/test_primitive_extension.py``) through the generated kernels.

The cases run in the shared interpreter worker (``conftest.py``), forward and backward in float32
against the float64 reference, with the primitives registered only while each case runs.
"""

import pytest

from tests.unit.test_primitive_extension import KERNEL_CASES

#: Worker case names are this prefix and a name of ``KERNEL_CASES``.
CASE_PREFIX = "extension:"


def interpreter_checks() -> dict:
    """The cases the shared interpreter worker (``tests/interpreter/worker.py``) runs for this module."""
    import functools

    from tests.unit.test_primitive_extension import kernel_case

    return {CASE_PREFIX + name: functools.partial(kernel_case, name) for name in KERNEL_CASES}


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_registered_primitives_on_the_triton_interpreter(interpreter, name):
    result = interpreter.run(CASE_PREFIX + name)
    if not result["ok"]:
        pytest.fail(result["error"], pytrace=False)
