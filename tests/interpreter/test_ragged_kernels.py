"""Ragged lengths and paged caches on the Triton backend under ``TRITON_INTERPRET=1``.

Patterns of positions only run the ragged kernels (:mod:`patterndsl.codegen.ragged`): lengths and
block tables read inside the kernels, decoding calls split over their key tiles and merged by
log-sum-exp (flash decoding); the others (``route``, sizes-reading patterns) and elements with more
queries than keys run element by element through the ordinary kernels. Outputs, lse and gradients
are checked against the float64 reference per element, fp32 and fp16, in the shared interpreter
worker (``conftest.py``; the slow random run in a child process of its own), both started with the
variable set (Triton reads it when it is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    # name: (pattern, dtype, paged)
    "streaming_fp32": ("causal & (window(6) | sink(2))", "float32", False),
    "streaming_fp16_paged": ("causal & (window(6) | sink(2))", "float16", True),
    "route_paged": ("causal & route(1, block = 8, among = causal)", "float32", True),
}
#: Random patterns x ragged lengths x paged layouts (tests/unit/test_ragged.py's generator), by seed.
RANDOM_SEEDS = {"default": (0,), "slow": tuple(range(1, 12))}


def run_case(name: str) -> None:
    import random

    import torch

    import patterndsl
    from patterndsl import runtime
    from tests.reference import reference_attention
    from tests.unit.test_ragged import paged

    runtime.TRITON_BLOCK = (16, 16)
    body, dtype, use_pages = CASES[name]
    dt = getattr(torch, dtype)
    p = patterndsl.compile(f"pattern {name} {{ {body} }}")
    gen = torch.Generator().manual_seed(len(name))
    b, h, hkv, lq, lk, d = 3, 4, 2, 5, 37, 16
    q, k, v = (torch.randn(b, n, length, d, generator=gen) for n, length in ((h, lq), (hkv, lk), (hkv, lk)))
    kvl, ql = torch.tensor([37, 20, 9]), torch.tensor([5, 1, 0])
    table = None
    kk, vv = k, v
    if use_pages:
        kk, vv, table = paged(k, v, kvl, 8, random.Random(3))
    q, kk, vv = (t.to(dt).requires_grad_(True) for t in (q, kk, vv))
    out, lse = p(q, kk, vv, kv_lengths=kvl, q_lengths=ql, block_table=table, return_lse=True, backend="triton")
    (gq,) = torch.autograd.grad(out.float().sum(), (q,))
    tol = 1e-4 if dtype == "float32" else 2e-2
    for i in range(b):
        n, m = int(ql[i]), int(kvl[i])
        assert bool(torch.isneginf(lse[i, :, n:]).all()) and not bool(out[i, :, n:].any())
        if not n:
            continue
        q64 = q.detach()[i : i + 1, :, :n].double().requires_grad_(True)
        k64, v64 = (x[i : i + 1, :, :m].to(dt).double() for x in (k, v))
        mask = p.mask(n, m, h, q=q64.detach(), k=k64) if "route" in body else p.mask(n, m, h)
        ref, ref_lse = reference_attention(q64, k64, v64, mask, d**-0.5)
        torch.testing.assert_close(out[i : i + 1, :, :n].double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(lse[i : i + 1, :, :n].double(), ref_lse, atol=tol, rtol=tol)
        (rq,) = torch.autograd.grad(ref.sum(), (q64,))
        torch.testing.assert_close(gq[i : i + 1, :, :n].double(), rq, atol=5 * tol, rtol=5 * tol)


def run_random(seed: int) -> None:
    """One random pattern and lengths, unpaged and paged (page sizes 1, 16, 64; element 1 shares element 0's
    first pages), forward and backward against float64, with decoding calls forced to split."""
    from patterndsl import runtime
    from patterndsl.runtime import triton_ragged
    from tests.unit.test_ragged import _case, _check, shared_paged

    runtime.TRITON_BLOCK = (64, 16)  # plan rows 64: decoding blocks of 16 rows sit inside plan row tiles
    triton_ragged.OPTIONS = triton_ragged.SplitOptions(programs=4096, min_tiles=1)
    rng, p, q, k, v, kvl, ql, _ = _case(seed)
    q, k, v = (t.float() for t in (q, k, v))
    _check(p, q, k, v, kvl, ql, 2e-4, backend="triton")
    kp, vp, table = shared_paged(k, v, kvl, (1, 16, 64)[seed % 3], rng)
    _check(p, q, k, v, kvl, ql, 2e-4, block_table=table, kp=kp, vp=vp, backend="triton")


def run_split_decode() -> None:
    """Decoding steps through the split kernels equal the prefill's last rows; a split call equals an unsplit one."""
    import torch

    import patterndsl
    from patterndsl import runtime
    from patterndsl.runtime import triton_ragged

    runtime.TRITON_BLOCK = (16, 16)
    p = patterndsl.compile("pattern s(w = 20) { causal & (window(w) | sink(4)) }")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 90, 16, generator=g) for n in (4, 2, 2))
    full = p(q.double(), k.double(), v.double(), backend="cpu")
    start = torch.tensor([30, 75])
    for splits in (triton_ragged.SplitOptions(programs=4096, min_tiles=1), triton_ragged.SplitOptions(programs=1)):
        triton_ragged.OPTIONS = splits
        for step in (0, 7):
            kvl = start + step
            rows = torch.stack([q[b, :, int(kvl[b]) - 1] for b in range(2)])[:, :, None]
            out = p(rows, k, v, kv_lengths=kvl, backend="triton")
            for b in range(2):
                torch.testing.assert_close(out[b, :, 0].double(), full[b, :, int(kvl[b]) - 1], atol=1e-5, rtol=1e-5)
    # Elements with more queries than keys, and a non-finite key, run element by element (exactly).
    k2 = k.clone()
    k2[0, :, 3] = float("nan")
    for kk, kvl, ql in ((k, torch.tensor([10, 4]), torch.tensor([12, 7])), (k2, torch.tensor([60, 50]), None)):
        qq = q[:, :, :12]
        out = p(qq, kk, v, kv_lengths=kvl, q_lengths=ql, backend="triton")
        want = p(qq.double(), kk.double(), v.double(), kv_lengths=kvl, q_lengths=ql, backend="cpu")
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5, equal_nan=True)


