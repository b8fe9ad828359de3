"""Interpreter cases: scores that read float inputs (learned tables) on the generated Triton kernels.

The tables are read from ``RT`` as float32 bits and their gradients come from the dQ kernel's
atomic adds into ``DTAB``; outputs, log-sum-exp and the gradients of ``q``, ``k``, ``v`` and every
table are compared with the float64 reference (:func:`patterndsl.semantics.attention`, through
autograd), in float32 and float16. Cases are the CPU tests' (``tests/unit/test_score_tables.py``).
``score`` with ``route`` (the route kernels apply the modifier to the routed pairs) is checked the
same way (``tests/unit/test_score_route.py``).
"""

from __future__ import annotations

import torch

import patterndsl
from patterndsl import semantics

#: dtype -> (atol, rtol) of outputs and gradients, relative to each tensor's largest entry for tables.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 1e-2)}


def _check(name: str, dtype: torch.dtype, batch=2, heads=4, kv_heads=2, length=40, d=16, seed=0):
    from tests.unit.test_score_tables import CASES

    source, shapes = CASES[name]
    length = 36 if name == "grid_windows" else length
    gen = torch.Generator().manual_seed(seed)
    p = patterndsl.compile(source)
    q = torch.randn(batch, heads, length, d, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(batch, kv_heads, length, d, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    tables = {
        n: (0.5 * torch.randn(*s, generator=gen)).to(dtype).requires_grad_() for n, s in shapes(heads, length).items()
    }
    out, lse = p(q, k, v, return_lse=True, backend="triton", **tables)
    ref, ref_lse = semantics.attention(p.ir, q, k, v, data=tables)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    leaves = (q, k, v, *tables.values())
    got = torch.autograd.grad((out.float() * dout.float()).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((ref * dout.double()).sum() + ref_lse.sum(), leaves)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    for what, g, w in zip(["dq", "dk", "dv", *(f"d{n}" for n in tables)], got, want, strict=True):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(
            g.double(), w.double(), atol=atol * scale, rtol=rtol, msg=lambda m, w=what: f"{w}: {m}"
        )


def case_score_tables_fp32():
    _check("softcapped_bias", torch.float32)
    _check("learned_alibi_and_key_bias", torch.float32)


def case_score_tables_fp16():
    _check("grid_windows", torch.float16)
    _check("scaled_by_table", torch.float16)


def case_score_route():
    from tests.unit.test_score_route import SOURCES, reference

    for name, dtype in (("softcap_route_tiles", torch.float16), ("alibi_route_rows", torch.float32)):
        p = patterndsl.compile(SOURCES[name])
        gen = torch.Generator().manual_seed(2)
        q, k, v = (torch.randn(2, 2, 70, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        out, lse = p(q, k, v, return_lse=True, backend="triton")
        ref, ref_lse = reference(p, q, k, v)
        dout = torch.randn(out.shape, generator=gen).to(dtype)
        got = torch.autograd.grad((out.float() * dout.float()).sum() + lse.sum(), (q, k, v))
        want = torch.autograd.grad((ref * dout.double()).sum() + ref_lse.sum(), (q, k, v))
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol)


def case_score_tables_non_finite_key():
    """A key whose scores are -inf under a score reading two float tables: the launcher's exact rows apply
    the score and give the tables their share of the gradient (float32, against the float64 reference
    with the key's pairs blocked)."""
    from tests.reference import reference_attention
    from tests.unit.test_triton_finite_scores import BAD, TABLES, W, _inputs, _score

    p = patterndsl.compile(TABLES)
    q, k, kb, v, w, tables = _inputs()
    window = patterndsl.compile(f"pattern p {{ causal & window({W}) }}").ir
    mask = semantics.mask(window, q.shape[2], q.shape[2], 2)[None].repeat(2, 1, 1, 1)
    mask[0, 1, :, BAD] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v, tables["rel"], tables["kb"])]
    ref, ref_lse = reference_attention(*leaves[:3], mask, 0.5, score=_score(leaves[3], leaves[4]))
    want = torch.autograd.grad((ref * w).sum() + ref_lse.sum(), leaves)
    got_leaves = [t.float().requires_grad_() for t in (q, kb, v, tables["rel"], tables["kb"])]
    qf, kf, vf, rel, key_bias = got_leaves
    out, lse = p(qf, kf, vf, scale=0.5, return_lse=True, backend="triton", rel=rel, kb=key_bias)
    got = torch.autograd.grad((out * w.float()).sum() + lse.sum(), got_leaves)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-4, rtol=1e-4)
    for name, g, want_g in zip(("dq", "dk", "dv", "drel", "dkb"), got, want, strict=True):
        assert bool(torch.isfinite(g).all()), name
        scale = max(1.0, float(want_g.abs().max()))
        torch.testing.assert_close(g.double(), want_g, atol=1e-4 * scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


SCORE_TABLE_CHECKS = {
    "score_tables_non_finite_key": case_score_tables_non_finite_key,
    "score_tables_fp32": case_score_tables_fp32,
    "slow_score_tables_fp16": case_score_tables_fp16,
    "score_route": case_score_route,
}
