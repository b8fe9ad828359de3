"""A worker process that runs interpreter cases for the pytest process.

Triton decides at import time whether its own library functions are
interpreted, so the interpreter cases cannot share a process with tests that
compile for real GPUs. This worker sets ``TRITON_INTERPRET=1`` before anything
imports Triton, then reads case names from stdin, one per line, and answers
each with a line ``@@result {"ok": ..., "error": ...}`` on stdout.
"""

import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

MARK = "@@result "


def main() -> None:
    from tests.interpreter.cases import CHECKS, poison

    poison()

    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        try:
            CHECKS[name]()
            result = {"ok": True, "error": ""}
        except BaseException:  # report everything, keep serving
            result = {"ok": False, "error": traceback.format_exc()}
        print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
