"""Runtime stage, CPU executor: the native (C++) flash-attention kernel that runs a schedule's tiles.

Comes in: one unit's tensors in tiles (``[B, h, L_pad, D]`` float32, from
:func:`~patterndsl.runtime.cpu.views.to_tiles`), the unit's
:class:`~patterndsl.runtime.cpu.schedule.Schedule` and the plan. Goes out: the unit's output and
log-sum-exp in tiles (forward), or its ``dQ`` and in-place ``dK``/``dV`` (backward), exactly what
the segment loops of :mod:`~patterndsl.runtime.cpu.forward` and :mod:`~patterndsl.runtime.cpu.backward`
produce. The schedule's segments become one list of key tiles per query tile (:mod:`.program`:
full tiles, and partial ones with the segment's mask as bits), so a query tile's rows run one
online softmax over all of them (merge segments included) without copying a gathered key. The
backward also takes a whole call's tensors as they are, with the plan's orders as row maps
(:func:`backward`'s direct layout): no tiled copies in, none back.

Dispatch is explicit: :func:`supports` says whether a call may run here (the library built,
``CpuOptions.native`` on and ``kernel="fused"``: ``"math"`` asks for the torch math steps;
float32 compute, a head size that is a multiple of 16, query tiles of a multiple of 16 rows, no
score modifier, finite inputs: the selecting rerun stays on the torch path). Everything else
runs as before.
"""

from __future__ import annotations

import ctypes

import torch

from patterndsl.analysis.plan import BlockPlan
from patterndsl.runtime.cpu import dense, memory
from patterndsl.runtime.cpu.native import build
from patterndsl.runtime.cpu.native.program import Program, program
from patterndsl.runtime.cpu.tuning import CpuOptions

__all__ = [
    "Program",
    "available",
    "backward",
    "backward_pairs",
    "forward",
    "forward_rows",
    "program",
    "rows_for",
    "supports",
    "takes_dense",
]

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_FORWARD_ARGS = [_P] * 5 + [_I64] * 6 + [_P] * 4 + [_I64, _F32, _I64, _INT, _P]
_BACKWARD_ARGS = [_P] * 14 + [_I64] * 8 + [_P] * 4 + [_I64, _I64, _F32, _I64, _INT, _P]