def run_inputs() -> None:
    """Packed documents with lengths over a paged cache: each element runs alone on its own row of ``doc`` cut to
    its ``kv_lengths`` (LANGUAGE.md sections 7 and 9), outputs and ``dq`` as the CPU path gives them."""
    import random

    import torch

    import patterndsl
    from tests.unit.test_ragged import paged
    from tests.unit.test_ragged_inputs import PACKED

    p = patterndsl.compile(PACKED)
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(2, n, length, 16, generator=gen) for n, length in ((2, 3), (1, 20), (1, 20)))
    doc = torch.tensor([[0] * 7 + [1] * 13, [0] * 3 + [1] * 17])
    kvl, ql = torch.tensor([20, 11]), torch.tensor([3, 2])
    kp, vp, table = paged(k, v, kvl, 4, random.Random(1))
    got = {}
    for backend in ("triton", "cpu"):
        qq = q.clone().requires_grad_(True)
        out = p(qq, kp, vp, kv_lengths=kvl, q_lengths=ql, block_table=table, doc=doc, backend=backend)
        (gq,) = torch.autograd.grad((out * torch.arange(out.numel()).view(out.shape).sin()).sum(), (qq,))
        got[backend] = (out, gq)
    assert torch.allclose(got["triton"][0], got["cpu"][0], atol=1e-4)
    assert torch.allclose(got["triton"][1], got["cpu"][1], atol=1e-4)


def _all_cases(slow: bool) -> dict:
    cases = {name: (lambda name=name: run_case(name)) for name in CASES}
    cases["split_decode"] = run_split_decode
    cases["inputs_paged"] = run_inputs
    for seed in RANDOM_SEEDS["slow" if slow else "default"]:
        cases[f"random_{seed}"] = lambda seed=seed: run_random(seed)
    return cases


def _run(cache_dir, *args) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(cache_dir))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.interpreter.test_ragged_kernels", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    if not lines:
        pytest.fail(f"ragged interpreter worker failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return json.loads(lines[-1][2:])


#: Worker case names are this prefix and a name of the default :func:`_all_cases`.
CASE_PREFIX = "ragged:"


def interpreter_checks() -> dict:
    """The cases the shared interpreter worker (``tests/interpreter/worker.py``) runs for this module."""
    return {CASE_PREFIX + name: run for name, run in _all_cases(False).items()}


@pytest.mark.parametrize("name", list(_all_cases(False)))
def test_ragged_on_the_triton_interpreter(interpreter, name):
    result = interpreter.run(CASE_PREFIX + name)
    if not result["ok"]:
        pytest.fail(result["error"], pytrace=False)


@pytest.mark.slow
def test_more_random_ragged_cases_on_the_triton_interpreter(tmp_path):
    results = _run(tmp_path, "--slow")
    assert results and all(r == "ok" for r in results.values()), results


if __name__ == "__main__":
    out = {}
    slow = "--slow" in sys.argv
    for case, run in _all_cases(slow).items():
        if slow and not case.startswith("random_"):
            continue
        try:
            run()
            out[case] = "ok"
        except Exception as err:  # reported per case by the pytest process
            out[case] = f"{type(err).__name__}: {err}"
    print("@@" + json.dumps(out))
