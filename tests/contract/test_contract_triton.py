"""Contract section 3: backend="triton" on CPU tensors runs under the Triton interpreter when TRITON_INTERPRET=1.

The variable must be set before Triton is imported, so each check runs in a fresh Python process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys, torch, patterndsl
from tests.contract import oracle as o
src, dtype = sys.argv[1], getattr(torch, sys.argv[6])
lq, lk, hq, hkv = (int(a) for a in sys.argv[2:6])
p = patterndsl.compile(src)
q, k, v = o.rand_qkv(b=1, hq=hq, hkv=hkv, lq=lq, lk=lk, d=16, dtype=dtype, seed=3, grad=True)
out, lse = p(q, k, v, return_lse=True, backend="triton")
assert out.dtype == dtype and lse.dtype == torch.float32
m = p.mask(lq, lk, hq)
g = torch.randn_like(out)
got = torch.autograd.grad(out, (q, k, v), g)
q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
ref, ref_lse = o.reference_attention(q2, k2, v2, m)
want = torch.autograd.grad(ref, (q2, k2, v2), g.double())
tol = 2e-2 if dtype != torch.float32 else 2e-3
torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
fin = torch.isfinite(ref_lse)
torch.testing.assert_close(lse.double()[fin], ref_lse.detach()[fin], atol=tol, rtol=tol)
assert bool(torch.isneginf(lse[~fin]).all())
for a, b in zip(got, want):
    torch.testing.assert_close(a.double(), b, atol=5 * tol, rtol=5 * tol)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "src,lq,lk,hq,hkv,dtype",
    [
        ("pattern p { causal & (window(5) | sink(2)) }", 32, 32, 2, 2, "float32"),
        ("pattern p { window(3, 3, 2) | where(q % 5 == 0 and k < 0) }", 20, 36, 2, 1, "float16"),
        ("pattern p { layout grid(y = 6, x = 6)\n neighborhood(3, dilation = 2) }", 36, 36, 2, 2, "float32"),
    ],
)
def test_triton_backend_under_interpreter_matches_reference(src, lq, lk, hq, hkv, dtype):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, src, str(lq), str(lk), str(hq), str(hkv), dtype],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
