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

from patterndsl.codegen import passes
from patterndsl.codegen import score as score_code
from patterndsl.codegen.generator import DTYPES, KernelSpec, kernel_names, make_spec, per_call, render
from patterndsl.codegen.launch import PLAN_TILES, launch, launch_config, launch_tiles

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
    "specs_for",
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
        The spec (of the whole plan: :func:`specs_for` gives one per part of a plan that splits).
    """
    plan, rows, launch_facts = _plan_for(pattern, q_len, kv_len, heads, head_dim, dtype, block, kind, order, target)
    return make_spec(passes.fitted(plan, rows(plan)), kv_heads=kv_heads, num_warps=num_warps, num_stages=num_stages,
                     **launch_facts)  # fmt: skip


def specs_for(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **options) -> list[KernelSpec]:
    """The :class:`KernelSpec` of every pass the Triton launcher runs for ``pattern`` at these sizes.

    A plan that runs as parts (:mod:`patterndsl.analysis.parts`, split from the plan at
    :data:`~patterndsl.codegen.launch.PLAN_TILES` as the runtime plans it, or at ``block`` when given) gives
    one spec per part, each in the part's own token order and at its own tile shape fitted into the launch
    row (:mod:`patterndsl.codegen.passes`); any other plan gives :func:`spec_for`'s one spec.

    Args:
        pattern, q_len, kv_len, heads, **options: as :func:`spec_for`.

    Returns:
        The specs, in the order the launcher runs (and merges) them.
    """
    kv_heads, warps, stages = (options.pop(name, None) for name in ("kv_heads", "num_warps", "num_stages"))
    options.setdefault("head_dim", 64)
    options.setdefault("dtype", torch.float16)
    options.setdefault("kind", "forward")
    options.setdefault("order", "auto")
    options.setdefault("target", "sm_90")
    block = options.pop("block", None)
    plan, rows, facts = _plan_for(pattern, q_len, kv_len, heads, block=block, split=True, **options)
    return [
        make_spec(passes.fitted(p, rows(p)), kv_heads=kv_heads, num_warps=warps, num_stages=stages, **facts)
        for p in passes.passes(plan)
    ]


def _plan_for(pattern, q_len, kv_len, heads, head_dim, dtype, block, kind, order, target, split: bool = False):
    # The plan (at the launch tiles or the given block; at PLAN_TILES when parts are asked for and no block is
    # given, as the runtime plans), the launch row's tiles of each pass (reordered plans have rows of their
    # own), and make_spec's launch facts.
    tables = score_code.has_tables(pattern.ir.score)
    run_time = per_call(pattern.ir)

    def rows(plan):
        if block is not None:
            return tuple(block)
        reordered = not plan.is_identity_order
        return launch_tiles(head_dim, target, kind, DTYPES.get(dtype, "float16"), run_time, tables, reordered)

    if run_time:
        order = "identity"
    facts = {"kind": kind, "head_dim": head_dim, "dtype": dtype, "target": target}
    if block is not None:
        return pattern.plan(q_len, kv_len, heads, block=tuple(block), order=order), rows, facts
    if split and order == "auto" and not run_time:
        whole = pattern.plan(q_len, kv_len, heads, block=PLAN_TILES, order=order)
        if whole.parts:
            return whole, rows, facts
    tiles = launch_tiles(head_dim, target, kind, DTYPES.get(dtype, "float16"), run_time, tables) or (64, 64)
    return pattern.plan(q_len, kv_len, heads, block=tiles, order=order), rows, facts


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
        Deterministic source text whose header names the pattern, tiles and cache key. A plan that runs
        as parts gives each part's source in turn (:func:`specs_for`), each under a line
        ``# ===== part i of n: order ORDER, tiles BMxBN`` (from 1) (the launcher merges their passes by log-sum-exp).
    """
    from patterndsl import ir

    if any(ir.contents(node) for node in pattern.ir.nodes()):
        from patterndsl.codegen import clusters

        return clusters.kernel_source(pattern, q_len, kv_len, heads, **options)
    specs = specs_for(pattern, q_len, kv_len, heads, **options)
    if len(specs) == 1:
        return render(specs[0])
    return "\n\n".join(
        f"# ===== part {i} of {len(specs)}: order {s.order}, tiles {s.block_m}x{s.block_n} (passes merged by lse)\n"
        + render(s)
        for i, s in enumerate(specs, 1)
    )
