"""A worker process that runs interpreter cases for the pytest process.

Triton decides at import time whether its own library functions are
interpreted, so the interpreter cases cannot share a process with tests that
compile for real GPUs. This worker sets ``TRITON_INTERPRET=1`` before anything
imports Triton, then reads case names from stdin, one per line, and answers
each with a line ``@@result {"name": ..., "ok": ..., "error": ...}`` on stdout.
The pytest process sends every selected case at the start of the session, so
the worker runs them on the second core while the rest of the suite runs.
"""

import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

MARK = "@@result "


def checks() -> dict:
    """Every case by name: ``tests/interpreter/cases.py``'s, and the other modules' here (prefixed)."""
    from tests.interpreter import test_extension_kernels, test_ragged_kernels, test_route_kernels
    from tests.interpreter.cases import CHECKS

    modules = (test_extension_kernels, test_ragged_kernels, test_route_kernels)
    return CHECKS | {name: run for module in modules for name, run in module.interpreter_checks().items()}


def main() -> None:
    import torch

    from patterndsl import runtime
    from patterndsl.runtime import triton_ragged
    from tests.interpreter.cases import poison

    # The worker runs beside the rest of the suite: one thread keeps it to the core the pytest process leaves.
    torch.set_num_threads(1)
    table = checks()
    poison()

    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        # Some cases set their own tiles or split options; every case starts from the defaults.
        block, splits = runtime.TRITON_BLOCK, triton_ragged.OPTIONS
        try:
            table[name]()
            result = {"name": name, "ok": True, "error": ""}
        except BaseException:  # report everything, keep serving
            result = {"name": name, "ok": False, "error": traceback.format_exc()}
        finally:
            runtime.TRITON_BLOCK, triton_ragged.OPTIONS = block, splits
        print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
