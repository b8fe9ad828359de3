"""Interpreter cases for patterns with run-time inputs: generated kernels vs the float64 reference.

Run inside the worker process like :mod:`tests.interpreter.cases` (which adds :data:`INPUT_CHECKS`
to its checks). Each case draws fresh q, k, v and inputs (the seed is in the failure message),
runs the kernels on the exact call-time lists and the packed input table, and compares out, lse,
dq, dk and dv with ``tests/reference.py`` on ``Pattern.mask(..., **inputs)`` (the dense meaning,
per batch element). Small sizes and 16 x 16 tiles so documents cross tile borders.
"""

from __future__ import annotations

import functools
import random

import torch

import patterndsl
from patterndsl.runtime import triton_backend as tb
from tests.interpreter.cases import TOL, make_plan, reference_grads
from tests.reference import reference_attention

PACKED = "input doc: int[batch, token]\n within(doc, causal & (window(w) | sink(2)))"


def _docs(rng: random.Random, batch: int, n: int) -> torch.Tensor:
    # Random document lengths (1-token documents included) per batch element.
    rows = []
    for _ in range(batch):
        lengths, left = [], n
        while left:
            size = min(left, rng.choice([1, 3, 7, 12, 17, 30]))
            lengths.append(size)
            left -= size
        rows.append(patterndsl.segments(lengths))
    return torch.stack(rows)


def _inputs(kind: str, rng: random.Random, batch: int, lq: int, lk: int, heads: int) -> dict:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "docs":
        return {"doc": _docs(rng, batch, lk)}
    if kind == "shared_docs":
        return {"doc": _docs(rng, 1, lk)[0]}
    if kind == "docs_tags":
        return {"doc": _docs(rng, batch, lk), "tag": (torch.rand(batch, lk, generator=gen) < 0.1).to(torch.int64)}
    if kind == "tags":
        return {"tag": (torch.rand(batch, lk, generator=gen) < 0.15).to(torch.int32)}
    if kind == "prefix":
        return {"prefix": torch.randint(0, lk + 4, (batch,), generator=gen)}
    if kind == "tables":
        return {
            "lag": torch.randint(-3, 6, (batch, heads), generator=gen),
            "tab": torch.randint(0, 4, (4,), generator=gen),
            "tag": torch.randint(-2, 3, (batch, lk), generator=gen),
            "big": torch.randint(-(10**6), 10**6, (batch, lk), generator=gen),
        }
    raise ValueError(kind)


# name: (pattern body, inputs, Lq, Lk, B, H, Hkv, D, dtype)
CASES = {
    "inputs_packed_docs": (PACKED, "docs", 40, 40, 2, 2, 2, 16, torch.float32),
    "inputs_packed_docs_fp16_gqa": (
        "input doc: int[token]\n within(doc, causal & (window(w) | sink(2)))", "shared_docs", 40, 40, 2, 4, 2, 16,
        torch.float16,
    ),
    "inputs_within_short_q": ("input doc: int[batch, token]\n within(doc, causal)", "docs", 24, 40, 2, 2, 1, 16,
                              torch.float32),
    "inputs_within_long_q": ("input doc: int[batch, token]\n within(doc, causal & window(5))", "docs", 40, 24, 1, 2,
                             2, 16, torch.float32),
    # Lq and Lk inside within are the segment's length: each document's last three keys are global.
    "inputs_within_lengths": (
        "input doc: int[batch, token]\n within(doc, where(k >= Lk - 3) | causal & window(2) | blocks(4))", "docs",
        40, 40, 2, 1, 1, 16, torch.float32,
    ),
    "inputs_tagged_globals": (
        "input tag: int[batch, token]\n window(w, w) | where(tag[q] == 1 or tag[k] == 1)", "tags", 40, 40, 2, 2, 1,
        16, torch.float32,
    ),
    "inputs_prefix_per_example": (
        "input prefix: int[batch]\n causal | where(k < prefix)", "prefix", 24, 40, 3, 2, 2, 16, torch.float16,
    ),
    # Head and table indices, table indices outside [0, 4) (clamped) and int64 arithmetic on an input
    # (q * 100003 * big[q] reaches 4e12).
    "inputs_tables_clamped": (
        "input lag: int[batch, head]\n input tab: int[4]\n input tag: int[batch, token]\n"
        " input big: int[batch, token]\n"
        " where(k <= q + lag[h] and k % 4 != tab[q % 7]) | where(tab[k - 2] == 2 and tag[k] == 1)"
        " | where((q * 100003 * big[q]) % 7 == 3)",
        "tables", 40, 40, 2, 3, 1, 16, torch.float32,
    ),
}  # fmt: skip


