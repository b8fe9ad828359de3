"""Runtime stage: checks on the tensors and options given to ``attention``.

Comes in: ``q``, ``k``, ``v``, ``scale`` and ``backend`` exactly as the user
passed them. Goes out: the resolved sizes and options (:class:`Inputs`) or an
:class:`~patterndsl.errors.InputError` / :class:`~patterndsl.errors.BackendError`
that says what was wrong, before any kernel or executor runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from patterndsl import config
from patterndsl.errors import BackendError, InputError, PatternError

BACKENDS = ("auto", "triton", "cpu")
#: dtypes the CPU executor accepts (it accumulates in float32, or float64 for float64 inputs).
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: dtypes the generated Triton kernels accept.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Inputs:
    """Sizes and options of one validated call.

    Attributes:
        batch, heads, kv_heads: ``B``, query heads ``H``, key/value heads ``Hkv`` (divides ``H``).
        q_len, kv_len, head_dim: ``Lq``, ``Lk``, ``D``.
        scale: the softmax scale (``D ** -0.5`` unless given).
        backend: ``"cpu"`` or ``"triton"`` (``"auto"`` resolved by device).
    """

    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float
    backend: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must have 4 dimensions [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    backend = resolve_backend(backend, q.device)
    allowed = CPU_DTYPES if backend == "cpu" else TRITON_DTYPES
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in allowed:
            names = ", ".join(_dtype_name(d) for d in allowed)
            raise InputError(f"{name} has dtype {_dtype_name(t.dtype)}; the {backend} backend supports {names}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(
            f"q, k and v must have one dtype, got {_dtype_name(q.dtype)}, {_dtype_name(k.dtype)} "
            f"and {_dtype_name(v.dtype)}"
        )
    b, h, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise InputError(f"batch sizes differ: q has {b}, k has {k.shape[0]}, v has {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise InputError(f"k and v must have the same number of heads, got {k.shape[1]} and {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise InputError(f"k and v must have the same sequence length, got {k.shape[2]} and {v.shape[2]}")
    if k.shape[3] != d:
        raise InputError(f"head_dim differs: q has {d}, k has {k.shape[3]}")
    if v.shape[3] == 0:
        raise InputError(f"v must have head_dim >= 1, got shape {tuple(v.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or h % hkv != 0:
        raise InputError(f"k and v have {hkv} heads, which does not divide the {h} query heads")
    if h == 0 or d == 0:
        raise InputError(f"q must have at least one head and head_dim >= 1, got shape {tuple(q.shape)}")
    if scale is None:
        scale = d**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"scale must be a finite number or None, got {scale!r}")
    return Inputs(b, h, hkv, lq, k.shape[2], d, float(scale), backend)
