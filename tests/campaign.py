"""A hardening campaign (issue 11): hostile sources, API and CLI calls and cache faults, counted.

Run it as a script (it is not collected by pytest; ``tests/unit/test_fuzz.py`` and the regression
tests hold what it found)::

    PYTHONPATH=$PWD python tests/campaign.py --sources 12000 --api 1200 --seed 1

Sources are mutated and generated from the examples and the contract's snippets
(:func:`tests.unit.test_fuzz.pipeline_cases`) and run through parse, check, compile, mask, plan
and CPU attention against the dense reference (:func:`tests.unit.test_fuzz.run_pipeline_case`).
API and CLI cases call the public functions and ``patterndsl.cli.main`` with edge values (zero,
negative, huge, wrong types, unknown options, odd tensors); a call must return a correct result
or raise a :class:`~patterndsl.errors.PatternError`, and ``main`` must return 0, 1 or 2 with a
message on stderr for 1 and 2. Cache faults damage the kernel cache in every way the unit tests
know, at random, and a Triton kernel must still load. Every other outcome (a traceback, a time
limit, a wrong result) is printed with what reproduces it, and the counts come last.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":
    # Triton decides at import whether it interprets: run as a script, the Triton backend runs on the CPU.
    os.environ["TRITON_INTERPRET"] = "1"

import patterndsl  # noqa: E402
from patterndsl import cli, kernel_cache  # noqa: E402
from patterndsl.analysis.plan import tile_reduce  # noqa: E402
from patterndsl.codegen import generator, spec_for  # noqa: E402
from patterndsl.errors import PatternError  # noqa: E402
from tests.reference import reference_attention  # noqa: E402
from tests.unit import test_fuzz as fuzz  # noqa: E402
from tests.unit.test_cache_faults import FullDisk  # noqa: E402

API_SOURCES = [
    "pattern p { causal & window(5) | sink(1) }",
    "pattern p(w = 3) { window(w, after = 1, dilation = 2) | global(1) }",
    "pattern p { heads 0..1: causal; heads 1..2: strided(3); full - causal }",
    "pattern p { causal & (blocks(4) | route(topk = 1, block = 4, qblock = 1, among = causal - blocks(4))) }",
    "pattern p { layout grid(y = 4, x = 4); neighborhood(1) }",
    "pattern p { random(2, 4, seed = 3) & where(q % 2 == 0 or k < 3) }",
    "pattern p { empty }",
]
ODD = [0, 1, 2, 3, 7, 16, 17, -1, -5, 2**31, 2**40, 2**62, 2**70, True, False, 1.5, "16", None, float("nan")]
SMALL = [1, 2, 3, 7, 16, 17]
TIME_LIMIT = 20.0


def _size(rng: random.Random):
    return rng.choice(SMALL) if rng.random() < 0.85 else rng.choice(ODD)


def _small(value) -> bool:
    return type(value) is int and 1 <= value <= 64


def _check_mask(pattern, args, mask):
    lq, lk, heads = args
    lk = lq if lk is None else lk
    assert mask.dtype == torch.bool and tuple(mask.shape) == (heads, lq, lk), (tuple(mask.shape), args)


def api_case(rng: random.Random):
    """One API call as ``(description, thunk)``; the thunk checks what it gets back."""
    source = rng.choice(API_SOURCES)
    pattern = patterndsl.compile(source)
    kind = rng.randrange(8)
    lq, lk, heads = _size(rng), rng.choice([None, _size(rng)]), rng.choice([1, 2, 2, 2, _size(rng)])
    if kind == 0 and not pattern.is_dynamic:

        def run():
            mask = pattern.mask(lq, lk, heads)
            _check_mask(pattern, (lq, lk, heads), mask)

        return f"{source}.mask({lq!r}, {lk!r}, {heads!r})", run
    if kind in (0, 1):
        # Huge sizes (2**31, 2**40, 2**62 tokens) are beyond what a plan represents in any of these tiles:
        # refused at once (a side holds at most planner.MAX_SIDE_TILES tiles).
        block = rng.choice([(4, 4), (16, 16), (3, 5), (4, 8), (8, 4), (0, 4), (4, -1), 16, "x", (2**40, 4), None])
        order = rng.choice(["auto", "identity", "identity", "auto", "sideways", 3])

        def run():
            plan = pattern.plan(lq, lk, heads, block=block, order=order)
            if not pattern.is_dynamic and all(_small(x) for x in (lq, lk or lq, heads)):
                dense = pattern.mask(lq, lk, heads)
                if plan.is_identity_order and max(plan.block) <= 64:
                    assert torch.equal(plan.tiles(), tile_reduce(dense, *plan.block)), "plan tiles != mask"

        return f"{source}.plan({lq!r}, {lk!r}, {heads!r}, block={block!r}, order={order!r})", run
    if kind == 2:
        options = {}
        for name, values in [
            ("head_dim", [16, 64, 0, -4, 1000, 24, "x", 2**40]),
            ("dtype", [torch.float16, torch.float32, torch.bfloat16, torch.int32, "x", None]),
            ("kind", ["forward", "backward", "sideways", 1]),
            ("target", ["sm_80", "sm_90", "interpret", "sm_70", "cpu"]),
            ("block", [(64, 64), (16, 32), (0, 0), (3, 5), "x"]),
            ("kv_heads", [1, 2, 3, 0, -1]),
            ("num_warps", [4, 0, 3, 64]),
            ("foo", [1]),
        ]:
            if rng.random() < 0.3:
                options[name] = values[0] if rng.random() < 0.6 else rng.choice(values)

        def run():
            text = pattern.kernel_source(rng.choice([16, 64, lq]), lk, heads, **options)
            assert isinstance(text, str) and "@triton.jit" in text

        return f"{source}.kernel_source({lq!r}, {lk!r}, {heads!r}, **{options!r})", run
    if kind == 3:
        params = {rng.choice(["w", "x", "T"]): rng.choice(ODD)}
        return f"compile({source!r}, **{params!r})", lambda: patterndsl.compile(source, **params)
    if kind == 4:
        path = rng.choice([None, 3, "", "/nonexistent.pdsl", "/proc", str(ROOT / "examples/moba.pdsl"), b"x"])
        return f"load({path!r})", lambda: patterndsl.load(path)
    # Attention with odd tensors.
    shape_q = [rng.choice([0, 1, 2, 2]), rng.choice([1, 2, 4]), rng.choice([0, 1, 5, 16, 16]), rng.choice([0, 4, 8, 8])]
    shape_k = list(shape_q)
    if rng.random() < 0.15:
        shape_k[rng.randrange(4)] = rng.choice([0, 1, 3, 16])
    dtype = rng.choice([torch.float32, torch.float64, torch.float64, torch.float16, torch.int64, torch.bfloat16])
    backend = rng.choice(["auto", "cpu", "cpu", "cpu", "triton", "x"])
    scale = rng.choice([None, None, None, 0.5, 0.0, -1.0, float("nan"), "x"])
    transposed = rng.random() < 0.3

    def run():
        gen = torch.Generator().manual_seed(7)
        q = torch.randn(shape_q, generator=gen).to(dtype)
        k, v = (torch.randn(shape_k, generator=gen).to(dtype) for _ in range(2))
        if transposed:
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        out = pattern(q, k, v, scale=scale, backend=backend)
        if dtype == torch.float64 and q.numel() and k.numel() and (scale is None or scale == 0.5):
            dense = pattern.mask(q.shape[2], k.shape[2], q.shape[1], q=q, k=k)
            want, _ = reference_attention(q, k, v, dense, scale)
            torch.testing.assert_close(out, want)

    return f"{source}(q{shape_q}, k/v{shape_k}, {dtype}, scale={scale!r}, backend={backend!r})", run


def cli_case(rng: random.Random, workdir: Path):
    """One command line as ``(description, thunk)``."""
    file = workdir / f"case{rng.randrange(50)}.pdsl"
    text = rng.choice(fuzz.EXAMPLES + fuzz.SEEDS)
    if rng.random() < 0.5:
        text = fuzz.mutate(rng, text) if rng.random() < 0.5 else fuzz.mutate_same_class(rng, text)
    file.write_text(text, encoding="utf-8")
    command = rng.choice(["check", "show", "show", "show", "show", "plot", "bogus"][: 6 if rng.random() < 0.97 else 7])
    argv = [command, str(file) if rng.random() < 0.9 else str(workdir / "missing.pdsl")]
    if command == "show":
        argv += ["--stage", rng.choice(["ir", "plan", "plan", "kernel", "reach", "aot", "x"])]
    if command == "plot":
        argv += ["-o", str(workdir / "out.png")]
    show_only = ("--head-dim", "--dtype", "--kind", "--layers")
    for option, values in [
        ("--seq", ["16", "13", "0", "-3", "2147483648", "x", "1e3"]),
        ("--kv-seq", ["16", "9", "0"]),
        ("--heads", ["1", "2", "3", "1099511627776"]),
        ("--block", ["16x16", "4x8", "0x4", "x", "16"]),
        ("--order", ["auto", "identity", "up"]),
        ("--param", ["w=3", "b=2**70", "b=0", "x=(1,2)", "T=true", "=", "b=99999999999999999999999"]),
        ("--pattern", ["p", "moba", "nope"]),
        ("--head-dim", ["16", "0", "1000"]),
        ("--dtype", ["float32", "bfloat16", "int8"]),
        ("--kind", ["forward", "backward"]),
        ("--layers", ["1", "3"]),
    ]:
        if command == "check" or (option in show_only and command != "show") or rng.random() > 0.25:
            continue
        argv += [option, values[0] if rng.random() < 0.6 else rng.choice(values)]
    if command in ("show", "plot") and "--seq" not in argv and rng.random() < 0.8:
        argv += ["--seq", rng.choice(["16", "32", "12"])]

    def run():
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = cli.main(argv)
        assert status in (0, 1, 2), status
        assert status == 0 or err.getvalue().strip(), f"status {status} with nothing on stderr"
        assert "Traceback" not in err.getvalue(), err.getvalue()
        return f"status{status}"

    return f"patterndsl {' '.join(argv)}  # {file.name}: {text!r}", run


CACHE_FAULTS = [
    "unwritable-open-EACCES", "unwritable-open-EROFS", "full-open-ENOSPC", "unwritable-replace-EACCES",
    "full-replace-ENOSPC", "corrupt-truncate", "corrupt-flip", "corrupt-empty", "corrupt-garbage",
    "entry-is-directory", "kernels-is-file", "cache-below-file", "cache-under-proc", "unreadable-entry",
    "full-mid-write", "corrupt-and-unwritable", "directory-and-unwritable", "stale-temp-file",
    "entry-is-symlink-to-nowhere", "kernels-is-symlink-loop", "entry-not-utf8", "header-only",
]  # fmt: skip


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name, None)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is None:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


def cache_fault(fault: str, window: int, workdir: Path):
    """Load a kernel with the cache damaged by ``fault``: a usable module, at most one warning."""
    root = Path(tempfile.mkdtemp(dir=workdir))
    os.environ["PATTERNDSL_CACHE_DIR"] = str(root)
    kernel_cache.clear_memory()
    kernel_cache._warned.clear()
    spec = spec_for(patterndsl.compile(f"pattern p {{ causal & window({window}) | sink(1) }}"), 64, heads=2)
    path = root / "kernels" / f"{spec.key}.py"
    assert kernel_cache.entry_path(spec.key) == path, "the entry path changed: update the campaign"
    shutil.rmtree(path.parent)
    text = f"# patterndsl-cache sha256=0\n{generator.render(spec)}".encode()
    stack = contextlib.ExitStack()
    real_open = open

    def failing_open(error):
        def fake(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                raise error
            return real_open(file, mode, *args, **kwargs)

        return fake

    kind = fault.split("-")[0]
    if kind in ("unwritable", "full") and fault != "full-mid-write":
        code = {"EACCES": errno.EACCES, "EROFS": errno.EROFS, "ENOSPC": errno.ENOSPC}[fault.split("-")[-1]]
        error = OSError(code, os.strerror(code))
        path.parent.mkdir(parents=True, exist_ok=True)
        if "open" in fault:
            stack.enter_context(_patched(kernel_cache, "open", failing_open(error)))
        else:

            def fail_replace(src, dst):
                raise error

            stack.enter_context(_patched(kernel_cache.os, "replace", fail_replace))
    elif fault.startswith("corrupt"):
        damage = fault.split("-")[1]
        data = {"truncate": text[: len(text) // 2], "flip": text.replace(b"def", b"dEf", 1), "empty": b""}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.get(damage, b"\xff\xfe not a kernel \x00"))
        if fault == "corrupt-and-unwritable":
            path.write_bytes(text[:200])
            stack.enter_context(_patched(kernel_cache, "open", failing_open(PermissionError(errno.EACCES, "no"))))
    elif fault.startswith("entry-is-directory") or fault == "directory-and-unwritable":
        path.mkdir(parents=True)
        (path / "inside").write_text("x")
        if fault == "directory-and-unwritable":
            stack.enter_context(_patched(kernel_cache, "open", failing_open(PermissionError(errno.EACCES, "no"))))
    elif fault == "kernels-is-file":
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.write_text("not a directory")
    elif fault == "cache-below-file":
        (root / "file").write_text("x")
        os.environ["PATTERNDSL_CACHE_DIR"] = str(root / "file" / "cache")
    elif fault == "cache-under-proc":
        os.environ["PATTERNDSL_CACHE_DIR"] = "/proc/pdsl-campaign"
        stack.enter_context(_patched(kernel_cache.tempfile, "gettempdir", lambda: "/proc/self"))
    elif fault == "unreadable-entry":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
        real = Path.read_bytes

        def fake_read(self):
            if self.suffix == ".py":
                raise PermissionError(errno.EACCES, "Permission denied")
            return real(self)

        stack.enter_context(_patched(Path, "read_bytes", fake_read))
    elif fault == "full-mid-write":
        stack.enter_context(_patched(kernel_cache, "open", lambda *a, **k: FullDisk(real_open(*a, **k))))
    elif fault == "stale-temp-file":
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / (path.name + ".tmp.123")).write_bytes(text[:50])
    elif fault == "entry-is-symlink-to-nowhere":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(root / "nowhere" / "x.py")
    elif fault == "kernels-is-symlink-loop":
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.symlink_to(path.parent)
    elif fault == "entry-not-utf8":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"# patterndsl-cache sha256=0\n\xff\xff\xff")
    elif fault == "header-only":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"# patterndsl-cache sha256=0\n")
    with stack, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = kernel_cache.load(spec, generator.render, interpret=window % 2 == 0)
        assert hasattr(module, "fwd_g0") and hasattr(module, "fwd_g0"), "no kernel in the module"
        noisy = [w for w in caught if "kernel cache" in str(w.message)]
        assert len(noisy) <= 1, [str(w.message) for w in noisy]
    # A second load in a fresh memory cache works too.
    kernel_cache.clear_memory()
    with stack:
        module = kernel_cache.load(spec, generator.render)
        assert hasattr(module, "fwd_g0")


def _run(tally: dict, failures: list, what: str, label: str, thunk) -> None:
    start = time.perf_counter()
    try:
        with fuzz.time_limit(TIME_LIMIT):
            outcome = thunk()
        tally[what, outcome if isinstance(outcome, str) else "ok"] += 1
    except PatternError:
        tally[what, "error"] += 1
    except Exception as exc:
        tally[what, "FAIL"] += 1
        failures.append((what, label, "".join(traceback.format_exception(exc)[-6:])))
        print(f"--- {what}: {label}\n{failures[-1][2]}", flush=True)
    spent = time.perf_counter() - start
    tally[what, "seconds"] += spent


def run_sources(seed: int, count: int) -> tuple[Counter, int]:
    """``count`` sources of :func:`tests.unit.test_fuzz.pipeline_cases` from ``seed``: their tally and failures."""
    tally, failures = Counter(), []
    for n, text in enumerate(fuzz.pipeline_cases(seed, count)):
        _run(tally, failures, "source", repr(text), lambda t=text: fuzz.run_pipeline_case(t))
        if n % 1000 == 999:
            print(f"seed {seed}: {n + 1} sources: {dict(tally)}", flush=True)
    return tally, len(failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=12000)
    parser.add_argument("--api", type=int, default=1200)
    parser.add_argument("--faults", type=int, default=2, help="rounds over every cache fault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="processes for the sources (seeds seed*1000 + job)")
    args = parser.parse_args()

    tally, failures = Counter(), []
    workdir = Path(tempfile.mkdtemp(prefix="pdsl-campaign-"))
    rng = random.Random(args.seed)
    try:
        if args.jobs == 1:
            tally_s, failed = run_sources(args.seed, args.sources)
        else:
            import multiprocessing

            shares = [
                (args.seed * 1000 + w, args.sources // args.jobs + (w < args.sources % args.jobs))
                for w in range(args.jobs)
            ]
            with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
                results = pool.starmap(run_sources, shares)
            tally_s, failed = sum((r[0] for r in results), Counter()), sum(r[1] for r in results)
        tally.update(tally_s)
        failures.extend([("source", "", "")] * failed)
        for n in range(args.api):
            label, thunk = api_case(rng) if n % 3 else cli_case(rng, workdir)
            _run(tally, failures, "api" if n % 3 else "cli", label, thunk)
        for round_ in range(args.faults):
            for i, fault in enumerate(CACHE_FAULTS):
                _run(tally, failures, "cache", fault, lambda f=fault, w=3 + i + round_: cache_fault(f, w, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{len(failures)} failures (printed above as they happened)")
    print("counts:", {f"{a}/{b}": (round(c, 1) if b == "seconds" else c) for (a, b), c in sorted(tally.items())})
    return 1 if any(b == "FAIL" for (_, b) in tally) else 0


if __name__ == "__main__":
    sys.exit(main())
