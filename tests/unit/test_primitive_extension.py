"""A primitive added through the registry alone reaches every stage: check, meaning, plan, CPU and Triton kernels.

Two primitives are defined here and registered only while these tests run
(no product file knows them):

* ``band2(lo, hi)``: ``lo <= q - k <= hi``, with every tile rule (it reuses the
  band rule of ``window``), so its plans need no element-wise evaluation;
* ``parity``: ``(q + k) % 2 == 0``, nullary, opting out of every tile rule, so
  the plan evaluates its tiles element by element.

The Triton part (:func:`kernel_case`) runs in the shared interpreter worker,
started with ``TRITON_INTERPRET=1`` (Triton reads the variable when it is
imported), through ``tests/interpreter/test_extension_kernels.py``; each case
registers the same records while it compiles and runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import patterndsl as pd
from patterndsl import ir
from patterndsl.analysis.plan import tile_reduce
from patterndsl.errors import PatternNameError, PatternTypeError, PatternValueError
from patterndsl.primitives import REGISTRY, Primitive, register, registered, unregister
from patterndsl.primitives.band import band
from patterndsl.primitives.common import param, require
from tests.reference import reference_attention


def _band2_check(values, spans, layout):
    lo, hi = values["lo"], values["hi"]
    require(lo <= hi, f"band2 needs lo <= hi, got lo = {lo} and hi = {hi}", spans["hi"])


BAND2 = Primitive(
    "band2",
    params=(param("lo", "int"), param("hi", "int")),
    check=_band2_check,
    shape_args=None,
    check_sizes=None,
    reads_head=None,
    meaning=lambda prim, q, k, h, ctx, selection: (q - k >= prim.arg("lo")) & (q - k <= prim.arg("hi")),
    classify=lambda prim, qp, kp, env: band(qp, kp, prim.arg("lo"), prim.arg("hi"), 1),
    needed_keys=lambda prim, qlo, qhi, qalo, qahi, env: (qlo - prim.arg("hi"), qhi - prim.arg("lo"), None, None),
    candidates=None,
    cost=1,
    band=lambda prim, env: (prim.arg("lo"), prim.arg("hi"), 1),
    total=None,  # its band total
    count=None,  # its band count
    triton=lambda r, p: r.all_of([f"q - k >= {p.arg('lo')}", f"q - k <= {p.arg('hi')}"]),
)

PARITY = Primitive(
    "parity",
    params=(),
    check=None,
    shape_args=None,
    check_sizes=None,
    reads_head=None,
    meaning=lambda prim, q, k, h, ctx, selection: torch.remainder(q + k, 2) == 0,
    classify=None,
    needed_keys=None,
    candidates=None,
    cost=5,
    band=None,
    total=None,
    count=None,
    triton=lambda r, p: "(q + k) % 2 == 0",  # the sign of a remainder never changes "== 0"
)

SOURCES = {
    "band2": "pattern p(lo = -2, hi = 5) { band2(lo, hi) }",
    "parity": "pattern p { parity }",
    "mixed": "pattern p { causal & band2(0, 6) | parity - sink(2) }",
}

#: Kernel cases under the interpreter (``mixed`` holds both primitives; it keeps the run short).
KERNEL_CASES = ("band2", "mixed")


def _expected(name: str, lq: int, lk: int) -> torch.Tensor:
    """The meaning written out independently of the records."""
    d = torch.arange(lq)[:, None] + (lk - lq) - torch.arange(lk)[None, :]
    s = torch.arange(lq)[:, None] + (lk - lq) + torch.arange(lk)[None, :]
    if name == "band2":
        return (d >= -2) & (d <= 5)
    if name == "parity":
        return s % 2 == 0
    k = torch.arange(lk)[None, :]
    return ((d >= 0) & (d <= 6)) | ((s % 2 == 0) & (k >= 2))


@pytest.fixture(autouse=True)
def extended():
    with registered(BAND2, PARITY):
        yield
    assert "band2" not in REGISTRY and "parity" not in REGISTRY


def test_check_binds_and_validates_arguments():
    p = pd.compile("pattern p(w = 3) { band2(-w, w + 1) & ~parity }")
    prim = next(s for s in ir.walk(p.ir.default) if isinstance(s, ir.Prim) and s.name == "band2")
    assert prim.args == (("lo", -3), ("hi", 4))
    assert pd.compile(str(p.ir.default).join(["pattern p { ", " }"])).ir.default == p.ir.default  # prints, re-parses
    with pytest.raises(PatternValueError, match="band2 needs lo <= hi, got lo = 3 and hi = 1") as err:
        pd.compile("pattern p { band2(3, 1) }")
    assert err.value.span.column == 22  # at the argument ``hi``
    with pytest.raises(PatternTypeError, match="missing required argument 'hi'"):
        pd.compile("pattern p { band2(3) }")
    with pytest.raises(PatternTypeError, match="must be an integer, got a pattern"):
        pd.compile("pattern p { band2(causal, 1) }")
    with pytest.raises(PatternTypeError, match="primitive 'band2' needs arguments"):
        pd.compile("pattern p { band2 }")
    with pytest.raises(PatternTypeError, match=r"parity\(\) takes none"):
        pd.compile("pattern p { parity(1) }")
    with pytest.raises(PatternNameError, match="built-in name"):
        pd.compile("pattern p(band2 = 1) { causal }")


def test_unregistered_it_is_unknown_again():
    unregister("band2")
    try:
        with pytest.raises(PatternNameError, match="unknown primitive 'band2'"):
            pd.compile("pattern p { band2(0, 1) }")
    finally:
        register(BAND2)


@pytest.mark.parametrize("name", sorted(SOURCES))
@pytest.mark.parametrize(("lq", "lk"), [(40, 40), (29, 40), (40, 29)])
def test_meaning_and_plan(name, lq, lk):
    p = pd.compile(SOURCES[name])
    dense = p.mask(lq, lk, 2)
    assert torch.equal(dense, _expected(name, lq, lk).expand(2, -1, -1))
    for order in ("identity", "auto"):
        for block in ((8, 8), (16, 4)):
            plan = p.plan(lq, lk, 2, block=block, order=order)
            ref = tile_reduce(dense[:, plan.q_order][:, :, plan.kv_order], *block)
            assert torch.equal(plan.tiles(), ref), (name, order, block)
            assert plan.stats.allowed_pairs == int(dense.sum())
    evaluated = p.plan(lq, lk, block=(8, 8), order="identity").stats.tiles_evaluated
    if name == "band2":
        assert evaluated == 0  # decided by its own tile rules
    if name == "parity":
        assert evaluated > 0  # it opted out: element by element


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_cpu_attention_matches_float64_reference(name):
    gen = torch.Generator().manual_seed(7)
    lq, lk = 37, 45
    q = torch.randn(2, 2, lq, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 1, lk, 16, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    p = pd.compile(SOURCES[name])
    out, lse = p(q, k, v, return_lse=True, backend="cpu")
    mask = _expected(name, lq, lk).expand(2, -1, -1)
    q64, k64, v64 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, mask)
    torch.testing.assert_close(out, ref_out)
    finite = ~ref_lse.isneginf()
    assert torch.equal(lse.isneginf(), ~finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)  # lse is float32
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (out * dout).sum().backward()
    (ref_out * dout).sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_source_holds_its_fragment():
    source = pd.compile(SOURCES["mixed"]).kernel_source(64, heads=1)
    assert "q - k >= 0" in source and "q - k <= 6" in source and "(q + k) % 2 == 0" in source


def kernel_case(name: str) -> None:
    """Generated kernels (forward and backward, float32) vs the float64 reference, under the interpreter.

    Run by the shared interpreter worker (``tests/interpreter/test_extension_kernels.py``).
    """
    from tests.interpreter.cases import check, make_plan

    rng = np.random.default_rng(11 + KERNEL_CASES.index(name))
    with registered(BAND2, PARITY):
        p = pd.compile(SOURCES[name])
        lq, lk = (40, 40) if name != "mixed" else (33, 40)
        check(p, make_plan(p, lq, lk, 2), lq, lk, 2, 1, 16, torch.float32, seed=int(rng.integers(2**31)))
