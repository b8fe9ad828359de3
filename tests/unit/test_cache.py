"""The kernel cache: memory and disk reuse, reuse across processes, corruption recovery, concurrent builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import patterndsl
from patterndsl import kernel_cache as cache
from patterndsl.codegen import generator, spec_for

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "pattern p { causal & window(33) | sink(2) }"

# A child process: wait for the go file, load the spec's module, report the cache counters.
CHILD = textwrap.dedent(
    f"""
    import json, os, sys, time
    import patterndsl
    from patterndsl.codegen import generator, spec_for
    from patterndsl import kernel_cache as cache
    go = sys.argv[1]
    while not os.path.exists(go):
        time.sleep(0.01)
    spec = spec_for(patterndsl.compile({SOURCE!r}), 256, heads=2, head_dim=32)
    module = cache.load(spec, generator.render, interpret=False)
    print(json.dumps({{"stats": dict(cache.stats), "kernels": hasattr(module, "fwd_g0"), "key": spec.key}}))
    """
)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNDSL_CACHE_DIR", str(tmp_path))
    cache.clear_memory()
    cache.stats.clear()
    yield tmp_path
    cache.clear_memory()


def _spec(window=33):
    return spec_for(patterndsl.compile(SOURCE.replace("33", str(window))), 256, heads=2, head_dim=32)


def _children(count: int, cache_dir: Path) -> list[dict]:
    go = cache_dir / "go"
    env = dict(os.environ, PATTERNDSL_CACHE_DIR=str(cache_dir), PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(go)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    go.touch()  # release them together so they race on the same key
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_memory_then_disk_then_build(cache_dir):
    spec = _spec()
    first = cache.load(spec, generator.render, interpret=False)
    assert cache.stats["built"] == 1
    assert cache.load(spec, generator.render, interpret=False) is first
    assert cache.stats["memory"] == 1
    cache.clear_memory()
    cache.load(spec, generator.render, interpret=False)
    assert cache.stats["disk"] == 1 and cache.stats["built"] == 1
    path = cache.entry_path(spec.key)
    assert path.parent == cache_dir / "kernels"
    assert cache.read_entry(path) == generator.render(spec)


def test_interpreter_and_compiled_modules_are_kept_apart(cache_dir):
    import triton

    spec = _spec()
    compiled = cache.load(spec, generator.render, interpret=False)
    interpreted = cache.load(spec, generator.render, interpret=True)
    assert isinstance(compiled.fwd_g0, triton.runtime.JITFunction)
    assert not isinstance(interpreted.fwd_g0, triton.runtime.JITFunction)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "no_header"])
def test_corrupted_entry_is_detected_and_rebuilt(cache_dir, damage):
    spec = _spec()
    cache.load(spec, generator.render, interpret=False)
    path = cache.entry_path(spec.key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x20
    elif damage == "empty":
        data = bytearray()
    else:
        data = data.split(b"\n", 1)[1]
    path.write_bytes(bytes(data))
    assert cache.read_entry(path) is None
    cache.clear_memory()
    module = cache.load(spec, generator.render, interpret=False)
    assert cache.stats["rebuilt"] == 1
    assert cache.read_entry(path) == generator.render(spec)
    assert hasattr(module, "fwd_g0")


def test_atomic_write_leaves_no_temporary_files(cache_dir):
    for window in (5, 6, 7):
        cache.load(_spec(window), generator.render, interpret=False)
    names = sorted(p.name for p in (cache_dir / "kernels").iterdir())
    assert len(names) == 3 and all(n.endswith(".py") and not n.startswith(".") for n in names)


def test_reuse_across_processes(cache_dir):
    (first,) = _children(1, cache_dir)
    (second,) = _children(1, cache_dir)
    assert first["stats"].get("built") == 1 and first["kernels"]
    assert second["stats"].get("disk") == 1 and "built" not in second["stats"]
    assert first["key"] == second["key"] == _spec().key


def test_concurrent_builds_of_one_key_all_succeed(cache_dir):
    results = _children(4, cache_dir)
    assert all(r["kernels"] for r in results)
    path = cache.entry_path(results[0]["key"])
    assert cache.read_entry(path) == generator.render(_spec())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
