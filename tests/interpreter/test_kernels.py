"""Generated Triton kernels vs the float64 reference under the interpreter (see ``cases.py``)."""

import pytest

from tests.interpreter.cases import CHECKS


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_interpreter_case(interpreter, name):
    result = interpreter.run(name)
    if not result["ok"]:
        pytest.fail(result["error"], pytrace=False)
