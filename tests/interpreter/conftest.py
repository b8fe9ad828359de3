"""Interpreter tests: generated kernels on CPU tensors under ``TRITON_INTERPRET=1``.

Triton reads the variable when its own library is imported, so the cases run
in one worker process (:mod:`tests.interpreter.worker`) started with the
variable set, shared by every test of this folder; the rest of the suite keeps
compiling for real GPUs in the pytest process.

The worker starts when collection ends and is handed every selected case at
once; the interpreter tests move to the end of the run, so the worker computes
their results on the second core while the rest of the suite runs, and each
test then only collects its own result (a failure is reported by that test).
A test of this folder that uses the ``interpreter`` fixture names its case by
its ``name`` parameter, prefixed with its module's ``CASE_PREFIX``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Seconds without any new result after which a waiting test gives up on the worker.
CASE_TIMEOUT = 300.0


class Worker:
    def __init__(self, cache_dir: Path):
        env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(cache_dir))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.cache_dir = cache_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.interpreter.worker"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._sent: set[str] = set()
        self._results: dict[str, dict] = {}
        self._ended = False
        self._answered = 0
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        # Drains stdout all the time, so a case that prints much never blocks the worker.
        for line in self.proc.stdout:
            if line.startswith("@@result "):
                result = json.loads(line[len("@@result ") :])
                with self._changed:
                    self._results[result["name"]] = result
                    self._answered += 1
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def submit(self, names) -> None:
        """Queue cases (each at most once); the worker runs them in this order."""
        fresh = [n for n in dict.fromkeys(names) if n not in self._sent]
        if not fresh or self.proc.poll() is not None:
            return
        self._sent.update(fresh)
        self.proc.stdin.write("".join(n + "\n" for n in fresh))
        self.proc.stdin.flush()

    def run(self, name: str) -> dict:
        """The result of case ``name`` (queued now unless it was already)."""
        self.submit([name])
        with self._changed:
            while name not in self._results:
                if self._ended:
                    return {"ok": False, "error": f"interpreter worker exited with {self.proc.wait()}"}
                seen = len(self._results)
                if not self._changed.wait(CASE_TIMEOUT) and len(self._results) == seen:
                    self.proc.kill()
                    return {"ok": False, "error": f"no interpreter result for {CASE_TIMEOUT} s (waiting for {name})"}
            return self._results.pop(name)

    def close(self) -> None:
        if self.proc.poll() is None and self._answered < len(self._sent):
            self.proc.kill()  # the session ended early (-x, --collect-only, interrupted): drop the queue
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.cache_dir, ignore_errors=True)


_WORKER: Worker | None = None


def _worker() -> Worker:
    global _WORKER
    if _WORKER is None:
        _WORKER = Worker(Path(tempfile.mkdtemp(prefix="pdsl-interpreter-cache-")))
    return _WORKER


def case_name(item) -> str | None:
    """The worker case an item runs, or None for an item that uses no worker."""
    if "interpreter" not in getattr(item, "fixturenames", ()) or not hasattr(item, "callspec"):
        return None
    name = item.callspec.params.get("name")
    return None if name is None else getattr(item.module, "CASE_PREFIX", "") + name


def pytest_collection_finish(session):
    cases = [(item, case_name(item)) for item in session.items]
    names = [name for _, name in cases if name is not None]
    if not names or session.config.option.collectonly:
        return
    # Worker tests last: by the time they run, the worker has had the whole suite's time for them.
    session.items[:] = [item for item, name in cases if name is None] + [item for item, name in cases if name]
    _worker().submit(names)


def pytest_sessionfinish(session):
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


@pytest.fixture(scope="session")
def interpreter():
    return _worker()
