"""Interpreter tests: generated kernels on CPU tensors under ``TRITON_INTERPRET=1``.

Triton reads the variable when its own library is imported, so the cases run
in one worker process (:mod:`tests.interpreter.worker`) started with the
variable set, shared by every test of this folder; the rest of the suite keeps
compiling for real GPUs in the pytest process.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASE_TIMEOUT = 300.0


class Worker:
    def __init__(self, cache_dir: Path):
        env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(cache_dir))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.interpreter.worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, name: str) -> dict:
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"interpreter worker exited with {self.proc.returncode}"}
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT)
            if not ready:
                self.proc.kill()
                return {"ok": False, "error": f"case {name} took longer than {CASE_TIMEOUT} s"}
            line = self.proc.stdout.readline()
            if not line:
                return {"ok": False, "error": "interpreter worker died"}
            if line.startswith("@@result "):
                return json.loads(line[len("@@result ") :])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def interpreter(tmp_path_factory):
    worker = Worker(tmp_path_factory.mktemp("kernel-cache"))
    yield worker
    worker.close()
