"""Routed Triton kernels under ``TRITON_INTERPRET=1``: forward, LSE and gradients against the float64 reference.

Triton must be imported with the variable set, so the cases run in the shared
interpreter worker (``conftest.py``); the pytest process collects their results.
Small shapes and 16 x 16 tiles (the interpreter is slow; tails and several
tiles per block still occur); fp32 and fp16 (bf16 ``tl.dot`` is broken
under the interpreter). Outputs are poisoned before each call by allocating
them with ``torch.empty`` after filling the allocator's memory with NaN.
"""

from __future__ import annotations

import functools
import os

import pytest

MOBA = "causal & (blocks(8) | route(topk = 2, block = 8, qblock = 1, among = causal - blocks(8)))"
CASES = {
    # name: (body, layout, Lq, Lk, B, H, Hkv, D, dtype)
    "moba_gqa_tails": (MOBA, None, 40, 40, 2, 4, 2, 16, "float32"),
    "moba_fp16": (MOBA, None, 33, 33, 1, 2, 1, 16, "float16"),
    "landmark_decode_chunk": (
        "causal & (window(5) | route(2, block = 6, score = landmark, qblock = 1, among = causal - window(5)))",
        None, 20, 44, 1, 2, 2, 16, "float32",
    ),
    "long_queries_max": ("causal & route(2, block = 5, score = max, qblock = 4, among = causal)", None, 37, 29, 1, 2, 1,
                         24, "float32"),
    "biformer_grid": ("route(topk = 2, block = (4, 4), qblock = (4, 4))", "y = 8, x = 8", 64, 64, 1, 2, 1, 16,
                      "float32"),
    "empty_rows_two_routes": (
        "route(1, block = 4, qblock = 2, among = causal - blocks(4))"
        " | (route(1, block = 8, among = causal) & window(3))",
        None, 24, 24, 1, 2, 2, 16, "float32",
    ),
    "per_head": ("causal & (sink(2) | route(2, block = 4))", None, 30, 30, 1, 3, 1, 16, "float32"),
    # random(...) tables reach the routed kernels through AUX.
    "random_and_route": ("causal & (random(1, 8, 3) | route(1, block = 8, among = causal))", None, 40, 40, 1, 2, 1,
                         16, "float32"),
    # A grid route planned as runs (analysis/routegrid.py; tests/unit/test_plan_grid_fast.py checks it applies).
    "grid_route_runs": ("neighborhood(3) | route(topk = 2, block = (2, 8))", "y = 6, x = 64", 384, 384, 1, 2, 2, 16,
                        "float32"),
}  # fmt: skip
#: Cases too slow for the default run (about 26 s in the interpreter).
SLOW = {"grid_route_runs"}


def _source(name):
    body, layout, *_ = CASES[name]
    heads = "heads 1..2: causal & window(4)\n" if name == "per_head" else ""
    lay = f"layout grid({layout})\n" if layout else ""
    return f"pattern {name} {{ {lay}{heads}{body} }}"


def run_case(name: str) -> None:
    """One case in this (interpreter) process; raises on a mismatch."""
    import torch

    import patterndsl
    from patterndsl import runtime
    from tests.reference import reference_attention

    runtime.TRITON_BLOCK = (16, 16)
    _, _, lq, lk, b, h, hkv, d, dtype = CASES[name]
    dt = getattr(torch, dtype)
    p = patterndsl.compile(_source(name))
    gen = torch.Generator().manual_seed(len(name))
    q, k, v = (torch.randn(b, n, length, d, generator=gen).to(dt) for n, length in ((h, lq), (hkv, lk), (hkv, lk)))
    torch.full((b, h, lq, d), float("nan")).sum()  # freed NaN memory for the outputs to land on
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = p(q, k, v, return_lse=True, backend="triton")
    mask = p.mask(lq, lk, h, q=q, k=k)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = reference_attention(q64, k64, v64, mask, d**-0.5)
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), g.to(dt))
    want = torch.autograd.grad(ref, (q64, k64, v64), g)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), w, atol=5 * tol, rtol=5 * tol)
    # And the CPU path agrees with the kernels.
    cpu_out = p(q.detach(), k.detach(), v.detach(), backend="cpu")
    torch.testing.assert_close(cpu_out.double(), out.detach().double(), atol=tol, rtol=tol)


def run_random(seed: int, count: int) -> None:
    """Random patterns joined to a random route (the plan property generators) on the routed kernels."""
    import random

    import torch

    from patterndsl import ir, runtime
    from patterndsl.api import Pattern
    from tests.reference import reference_attention
    from tests.unit.test_plan_property import _route, rand_case

    runtime.TRITON_BLOCK = (16, 16)
    rng = random.Random(seed)
    for _ in range(count):
        pir, lq, lk, heads, _ = rand_case(rng)
        node = rng.choice([ir.union, ir.inter])(pir.default, _route(rng, pir.layout))
        pir = ir.PatternIR("r", (), pir.layout, pir.heads, node)
        p = Pattern(pir)
        hkv = rng.choice([h for h in (1, heads) if heads % h == 0])
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        q = torch.randn(1, heads, lq, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(1, hkv, lk, 16, generator=gen, requires_grad=True) for _ in range(2))
        try:
            out, lse = p(q, k, v, return_lse=True, backend="triton")
            mask = p.mask(lq, lk, heads, q=q, k=k)
            q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
            ref, ref_lse = reference_attention(q64, k64, v64, mask, 16**-0.5)
            torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
            g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
            got = torch.autograd.grad(out, (q, k, v), g.float())
            want = torch.autograd.grad(ref, (q64, k64, v64), g)
            for a, w in zip(got, want, strict=True):
                torch.testing.assert_close(a.double(), w, atol=5e-4, rtol=5e-4)
        except Exception as err:
            raise AssertionError(f"{pir}\nLq={lq} Lk={lk} heads={heads}/{hkv}: {err!r}") from None


#: Worker case names are this prefix and a name of :data:`CASES` (or ``random_routes``).
CASE_PREFIX = "route:"


def interpreter_checks() -> dict:
    """The cases the shared interpreter worker (``tests/interpreter/worker.py``) runs for this module."""
    checks = {CASE_PREFIX + name: functools.partial(run_case, name) for name in CASES}
    seed = int(os.environ.get("PATTERNDSL_ROUTE_SEED", "0"))
    checks[CASE_PREFIX + "random_routes"] = lambda: run_random(seed or random_seed(), 6)
    return checks


def _run(interpreter, name):
    result = interpreter.run(CASE_PREFIX + name)
    if not result["ok"]:
        pytest.fail(result["error"], pytrace=False)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_route_kernel_matches_reference(interpreter, name):
    _run(interpreter, name)


@pytest.mark.parametrize("name", ["random_routes"])
def test_random_route_patterns_match_reference(interpreter, name):
    _run(interpreter, name)


def random_seed() -> int:
    import random

    return random.randrange(1, 2**31)
