"""Generated Triton kernels vs the float64 reference under the interpreter (see ``cases.py``)."""

import pytest

from tests.interpreter.cases import CHECKS


def _run(interpreter, name):
    result = interpreter.run(name)
    if not result["ok"]:
        pytest.fail(result["error"], pytrace=False)


@pytest.mark.parametrize("name", sorted(n for n in CHECKS if not n.startswith("slow_")))
def test_interpreter_case(interpreter, name):
    _run(interpreter, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in CHECKS if n.startswith("slow_")))
def test_interpreter_case_large(interpreter, name):
    _run(interpreter, name)
