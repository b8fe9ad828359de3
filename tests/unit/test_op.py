"""The torch op around pattern attention: registration, run-time data, fake kernels, torch.compile, validation."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import patterndsl
from patterndsl.errors import BackendError, InputError, LayoutError, PatternError
from patterndsl.runtime import cpu, op, plans
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


B, H, L, D = 2, 4, 24, 8
#: Input layouts as models produce them: the shapes of leaf tensors and the view taken of each.
LAYOUTS = {
    "contiguous": ([(B, H, L, D), (B, 2, L, D), (B, 2, L, D)], lambda x: x),
    # [B, L, H, D] viewed as [B, H, L, D]: what Hugging Face attention layers pass.
    "transposed": ([(B, L, H, D), (B, L, 2, D), (B, L, 2, D)], lambda x: x.transpose(1, 2)),
    # One key/value head expanded over every query head (stride 0), GQA written with expand.
    "expanded": ([(B, H, L, D), (B, 1, L, D), (B, 1, L, D)], lambda x: x.expand(B, H, L, D)),
    # Every other row and the first D columns of wider tensors: neither contiguous nor dense.
    "sliced": ([(B, H, 2 * L, 2 * D), (B, 2, 2 * L, 2 * D), (B, 2, 2 * L, 2 * D)], lambda x: x[:, :, ::2, :D]),
}


def _leaves_and_views(layout, requires_grad=False):
    shapes, view = LAYOUTS[layout]
    leaves = [torch.randn(shape, requires_grad=requires_grad) for shape in shapes]
    return leaves, [view(t) for t in leaves]


def _metadata(tensors):
    return [(tuple(t.shape), t.dtype, t.stride()) for t in tensors]


def test_opcheck_schema_fake_and_autograd():
    key = plans.register(_pattern().ir, (16, 16), "auto")
    _, (q, k, v) = _leaves_and_views("transposed", requires_grad=True)
    torch.library.opcheck(op.attention_fwd, (q, k, v, key, [], 0.5, "cpu"))
    out, lse = op.attention_fwd(q, k, v, key, [], 0.5, "cpu")
    dout = torch.randn(B, L, H, D).transpose(1, 2)
    args = (dout, torch.randn_like(lse), *(t.detach() for t in (q, k, v, out, lse)), key, [], 0.5, "cpu")
    torch.library.opcheck(op.attention_bwd, args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fake_kernels_match_the_real_ones(layout):
    """Shapes, dtypes and strides of the fake (meta) outputs are those of the real ones, forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = plans.register(_pattern().ir, (16, 16), "auto")
    _, (q, k, v) = _leaves_and_views(layout)
    out, lse = op.attention_fwd(q, k, v, key, [], 0.5, "cpu")
    # Upstream gradients in a layout of their own (transposed), as compiled graphs hand them over.
    dout, dlse = torch.randn(B, L, H, D).transpose(1, 2), torch.randn_like(lse)
    bwd_args = (dout, dlse, q, k, v, out, lse)
    grads = op.attention_bwd(*bwd_args, key, [], 0.5, "cpu")
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake_out = op.attention_fwd(fq, fk, fv, key, [], 0.5, "cpu")
        fake_grads = op.attention_bwd(*(mode.from_tensor(t) for t in bwd_args), key, [], 0.5, "cpu")
    assert _metadata(fake_out) == _metadata((out, lse))
    assert _metadata(fake_grads[:3]) == _metadata(grads[:3])
    assert grads[3] == [] and fake_grads[3] == []  # no float input: no table gradient
    assert all(t.is_contiguous() for t in (out, lse, *grads[:3]))


def _assert_compiled_matches_eager(f, leaves, backend):
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = compiled(*leaves)
    got.backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    expect = f(*leaves)
    expect.backward()
    torch.testing.assert_close(got, expect)
    for g, t in zip(grads, leaves, strict=True):
        torch.testing.assert_close(g, t.grad)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_compile_fullgraph_forward_and_backward(layout):
    pattern = _pattern("causal & (window(9) | sink(2))")
    view = LAYOUTS[layout][1]

    def f(q, k, v):
        out, lse = patterndsl.attention(view(q), view(k), view(v), pattern, return_lse=True)
        return out.square().sum() + lse.sum()

    leaves, _ = _leaves_and_views(layout, requires_grad=True)
    _assert_compiled_matches_eager(f, leaves, "aot_eager")


def test_torch_compile_inductor_no_graph_break():
    """The Hugging Face call: [B, L, H*D] activations viewed as [B, H, L, D], through Inductor."""
    pattern = _pattern()

    def f(x, y):
        q = x.view(B, L, H, D).transpose(1, 2)
        kv = y.view(B, L, 2, D).transpose(1, 2)
        return (pattern(q, kv, kv) * 2).square().sum()

    leaves = [torch.randn(B, L, H * D, requires_grad=True), torch.randn(B, L, 2 * D, requires_grad=True)]
    explained = torch._dynamo.explain(f)(*leaves)
    assert explained.graph_break_count == 0
    _assert_compiled_matches_eager(f, leaves, "inductor")


def _recording_cpu(monkeypatch):
    """Stand in for a backend that reads run-time data: the CPU executor, recording the data it is given."""
    seen = []
    real_forward, real_backward = cpu.forward, cpu.backward

    def forward(q, k, v, plan, scale, data):
        seen.append(("forward", [t.clone() for t in data]))
        return real_forward(q, k, v, plan, scale)

    def backward(q, k, v, out, lse, dout, plan, scale, dlse=None, data=()):
        seen.append(("backward", [t.clone() for t in data]))
        return real_backward(q, k, v, out, lse, dout, plan, scale, dlse=dlse)

    monkeypatch.setattr(cpu, "forward", forward)
    monkeypatch.setattr(cpu, "backward", backward)
    return seen


