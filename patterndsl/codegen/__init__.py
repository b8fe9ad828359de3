"""Stage 5 of the pipeline: Triton source generation.

Comes in: a bound pattern (or its block plan) and the shapes, dtype and tile
sizes to specialise to. Goes out: deterministic Triton source text
(:func:`kernel_source`), one kernel family for static patterns and patterns
with ``route(...)``; :mod:`patterndsl.codegen.launch` is the launch table,
:mod:`patterndsl.codegen.key` what the cache key hashes, and
:mod:`patterndsl.codegen.inspect` compiles kernels ahead of time for sm_80 /
sm_90 and reports PTX and SASS resources.
"""

from __future__ import annotations

import torch

from patterndsl.codegen import score as score_code
from patterndsl.codegen.generator import DTYPES, KernelSpec, kernel_names, make_spec, per_call, render
from patterndsl.codegen.launch import launch, launch_config, launch_tiles

__all__ = [
    "KernelSpec",
    "kernel_names",
    "kernel_source",
    "launch",
    "launch_config",
    "launch_tiles",
    "make_spec",
    "render",
    "spec_for",
]


def spec_for(
    pattern,
    q_len: int,
    kv_len: int | None = None,
    heads: int = 1,
    *,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    block: tuple[int, int] | None = None,
    kind: str = "forward",
    kv_heads: int | None = None,
    order: str = "auto",
    target: str = "sm_90",
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> KernelSpec:
    """Plan ``pattern`` at these sizes and collect the :class:`KernelSpec` of one pass.

    Args:
        pattern: a :class:`patterndsl.Pattern`.
        q_len, kv_len, heads: sizes (``kv_len`` defaults to ``q_len``).
        head_dim, dtype, block, kind, kv_heads, order, target, num_warps, num_stages:
            see :func:`patterndsl.codegen.generator.make_spec`; ``order`` goes to the planner
            (a pattern with ``route`` or run-time inputs is always planned in the identity order: its
            run-time lists are in token order); ``block`` defaults to the target's :func:`launch_tiles`
            ((64, 64) for the interpreter).

    Returns:
        The spec.
    """
    if block is None:
        tables = score_code.has_tables(pattern.ir.score)
        block = launch_tiles(head_dim, target, kind, DTYPES.get(dtype, "float16"), per_call(pattern.ir), tables)
        block = block or (64, 64)
    if per_call(pattern.ir):
        order = "identity"
    plan = pattern.plan(q_len, kv_len, heads, block=tuple(block), order=order)
    return make_spec(
        plan,
        kind=kind,
        head_dim=head_dim,
        dtype=dtype,
        kv_heads=kv_heads,
        target=target,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def kernel_source(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **options) -> str:
    """The generated Triton source of ``pattern`` for one shape, dtype and pass, as text.

    Args:
        pattern: a :class:`patterndsl.Pattern`.
        q_len, kv_len, heads: sizes the plan is specialised to.
        **options: ``head_dim`` (64), ``dtype`` (``torch.float16``), ``block`` (the target's
            :func:`launch_tiles`; (64, 64) for ``target="interpret"``), ``kind`` (``"forward"`` or
            ``"backward"``), ``kv_heads`` (``heads``), ``order`` (``"auto"``), ``target``
            (``"sm_90"``), ``num_warps``, ``num_stages`` (the launch table's).

    Returns:
        Deterministic source text whose header names the pattern, tiles and cache key.
    """
    from patterndsl import ir

    if any(ir.contents(node) for node in pattern.ir.nodes()):
        from patterndsl.codegen import clusters

        return clusters.kernel_source(pattern, q_len, kv_len, heads, **options)
    return render(spec_for(pattern, q_len, kv_len, heads, **options))
