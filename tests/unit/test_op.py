"""The torch op around pattern attention: registration, torch.compile, input validation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl.errors import BackendError, InputError, LayoutError, PatternError
from patterndsl.runtime import op, plans
from tests.reference import reference_attention


def _pattern(body="causal & window(7)"):
    return patterndsl.compile("pattern p {\n" + body + "\n}")


def _qkv(b=1, h=2, hkv=2, lq=40, lk=40, d=8, dtype=torch.float32):
    return (
        torch.randn(b, h, lq, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
        torch.randn(b, hkv, lk, d, dtype=dtype),
    )


def test_one_op_family_is_registered():
    assert hasattr(torch.ops.patterndsl, "attention_fwd")
    assert hasattr(torch.ops.patterndsl, "attention_bwd")


def test_opcheck_schema_fake_and_autograd():
    pattern = _pattern()
    key = plans.register(pattern.ir, (16, 16), "auto")
    q, k, v = (t.requires_grad_() for t in _qkv(hkv=1))
    torch.library.opcheck(op.attention_fwd, (q, k, v, key, 0.5, "cpu"))


def test_torch_compile_fullgraph_forward_and_backward():
    pattern = _pattern("causal & (window(9) | sink(2))")

    def f(q, k, v):
        out, lse = patterndsl.attention(q, k, v, pattern, return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = (t.requires_grad_() for t in _qkv())
    got = compiled(q, k, v)
    got.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expect = f(q, k, v)
    expect.backward()
    torch.testing.assert_close(got, expect)
    for g, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, t.grad)


def test_torch_compile_inductor_no_graph_break():
    pattern = _pattern()
    q, k, v = _qkv()
    explained = torch._dynamo.explain(lambda q, k, v: pattern(q, k, v) * 2)(q, k, v)
    assert explained.graph_break_count == 0
    compiled = torch.compile(lambda q, k, v: pattern(q, k, v) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), pattern(q, k, v) * 2)


def test_backend_cpu_explicit_and_results_match_reference():
    pattern = _pattern()
    q, k, v = _qkv()
    out = patterndsl.attention(q, k, v, pattern, backend="cpu")
    ref, _ = reference_attention(q, k, v, pattern.mask(40, 40, 2))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_plan_cache_is_reused():
    pattern = _pattern("blocks(5)")
    key = plans.register(pattern.ir, (16, 16), "auto")
    assert plans.register(pattern.ir, (16, 16), "auto") == key
    assert plans.get(key, 40, 40, 2) is plans.get(key, 40, 40, 2)
    assert plans.get(key, 40, 40, 2) is not plans.get(key, 48, 48, 2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 40, 8), *_qkv()[1:]), "4 dimensions"),
        (lambda: (_qkv()[0].int(), *_qkv()[1:]), "dtype int32"),
        (lambda: (_qkv()[0].half(), *_qkv()[1:]), "one dtype"),
        (lambda: _qkv(h=3, hkv=2), "does not divide"),
        (lambda: (_qkv()[0], _qkv(d=4)[1], _qkv()[2]), "head_dim"),
        (lambda: (_qkv(b=2)[0], *_qkv()[1:]), "batch"),
        (lambda: (_qkv()[0], _qkv()[1], _qkv(lk=30)[2]), "sequence length"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "one device"),
        (lambda: ([[1.0]], *_qkv()[1:]), "torch.Tensor"),
    ],
)
def test_input_errors(make, match):
    q, k, v = make()
    with pytest.raises(InputError, match=match):
        patterndsl.attention(q, k, v, _pattern())


def test_bad_scale():
    with pytest.raises(InputError, match="scale"):
        _pattern()(*_qkv(), scale=float("nan"))


def test_layout_mismatch():
    pattern = _pattern("layout grid(y = 4, x = 8)\nneighborhood(3)")
    with pytest.raises(LayoutError):
        pattern(*_qkv(lq=40, lk=40))


def test_unknown_backend():
    with pytest.raises(PatternError, match="backend must be one of"):
        _pattern()(*_qkv(), backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="TRITON_INTERPRET=1"):
        _pattern()(*_qkv(), backend="triton")


def test_route_runs_through_the_op_on_cpu():
    # Full coverage of route attention is in test_route_attention.py.
    pattern = _pattern("causal & route(topk = 1, block = 8)")
    out = pattern(*_qkv())
    assert out.shape == _qkv()[0].shape and bool(torch.isfinite(out).all())


def test_not_a_pattern():
    with pytest.raises(PatternError, match="Pattern"):
        patterndsl.attention(*_qkv(), "causal")


_TRITON_SCRIPT = """
import torch, patterndsl
from tests.reference import reference_attention
p = patterndsl.compile("pattern p { causal & window(5) }")
q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
out, lse = p(q, k, v, return_lse=True, backend="triton")
ref, ref_lse = reference_attention(q, k, v, p.mask(24, 24, 2))
torch.testing.assert_close(out.double(), ref.detach(), atol=1e-3, rtol=1e-3)
torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-3, rtol=1e-3)
g = torch.randn_like(out)
(out * g).sum().backward()
got = [t.grad.clone() for t in (q, k, v)]
for t in (q, k, v):
    t.grad = None
(ref * g.double()).sum().backward()
for a, t in zip(got, (q, k, v)):
    torch.testing.assert_close(a.double(), t.grad.double(), atol=1e-3, rtol=1e-3)
print("triton-through-op-ok")
"""


@pytest.mark.slow
def test_triton_backend_through_the_same_op_under_interpreter():
    """backend="triton" on CPU tensors under TRITON_INTERPRET=1 runs the generated kernels via this op."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton-through-op-ok" in done.stdout


def test_backend_resolution_by_device():
    from patterndsl.runtime.validate import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("triton", torch.device("cuda")) == "triton"
    with pytest.raises(BackendError, match=r"\.cpu\(\)"):
        resolve_backend("cpu", torch.device("cuda"))
    with pytest.raises(BackendError, match="meta"):
        resolve_backend("auto", torch.device("meta"))


def test_first_call_imports_no_compiler_machinery():
    """A CPU user's first call (compile, forward, backward) stays clear of torch._dynamo and sympy.

    Importing those took 0.4-1.7 s here, most of the first call's time; the op is therefore
    registered with torch.library.define/impl (custom_op's wrappers import dynamo on first
    call), closed forms are derived lazily and semantics broadcasts shapes itself.
    """
    code = (
        "import sys, torch, patterndsl\n"
        "p = patterndsl.compile('pattern p { causal & window(20) }')\n"
        "q = torch.randn(1, 2, 300, 16, requires_grad=True)\n"
        "p(q, q, q).sum().backward()\n"
        "heavy = ['torch._dynamo', 'sympy', 'torch.fx.experimental.symbolic_shapes']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_closed_forms_are_derived_on_first_use():
    plan = _pattern("causal & window(100)").plan(1024, block=(64, 64))
    (group,) = plan.groups
    assert "forms" not in group.__dict__
    assert group.forms is not None and group.forms is group.forms
