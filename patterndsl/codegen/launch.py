"""Stage 5 (codegen): the launch table, one row for every kernel the generator writes.

Comes in: a head dim, a target (``sm_XY`` or ``interpret``), a pass and a dtype.
Goes out: a :class:`Launch`: plan tiles, warps, pipelining stages, the dot
precision and the offset width the kernels are built with. Static and run-time
(``route``) tile lists run the same tile functions; the element rule of a
route pattern costs registers of its own, so their rows take narrower key tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The tiles the runtime plans a Triton call at (``runtime.TRITON_BLOCK``): parts are split from that plan, and
#: each pass is then fitted to its kernel's launch row (:func:`fit_tiles`, :mod:`patterndsl.codegen.passes`).
PLAN_TILES = (64, 64)


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with: the next power of two, at least 16 (``tl.arange``/``tl.dot``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclass(frozen=True)
class Launch:
    """How one kernel is built and launched.

    Attributes:
        tiles: plan tiles ``(BM, BN)``, or None for the interpreter (any plan's tiles run there).
        num_warps, num_stages: the launch configuration.
        dot_precision: ``input_precision`` of every ``tl.dot`` (``"tf32"`` or ``"ieee"``).
        int64_offsets: row offsets widened to int64 (always: ``B * H * L * D`` can pass ``2**31``).
    """

    tiles: tuple[int, int] | None
    num_warps: int
    num_stages: int
    dot_precision: str
    int64_offsets: bool = True


def _weight(head_dim: int, dtype: str) -> int:
    # The bytes of one padded row / 2: what registers and shared memory per tile scale with.
    return padded_head_dim(head_dim) * (2 if dtype == "float32" else 1)


def _gpu(head_dim: int, kind: str, dtype: str) -> tuple[int, int, int, int]:
    # (BM, BN, num_warps, num_stages) for a GPU target, chosen from ahead-of-time builds (ptxas -v and
    # Triton's shared-memory size, tests/unit/test_aot.py) so every dtype x head dim x pass builds for
    # sm_80 and sm_90 with zero spills and within sm_80's 163 KB of shared memory.
    fp32 = dtype == "float32"
    weight = _weight(head_dim, dtype)
    if kind == "forward":
        if weight <= 128:
            # float32 tiles with three stages push ptxas into spilling even at small head dims.
            return 64, 64, 4 if weight < 128 else 8, 3 if not fp32 else 2
        if weight == 256:
            return 64, 64, 8, 1 if fp32 else 2
        # float32 at head dim 256: 64 x 32 tiles still spill 20 bytes on sm_90.
        return 64, 16, 8, 1
    # The backward keeps q, dO and dQ (or k, v, dK and dV) live: narrower key tiles and one stage
    # as rows get wider. float32 at head dim 256 cannot keep 64-row tiles (wgmma's minimum) in
    # registers and shared memory at once; it runs 32 x 16 tiles on mma.sync (HMMA) instead.
    if weight <= 64 or (weight == 128 and not fp32):
        return 64, 64, 4 if weight < 64 else 8, 2
    if weight == 128:
        return 64, 32, 4, 1
    if weight == 256:
        return 64, 16, 4, 1
    return 32, 16, 4, 1


def dot_precision(dtype: str, target: str) -> str:
    """``input_precision`` of the kernels' matrix products.

    float32 inputs run on tensor cores as TF32 on a GPU (IEEE float32 falls back to FMA loops that
    spill registers; three-pass TF32 spills too); the interpreter computes exactly anyway.
    """
    return "ieee" if dtype == "float32" and target == "interpret" else "tf32"


def launch(
    head_dim: int,
    target: str,
    kind: str,
    dtype: str = "float16",
    run_time: bool = False,
    tables: bool = False,
    shape: tuple[int, int] | None = None,
    reordered: bool = False,
) -> Launch:
    """The launch table's row for one kernel.

    Args:
        head_dim: the (unpadded) head dimension.
        target: ``"sm_80"``, ``"sm_90"`` or ``"interpret"``.
        kind: ``"forward"`` or ``"backward"``.
        dtype: the input dtype name (float32 tiles take twice the shared memory per stage).
        run_time: the kernels walk run-time lists with a ``route`` element rule.
        tables: the score reads float inputs, whose gradients the backward adds atomically.
        shape: the tiles of the plan the kernel is built for, when known: a part's own shape is kept
            where it is narrower than the row (:func:`fit_tiles`), and forward tiles of fewer than 64 rows
            take at most 4 warps (16-row float32 tiles on 8 warps spill on sm_90 at head dims 96 and 256;
            the backward keeps its warps: a 16-row dK/dV kernel on 4 warps nears 255 registers).
        reordered: the plan's tokens are in an order of their own (``QORD``/``KORD`` gathers).

    Returns:
        The :class:`Launch`.
    """
    precision = dot_precision(dtype, target)
    if target == "interpret":
        return Launch(None, 4, 1, precision)
    bm, bn, warps, stages = _gpu(head_dim, kind, dtype)
    if reordered and kind == "backward" and dtype != "float32" and int(target[3:]) < 90:
        # Gathered rows keep a 64-bit address per element live for q, dO, lse and delta: the reordered dK/dV
        # kernel spilled 32-64 bytes on sm_80 at head dims 64-128 with two stages (one builds clean), and the
        # dQ kernel at head dim 256 spilled 72 bytes with 64-row tiles (32 rows build clean). sm_90 builds
        # them clean with the identity rows (checked over float16/bfloat16 x head dims 16-256).
        weight = _weight(head_dim, dtype)
        if weight >= 64:
            stages = 1
        if weight == 256:
            bm = 32
    if run_time:
        # The route element rule keeps 2**r corner predicates and the chosen-table loads live per
        # element: with `random` beside `route`, 64 x 64 tiles spill on sm_80 (tests/unit/test_aot.py).
        # Half as many keys per tile and 8 warps build clean; wide backward rows need one stage.
        bn, warps = max(16, bn // 2), 8
        if kind == "backward" and _weight(head_dim, dtype) >= 128:
            stages = 1
    if tables and kind == "backward" and _weight(head_dim, dtype) >= 128:
        # The table gradient's addresses and partial derivative are live per element beside dS: a 2-D
        # relative table with a softcap at bf16 head dim 128 spills 32 bytes on sm_90 with 64 x 32 tiles.
        bn = max(16, bn // 2)
    if shape is not None:
        bm, bn = fit_tiles((bm, bn), shape)
        if bm < 64 and kind == "forward":
            warps = min(warps, 4)
    return Launch((bm, bn), warps, stages, precision)


def ragged_launch(head_dim: int, target: str, kind: str, dtype: str, rows: int) -> Launch:
    """The row of the ragged kernels (:mod:`patterndsl.codegen.ragged`) with ``rows``-row query blocks.

    ``tiles`` are the plan family's tiles (plan rows, key tile ``BN``); ``rows`` is 16 for decoding calls.
    The forward takes the dense forward's row for prefill blocks; 16-row decoding blocks take 32-key tiles,
    4 warps and two stages (one for rows of 512 bytes and more): the dense rows spill there with per-key page
    loads, and a decoding row has few keys per tile to share anyway. The backward keeps q, dO, dQ and a key
    tile's K, V, dK, dV live and adds dK/dV atomically: narrow key tiles and one stage build without spills
    on sm_80 and sm_90 (tests/unit/test_aot_ragged.py).
    """
    precision = dot_precision(dtype, target)
    if target == "interpret":
        return Launch(None, 4, 1, precision)
    if kind == "forward":
        bm, bn, warps, stages = _gpu(head_dim, kind, dtype)
        if rows < bm:
            bn, warps, stages = 32, 4, 2 if _weight(head_dim, dtype) < 256 else 1
        return Launch((bm, bn), warps, stages, precision)
    bn = 32 if _weight(head_dim, dtype) <= 64 else 16
    return Launch((64, bn), 4 if rows < 64 else 8, 1, precision)


def fit_tiles(tiles: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int]:
    """The tiles a part planned in ``shape`` runs with under a launch row's ``tiles``: each side the smaller.

    A part's own shape (:mod:`patterndsl.analysis.parts`: thin 16-row or 16-key tiles where its tiles lie
    in one or two tile rows or columns, ``random``'s block) is never wider than the plan it came from, so
    on a side where it is narrower than the row it keeps its width (``tl.dot`` takes sides of 16 and more);
    a side wider than the row's takes the row's, which builds without spills. Narrower tiles stay within
    the row's shared memory; :func:`launch` with ``shape`` gives forward tiles of fewer than 64 rows at
    most 4 warps, and every thin shape of the matrix builds without spills on sm_80 and sm_90
    (``tests/unit/test_part_kernels.py``). 16-row tiles run on ``mma.sync`` on sm_90 too (``wgmma``
    needs 64 rows per warpgroup).

    Args:
        tiles: the launch row's ``(BM, BN)``.
        shape: the part's ``(BM, BN)``.

    Returns:
        ``(min(BM), min(BN))``.
    """
    return min(tiles[0], shape[0]), min(tiles[1], shape[1])


def launch_config(
    head_dim: int, target: str, kind: str, dtype: str = "float16", run_time: bool = False, tables: bool = False
) -> tuple[int, int]:
    """``(num_warps, num_stages)`` of :func:`launch`."""
    row = launch(head_dim, target, kind, dtype, run_time, tables)
    return row.num_warps, row.num_stages


def launch_tiles(
    head_dim: int,
    target: str,
    kind: str,
    dtype: str = "float16",
    run_time: bool = False,
    tables: bool = False,
    reordered: bool = False,
) -> tuple[int, int] | None:
    """The plan tiles ``(BM, BN)`` of :func:`launch`, or None for the interpreter."""
    return launch(head_dim, target, kind, dtype, run_time, tables, reordered=reordered).tiles