def test_run_time_data_reaches_the_backend_under_torch_compile(monkeypatch):
    seen = _recording_cpu(monkeypatch)
    key = plans.register(_pattern().ir, (16, 16), "auto")
    # What later features pass: ids per token, a float table (differentiable: this pattern reads none, so 0).
    data = [torch.arange(40) // 10, torch.randn(3, requires_grad=True)]

    def f(q, k, v):
        out, lse = op.attention_fwd(q, k, v, key, data, 0.5, "cpu")
        return out.square().sum() + lse.sum()

    leaves = [t.requires_grad_() for t in _qkv(hkv=1)]
    _assert_compiled_matches_eager(f, leaves, "aot_eager")
    assert [kind for kind, _ in seen] == ["forward", "backward"] * 2
    for _, got in seen:
        assert len(got) == 2
        for a, b in zip(got, data, strict=True):
            assert torch.equal(a, b.detach())
    assert torch.equal(data[1].grad, torch.zeros(3))


def test_run_time_data_passes_opcheck(monkeypatch):
    _recording_cpu(monkeypatch)
    key = plans.register(_pattern().ir, (16, 16), "auto")
    q, k, v = (t.requires_grad_() for t in _qkv(hkv=1))
    torch.library.opcheck(op.attention_fwd, (q, k, v, key, [torch.arange(40)], 0.5, "cpu"))


def test_a_backend_without_data_refuses_a_non_empty_list():
    calls = []
    old = types.SimpleNamespace(__name__="patterndsl.runtime.old", forward=lambda *args: calls.append(args) or args)
    assert op._run(old, "forward", 1, 2, data=[]) == (1, 2)
    with pytest.raises(BackendError, match="old backend does not take run-time inputs"):
        op._run(old, "forward", 1, 2, data=[torch.zeros(1)])
    assert len(calls) == 1


def test_the_op_validates_what_it_is_handed():
    key = plans.register(_pattern().ir, (16, 16), "auto")
    q, k, v = _qkv()
    with pytest.raises(InputError, match="head_dim differs: q has 8, v has 4"):
        op.attention_fwd(q, k, v[..., :4], key, [], 0.5, "cpu")
    with pytest.raises(InputError, match="q must have 4 dimensions"):
        op.attention_fwd(q[0], k, v, key, [], 0.5, "cpu")
    with pytest.raises(InputError, match="float64"):
        op.attention_fwd(q.double(), k.double(), v.double(), key, [], 0.5, "triton")


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


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ([[1.0]], *_qkv()[1:]), "q must be a torch.Tensor, got list"),
        (lambda: (_qkv()[0][0], *_qkv()[1:]), r"q must have 4 dimensions \[batch, heads, seq, head_dim\]"),
        (lambda: (_qkv()[0].int(), *_qkv()[1:]), "q has dtype int32; .* supports float16, bfloat16, float32"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "must be on one device, got cpu(,| and) meta"),
        (lambda: (_qkv()[0], _qkv(d=4)[1], _qkv()[2]), "head_dim differs: q has 8, k has 4"),
        (lambda: (_qkv(b=2)[0], *_qkv()[1:]), "batch sizes differ: q has 2, k has 1"),
        (lambda: _qkv(h=3, hkv=2), "2 heads, which does not divide the 3 query heads"),
    ],
)
def test_one_validator_says_the_same_everywhere(make, match):
    """attention(), Pattern.mask(q=, k=) and the op itself reject a bad tensor with one message."""
    q, k, v = make()
    pattern = _pattern()
    with pytest.raises(InputError, match=match):
        patterndsl.attention(q, k, v, pattern)
    with pytest.raises(InputError, match=match):
        pattern.mask(40, 40, 2, q=q, k=k)
    # The dispatcher itself rejects a non-tensor and sends a meta tensor to the fake kernel.
    if isinstance(q, torch.Tensor) and k.device == q.device:
        key = plans.register(pattern.ir, (16, 16), "auto")
        with pytest.raises(InputError, match=match):
            op.attention_fwd(q, k, v, key, [], 0.5, "cpu")


def test_mask_sizes_are_checked_against_its_arguments():
    pattern = _pattern()
    q, k, _ = _qkv()
    with pytest.raises(InputError, match="q has 2 heads but mask"):
        pattern.mask(40, 40, 4, q=q, k=k)
    with pytest.raises(InputError, match="k has sequence length 40 but mask"):
        pattern.mask(40, 32, 2, q=q, k=k)


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
x = torch.randn(1, 24, 2, 16, requires_grad=True)
k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(2))
q = x.transpose(1, 2)  # the Hugging Face layout
out, lse = p(q, k, v, return_lse=True, backend="triton")
assert out.is_contiguous()
ref, ref_lse = reference_attention(q, k, v, p.mask(24, 24, 2))
torch.testing.assert_close(out.double(), ref.detach(), atol=1e-3, rtol=1e-3)
torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-3, rtol=1e-3)
g = torch.randn_like(out)
(out * g).sum().backward()
got = [t.grad.clone() for t in (x, k, v)]
for t in (x, k, v):
    t.grad = None
(ref * g.double()).sum().backward()
for a, t in zip(got, (x, k, v)):
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
