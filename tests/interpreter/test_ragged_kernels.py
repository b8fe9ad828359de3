"""Ragged lengths and paged caches on the Triton backend under ``TRITON_INTERPRET=1`` (element by element).

The generated kernels do not read lengths or block tables yet: ``attention`` runs each element's
unpadded problem through them (its pages gathered through the table). This checks outputs, lse
and gradients against the float64 reference per element, fp32 and fp16, in a child process started
with the variable set (Triton reads it when it is imported).
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


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = dict(os.environ, TRITON_INTERPRET="1", PATTERNDSL_CACHE_DIR=str(tmp_path_factory.mktemp("ragged-cache")))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.interpreter.test_ragged_kernels"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    if not lines:
        pytest.fail(f"ragged interpreter worker failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return json.loads(lines[-1][2:])


@pytest.mark.parametrize("name", list(CASES))
def test_ragged_on_the_triton_interpreter(results, name):
    assert results[name] == "ok", results[name]


if __name__ == "__main__":
    out = {}
    for case in CASES:
        try:
            run_case(case)
            out[case] = "ok"
        except Exception as err:  # reported per case by the pytest process
            out[case] = f"{type(err).__name__}: {err}"
    print("@@" + json.dumps(out))
