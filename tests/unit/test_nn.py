"""patterndsl.nn.Attention against a float64 reference built from the same projections."""

from __future__ import annotations

import pytest
import torch

from patterndsl import PatternError, compile
from patterndsl.nn import Attention, rotary
from tests.reference import reference_attention

LOCAL = "pattern local(w = 3) { causal & window(w) }"


def _reference(module: Attention, x, positions=None, **inputs):
    """The module's computation in float64 with a dense mask from ``Pattern.mask``."""
    x = x.double()
    b, n, e = x.shape
    h, hk, d = module.num_heads, module.num_kv_heads, module.head_dim

    def proj(lin, heads):
        w = lin.weight.double()
        y = x @ w.T + (lin.bias.double() if lin.bias is not None else 0)
        return y.view(b, n, heads, d).transpose(1, 2)

    q, k, v = proj(module.q_proj, h), proj(module.k_proj, hk), proj(module.v_proj, hk)
    if module.rope_base is not None:
        pos = torch.arange(n) if positions is None else positions
        q, k = rotary(q, pos, module.rope_base), rotary(k, pos, module.rope_base)
    mask = module.pattern.mask(n, n, h, **inputs)
    out, _ = reference_attention(q, k, v, mask)
    out = out.transpose(1, 2).reshape(b, n, e)
    o = module.o_proj
    return out @ o.weight.double().T + (o.bias.double() if o.bias is not None else 0)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("rope", [False, True])
def test_one_dimensional(kv_heads, rope):
    torch.manual_seed(0)
    m = Attention(LOCAL, embed_dim=32, num_heads=4, num_kv_heads=kv_heads, rope=rope, w=5)
    x = torch.randn(2, 37, 32)
    y = m(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), _reference(m, x), atol=2e-5, rtol=2e-5)


def test_grid_pattern_and_backward(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "nat.pdsl"
    path.write_text("pattern nat(H = 6, W = 5, size = 3) { layout grid(y = H, x = W)\n neighborhood(size) }\n")
    m = Attention(str(path), embed_dim=16, num_heads=2, bias=False)
    x = torch.randn(2, 30, 16, requires_grad=True)
    y = m(x)
    ref = _reference(m, x)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grad, wgrad = x.grad.clone(), m.q_proj.weight.grad.clone()
    x.grad = None
    m.zero_grad()
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(grad.double(), x.grad.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(wgrad.double(), m.q_proj.weight.grad.double(), atol=1e-4, rtol=1e-4)


def test_inputs_and_positions():
    torch.manual_seed(2)
    p = compile(
        "pattern tagged(w = 2) { input tag: int[batch, token]\n window(w, w) | where(tag[q] == 1 or tag[k] == 1) }"
    )
    m = Attention(p, embed_dim=24, num_heads=3, rope=500.0)
    x = torch.randn(2, 19, 24)
    tag = torch.zeros(2, 19, dtype=torch.long)
    tag[0, 0] = 1
    tag[1, 7] = 1
    positions = torch.arange(19).flip(0)
    torch.testing.assert_close(
        m(x, positions=positions, tag=tag).double(), _reference(m, x, positions, tag=tag), atol=2e-5, rtol=2e-5
    )
    with pytest.raises(PatternError, match="tag"):
        m(x)


def test_errors():
    with pytest.raises(PatternError, match="divide"):
        Attention(LOCAL, embed_dim=30, num_heads=4)
    with pytest.raises(PatternError, match="num_kv_heads"):
        Attention(LOCAL, embed_dim=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(PatternError, match="already bound"):
        Attention(compile(LOCAL), embed_dim=32, num_heads=4, w=2)
    with pytest.raises(PatternError, match=r"\[batch, seq, 32\]"):
        Attention(LOCAL, embed_dim=32, num_heads=4)(torch.randn(3, 32))
    with pytest.raises(PatternError):
        Attention("pattern bad { nonsense(1) }", embed_dim=32, num_heads=4)


@pytest.mark.parametrize(
    "layout, size",
    [("grid(y = 5, x = 6)", "3"), ("grid(t = 3, y = 4, x = 5)", "(3, 3, 3)")],
    ids=["image", "video"],
)
def test_grid_shaped_input_as_natten_takes_it(layout, size):
    """``[batch, *grid, embed_dim]`` in and out (NATTEN's NeighborhoodAttention2D/3D), equal to the flat call."""
    torch.manual_seed(3)
    m = Attention(f"pattern nat {{ layout {layout}\n neighborhood({size}) }}", embed_dim=16, num_heads=2)
    grid = list(m.pattern.ir.layout.shape)
    x = torch.randn(2, *grid, 16)
    y = m(x)
    assert y.shape == x.shape
    flat = x.flatten(1, -2)
    torch.testing.assert_close(y.flatten(1, -2).double(), _reference(m, flat), atol=2e-5, rtol=2e-5)
    with pytest.raises(PatternError, match=r"\[batch, seq, 16\] or \[batch, "):
        m(x.transpose(1, 2))