def _library():
    lib = build.library()
    if lib is not None and lib.pdsl_forward.argtypes is None:
        lib.pdsl_forward.argtypes, lib.pdsl_forward.restype = _FORWARD_ARGS, _INT
        lib.pdsl_backward.argtypes, lib.pdsl_backward.restype = _BACKWARD_ARGS, _INT
        lib.pdsl_backward_pairs.argtypes, lib.pdsl_backward_pairs.restype = [], _I64
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (building it on the first call)."""
    return _library() is not None


def rows_for(prog: Program) -> int:
    """Query rows of one register block of the backward kernel for ``prog``.

    The backward runs each register block's 16-row groups over only the stretches of keys they see
    (pieces), so a band's or neighborhood's edge tiles cost 16-row steps whatever the block, and
    64-row blocks, with fewer operand loads per FMA, win everywhere they fit (one thread, CPU time of
    the native call: BigBird 4K 78 -> 76 ms, sliding window 256 at 4K 43.5 -> 42 ms and at 16K
    195 -> 187 ms; the 2-D neighborhood and the dilated window even; mostly full tiles took 64 already).
    """
    bm = prog.block[0]
    return 64 if bm % 64 == 0 else (32 if bm % 32 == 0 else 16)


def forward_rows(prog: Program) -> int:
    """Query rows of one register block of the forward kernel for ``prog``.

    The forward runs each register block's 16-row groups over only the keys they see (a band's
    edge tiles cost 16-row, not block-row, steps), so 64-row blocks, with fewer operand loads
    per FMA, win on bands too (sliding window 256, one thread: ~3% at 16K; BigBird 4K ~7%).
    """
    bm = prog.block[0]
    return 64 if bm % 64 == 0 else (32 if bm % 32 == 0 else 16)


def supports(plan: BlockPlan, q: torch.Tensor, v: torch.Tensor, opts: CpuOptions) -> bool:
    """Whether the native kernel runs this call's schedules (see the module docstring).

    Args:
        plan: the call's plan; q, v: the call's queries and values; opts: the executor options.

    Returns:
        True when the call may run here; the caller still runs the selecting torch path when a
        result is not finite.
    """
    if (
        not opts.native
        or opts.kernel != "fused"
        or q.dtype == torch.float64
        or plan.pattern is None
        or plan.pattern.score is not None
    ):
        return False
    d = q.shape[-1]
    if d % 16 or v.shape[-1] != d or plan.block[0] % 16 or q.numel() == 0:
        return False
    return available()


def takes_dense(plan: BlockPlan, q: torch.Tensor, v: torch.Tensor, opts: CpuOptions) -> bool:
    """Whether a plain ``causal`` call (square) runs here rather than as torch's fused kernel on the whole
    tensors (:mod:`~patterndsl.runtime.cpu.dense`): ``CpuOptions.native_dense`` and :func:`supports`."""
    if not opts.native_dense or plan.q_len != plan.kv_len or dense.kind_of(plan) is not True:
        return False
    return supports(plan, q, v, opts)


def _ptr(x: torch.Tensor) -> int:
    return x.data_ptr()


def forward(prog: Program, qp, kp, vp, op, lp, scale: float, rows: int | None = None) -> bool:
    """One unit's forward: ``op [B, h, Lq_pad, D]`` and ``lp [B, h, Lq_pad]`` written for every query tile.

    A row whose output is not finite (a NaN or Inf in a key or value it reads, or in a blocked
    pair's value: ``0 * NaN``) gets a NaN in ``lp``: a NaN-free ``lp`` vouches for a finite ``op``.

    Args:
        prog: the unit's :class:`Program`; qp, kp, vp: its tensors in tiles (float32, contiguous);
        op, lp: float32 contiguous outputs; scale: the softmax scale; rows: query rows of a
        register block (16, 32 or 64 dividing ``BM``; default :func:`forward_rows`).

    Returns:
        Whether every row of ``lp`` (padding rows too) is below ``+inf`` and not NaN, checked by the
        kernel as it writes them: then every row of ``op`` is finite, and the caller needs no pass
        over either.
    """
    b, h, lq, d = qp.shape
    bm, bn = prog.block
    bad = ctypes.c_int(0)
    rc = _library().pdsl_forward(
        _ptr(qp), _ptr(kp), _ptr(vp), _ptr(op), _ptr(lp), b * h, lq, kp.shape[2], d, bm, bn,
        _ptr(prog.row_ptr), _ptr(prog.ent_k), _ptr(prog.ent_mask), _ptr(prog.masks), prog.n_q_tiles,
        scale, rows or forward_rows(prog), torch.get_num_threads(), ctypes.byref(bad),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"native forward refused its arguments (code {rc})")
    return bad.value == 0


def backward_pairs() -> int:
    """Query x key pairs the native backward has computed in this process (every call, batch element and
    head): each register block's 16-row groups run over only the stretches of keys they see, so a band's
    or neighborhood's edge tile costs about its allowed pairs (tests and benchmarks compare the two)."""
    lib = _library()
    return 0 if lib is None else int(lib.pdsl_backward_pairs())


def backward(prog: Program, t: dict, scale: float) -> bool:
    """One unit's backward: ``t["dq"]``, ``t["dk"]``, ``t["dv"]`` (new buffers, written whole).

    Two layouts of ``t``. Tiled (what :func:`patterndsl.runtime.cpu.backward._backward` makes):
    ``q``, ``k``, ``v``, ``do`` in tiles, ``lse2`` (+inf on rows with no allowed key) and ``delta``;
    the gradients come in tiles. Direct: ``q``, ``k``, ``v``, ``do``, ``out`` as the call has them
    (``[B, H, L, D]`` float32 contiguous), ``lse`` and ``dlse`` (or None) ``[B, H, Lq]``, and
    ``q_rows``/``k_rows``: int32 source row of each plan position (-1: padding), or None for the
    identity; the kernel gathers the tiles' rows, computes ``delta`` and ``lse2`` itself and writes
    the gradients in the source's order and shapes. With fewer (batch, head) pairs than twice the
    threads, query tiles are dealt to several items, each with its own key-gradient buffers, summed
    here: no atomics, no lost updates.

    Returns:
        Whether every gradient is finite (checked by the kernel as it writes them).
    """
    b, h, sq, d = t["q"].shape
    sk = t["k"].shape[2]
    bm, bn = prog.block
    direct = "out" in t
    q_rows, k_rows = (t.get("q_rows"), t.get("k_rows")) if direct else (None, None)
    lq = prog.n_q_tiles * bm
    lk = sk if k_rows is None else k_rows.numel()
    threads = torch.get_num_threads()
    parts = 1 if b * h >= 2 * threads else min(prog.n_q_tiles, -(-2 * threads // (b * h)))
    parts = max(parts, 1)
    # The kernel writes every row of these (zeroing each key tile where it first reaches it).
    t["dq"] = memory.empty((b, h, sq, d), torch.float32)
    dk = memory.empty((parts, b, h, sk, d), torch.float32)
    dv = memory.empty((parts, b, h, sk, d), torch.float32)
    names = ("q", "k", "v", "do") + (("out", "lse", "dlse") if direct else ("lse2", "delta"))
    x = {name: None if t.get(name) is None else t[name].contiguous() for name in names}
    ptr = {name: None if value is None else _ptr(value) for name, value in x.items()}
    bad = ctypes.c_int(0)
    rc = _library().pdsl_backward(
        ptr["q"], ptr["k"], ptr["v"], ptr["do"], ptr.get("lse2"), ptr.get("delta"), ptr.get("out"),
        ptr.get("lse"), ptr.get("dlse"), None if q_rows is None else _ptr(q_rows),
        None if k_rows is None else _ptr(k_rows), _ptr(t["dq"]), _ptr(dk), _ptr(dv), b * h, lq, lk, sq, sk, d,
        bm, bn, _ptr(prog.row_ptr), _ptr(prog.ent_k), _ptr(prog.ent_mask), _ptr(prog.masks), prog.n_q_tiles,
        parts, scale, rows_for(prog), threads, ctypes.byref(bad),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"native backward refused its arguments (code {rc})")
    t["dk"], t["dv"] = (dk[0], dv[0]) if parts == 1 else (dk.sum(0), dv.sum(0))
    return bad.value == 0