def input_case(body, kind, lq, lk, batch, heads, kv_heads, d, dtype, seed=None):
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    where = f"(seed {seed})"
    pattern = patterndsl.compile(f"pattern p(w = 3) {{ {body} }}")
    inputs = _inputs(kind, rng, batch, lq, lk, heads)
    data = [inputs[d.name] for d in pattern.ir.inputs]
    plan = make_plan(pattern, lq, lk, heads, (16, 16), order="identity")
    q = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, lk, d, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, lk, d, generator=gen).to(dtype)
    dout = torch.randn(batch, heads, lq, d, generator=gen).to(dtype)
    scale = 0.7 * d**-0.5
    mask = pattern.mask(lq, lk, heads, **inputs)
    assert mask.shape[1:] == (heads, lq, lk) and mask.shape[0] in (1, batch)
    assert mask.any() and not mask.all(), f"degenerate mask {where}"
    fwd_tol, grad_tol = TOL[dtype]

    out, lse = tb.forward(q, k, v, plan, scale, data=data)
    ref_out, ref_lse = reference_attention(q, k, v, mask, scale)
    assert not out.isnan().any() and not lse.isnan().any(), where
    torch.testing.assert_close(out.double(), ref_out, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"out {where}: {m}")
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()), f"empty rows differ {where}"
    torch.testing.assert_close(lse.double(), ref_lse, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"lse {where}: {m}")
    grads = tb.backward(q, k, v, out, lse, dout, plan, scale, data=data)
    for name, got, want in zip(("dq", "dk", "dv"), grads, reference_grads(q, k, v, mask, dout, scale), strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        torch.testing.assert_close(
            got.double(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m, n=name: f"{n} {where}: {m}"
        )


def case_inputs_public_call_autograd():
    """p(q, k, v, doc=ids) on the Triton backend: out and autograd gradients equal the float64 reference,
    a second call with other documents gets other lists (no stale cache), an in-place write is seen."""
    pattern = patterndsl.compile(f"pattern p(w = 3) {{ {PACKED} }}")
    seed = random.randrange(2**31)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen, requires_grad=True) for _ in range(3))
    doc = _docs(rng, 2, 40)
    for step in range(3):
        if step == 1:
            doc = _docs(rng, 2, 40)
        if step == 2:
            doc[1, 20:] += 100  # a new document starts at 20 in element 1 (same tensor, new version)
        out = pattern(q, k, v, backend="triton", doc=doc)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref, _ = reference_attention(q64, k64, v64, pattern.mask(40, 40, 2, doc=doc))
        torch.testing.assert_close(
            out.double(), ref, atol=2e-4, rtol=2e-4, msg=lambda m, s=step: f"step {s} seed {seed}: {m}"
        )
        dout = torch.randn(out.shape, generator=gen)
        q.grad = k.grad = v.grad = None
        (out * dout).sum().backward()
        (ref * dout.double()).sum().backward()
        for got, want in zip((q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), strict=True):
            torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-3, msg=lambda m: f"seed {seed}: {m}")


BODIES = [
    "causal",
    "causal & (window(4) | sink(2))",
    "blocks(8) & ~causal",
    "where(k >= Lk - 3 or q < 2)",
    "window(2, 5, dilation = 2)",
    "full",
]


def case_inputs_random_within():
    """Random within(...) bodies beside tagged globals, random documents, Lq != Lk and GQA."""
    rng = random.Random(random.randrange(2**31))
    for _ in range(3):
        body = f"input doc: int[batch, token]\n input tag: int[batch, token]\n within(doc, {rng.choice(BODIES)})"
        if rng.random() < 0.5:
            body += " | where(tag[k] == 1 and q >= k)"
        lq, lk = rng.choice([(40, 40), (24, 40), (40, 33)])
        heads, kv_heads = rng.choice([(2, 1), (2, 2), (4, 2)])
        seed = rng.randrange(2**31)
        try:
            input_case(body, "docs_tags", lq, lk, 2, heads, kv_heads, 16, torch.float32, seed=seed)
        except Exception as err:
            raise AssertionError(f"{body}\nLq={lq} Lk={lk} heads={heads}/{kv_heads} seed={seed}: {err!r}") from None


INPUT_CHECKS = {name: functools.partial(input_case, *spec) for name, spec in CASES.items()}
INPUT_CHECKS["inputs_public_call_autograd"] = case_inputs_public_call_autograd
INPUT_CHECKS["inputs_random_within"] = case_inputs_random_within
