"""Runtime stage: checks on the tensors and options given to ``attention``, the op and the backends.

Comes in: ``q``, ``k``, ``v``, ``scale`` and ``backend`` exactly as the user
passed them. Goes out: the resolved sizes and options (:class:`Inputs`) or an
:class:`~patterndsl.errors.InputError` / :class:`~patterndsl.errors.BackendError`
that says what was wrong, before any kernel or executor runs. The tensor checks
themselves are :mod:`patterndsl.tensors`, shared with ``Pattern.mask``; this module
adds what only the runtime knows: backends, their dtypes, the scale and the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from patterndsl import config, tensors
from patterndsl.errors import BackendError, InputError, PatternError
from patterndsl.tensors import Sizes

BACKENDS = ("auto", "triton", "cpu")
#: dtypes the CPU executor accepts (it accumulates in float32, or float64 for float64 inputs).
CPU_DTYPES = tensors.FLOAT_DTYPES
#: dtypes the generated Triton kernels accept.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Inputs(Sizes):
    """Sizes and options of one validated call.

    Attributes:
        batch, heads, kv_heads, q_len, kv_len, head_dim: see :class:`~patterndsl.tensors.Sizes`.
        scale: the softmax scale (``D ** -0.5`` unless given).
        backend: ``"cpu"`` or ``"triton"`` (``"auto"`` resolved by device).
    """

    scale: float
    backend: str


def resolve_backend(backend, device: torch.device) -> str:
    """Turn the ``backend=`` keyword into ``"cpu"`` or ``"triton"`` for tensors on ``device``.

    ``"cpu"`` with CUDA tensors is an error rather than a silent copy to the host:
    moving activations off the GPU behind the user's back would be a hidden
    performance cliff, and the user can call ``.cpu()`` if that is what they want.

    Raises:
        PatternError: an unknown backend name.
        BackendError: ``"triton"`` on CPU tensors without ``TRITON_INTERPRET=1``, ``"cpu"`` on
            CUDA tensors, or a device neither backend serves.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise PatternError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"tensors on device {device.type!r} are not supported; use CPU or CUDA tensors")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise BackendError(
            f"backend='cpu' needs CPU tensors but got {device.type} tensors; move them with .cpu() "
            "or use backend='auto'"
        )
    if backend == "triton" and device.type == "cpu" and not config.triton_interpret():
        raise BackendError(
            "backend='triton' on CPU tensors runs the generated kernels under the Triton interpreter, "
            "which needs TRITON_INTERPRET=1 in the environment; use backend='cpu' for the fast CPU path"
        )
    return backend


def check_inputs(q, k, v, scale=None, backend="auto") -> Inputs:
    """Validate the tensors and options of one ``attention`` call.

    Args:
        q: ``[batch, heads, Lq, head_dim]``.
        k: ``[batch, kv_heads, Lk, head_dim]``, ``kv_heads`` dividing ``heads``.
        v: ``[batch, kv_heads, Lk, v_dim]``; ``v_dim`` may differ from ``head_dim`` (as in SDPA).
        scale: None or a finite number.
        backend: ``"auto"``, ``"triton"`` or ``"cpu"``.

    Returns:
        The resolved :class:`Inputs`.

    Raises:
        InputError: wrong type, rank, shape, dtype, device or head count.
        PatternError / BackendError: see :func:`resolve_backend`.
    """
    named = {"q": q, "k": k, "v": v}
    tensors.check_kinds(named)
    backend = resolve_backend(backend, q.device)
    tensors.check_dtypes(named, dtypes_of(backend), f"the {backend} backend")
    sizes = tensors.check_shapes(q, k, v)
    d = sizes.head_dim
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"scale must be a finite number or None, got {scale!r}")
    # vars(), not dataclasses.asdict: asdict deep-copies every field, a tenth of a decoding step's call
    return Inputs(**vars(sizes), scale=float(scale), backend=backend)


def dtypes_of(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes ``backend`` (``"cpu"`` or ``"triton"``) accepts."""
    return CPU_DTYPES if backend == "cpu" else TRITON_DTYPES


def check_call(q, k, v, backend: str, plan=None) -> Sizes:
    """Validate the tensors handed to the op or a backend entry point (below ``attention``'s padding).

    Backends run one head size (:func:`patterndsl.runtime.attention` pads ``v`` or ``q``/``k``
    to the wider one first) and, when given, a plan built for the tensors' sizes.

    Args:
        q, k, v: the tensors, ``[B, H, Lq, D]`` and ``[B, Hkv, Lk, D]``.
        backend: ``"cpu"`` or ``"triton"``, for the dtypes and the messages.
        plan: the block plan (``q_len``, ``kv_len``, ``heads``) to check the sizes against, or None.

    Returns:
        The :class:`~patterndsl.tensors.Sizes`.

    Raises:
        InputError: as :func:`check_inputs`, plus a ``v`` head size that differs from ``q``'s
            and sizes the plan was not built for.
    """
    sizes = tensors.check(q, k, v, dtypes=dtypes_of(backend), who=f"the {backend} backend")
    if v.shape[3] != sizes.head_dim:
        raise InputError(f"head_dim differs: q has {sizes.head_dim}, v has {v.shape[3]} (backends run one head size)")
    if plan is not None:
        tensors.check_sizes(sizes, plan.heads, plan.q_len, plan.kv_len, "the plan")
    return sizes
