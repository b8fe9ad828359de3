"""Stage 5 of the pipeline (codegen): a block plan lowered to Triton source text.

Comes in: a :class:`patterndsl.analysis.plan.BlockPlan` plus the launch-time
facts that are baked into the source (head dim, dtype, key/value heads,
num_warps/stages, target). Goes out: a :class:`KernelSpec` (everything the
source depends on, hashed into the cache key) and, from it, deterministic
Triton source for the forward pass (one kernel per head group) or the
backward pass (a ``delta`` preprocess kernel, then per head group a dQ
kernel over key tiles and a dK/dV kernel over the transposed plan).

Each head group's key-tile loop is specialised: closed-form bounds from the
plan's :class:`~patterndsl.analysis.plan.RunForm` when it has one, CSR index
lists otherwise; full tiles and partial tiles run in separate loops.
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from patterndsl import ir
from patterndsl.codegen import bounds
from patterndsl.codegen.predicate import FLOOR_HELPERS, AuxTables, render_predicate
from patterndsl.errors import BackendError, PatternError

TEMPLATES = Path(__file__).parent / "templates"
KINDS = ("forward", "backward")
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class GroupSpec:
    """What one head group contributes to the source.

    Attributes:
        heads: query heads of the group.
        node: the group's pattern node.
        forms: closed-form bound code (``lo``, ``hi``, ``full_lo``, ``full_hi``) or None for lists.
    """

    heads: tuple[int, ...]
    node: ir.Node
    forms: tuple[tuple[str, str], ...] | None


@dataclass(frozen=True)
class KernelSpec:
    """Everything the generated source depends on; its :attr:`key` names the cache entry."""

    kind: str
    pattern_name: str
    pattern_params: str
    layout: ir.Layout | None
    groups: tuple[GroupSpec, ...]
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    q_reordered: bool
    k_reordered: bool
    order: str
    num_warps: int
    num_stages: int
    target: str

    @property
    def padded_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    def canonical(self) -> str:
        """A stable text of every field (nodes printed canonically, spans excluded)."""
        groups = [
            f"heads={g.heads} node={g.node} forms={g.forms}" for g in self.groups
        ]  # printed nodes re-parse to equal IR
        layout = None if self.layout is None else self.layout.axes
        fields = [
            self.kind,
            self.pattern_name,
            self.pattern_params,
            repr(layout),
            *groups,
            self.q_len,
            self.kv_len,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.block_m,
            self.block_n,
            self.q_reordered,
            self.k_reordered,
            self.order,
            self.num_warps,
            self.num_stages,
            self.target,
        ]
        return "\n".join(str(f) for f in fields)

    @property
    def key(self) -> str:
        """sha256 over the package version, the codegen sources and templates, and :meth:`canonical`."""
        from patterndsl import __version__

        text = f"patterndsl {__version__}\n{codegen_hash()}\n{self.canonical()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


@cache
def codegen_hash() -> str:
    """Hash of every file that shapes generated source: templates, the codegen modules and the primitives."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted([*TEMPLATES.glob("*.tmpl"), *here.glob("*.py"), *(here.parent / "primitives").glob("*.py")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _template(name: str) -> string.Template:
    return string.Template((TEMPLATES / name).read_text())


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels compute with: the next power of two, at least 16 (``tl.arange``/``tl.dot``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _launch(head_dim: int, kind: str, dtype: str) -> tuple[int, int, int, int]:
    # (BM, BN, num_warps, num_stages) for a GPU target, chosen from ahead-of-time builds (ptxas -v and
    # Triton's shared-memory size, tests/unit/test_aot.py) so every dtype x head dim x pass builds for
    # sm_80 and sm_90 with zero spills and within sm_80's 163 KB of shared memory. "weight" is the
    # bytes of one padded row / 2: it is what registers and shared memory per tile scale with.
    padded = padded_head_dim(head_dim)
    fp32 = dtype == "float32"
    weight = padded * (2 if fp32 else 1)
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


def launch_config(head_dim: int, target: str, kind: str, dtype: str = "float16") -> tuple[int, int]:
    """Default ``(num_warps, num_stages)`` for a head dim, target, pass and dtype.

    Args:
        head_dim: the (unpadded) head dimension.
        target: ``"sm_80"``, ``"sm_90"`` or ``"interpret"``.
        kind: ``"forward"`` or ``"backward"``.
        dtype: the input dtype name (float32 tiles take twice the shared memory per stage).

    Returns:
        ``(num_warps, num_stages)``; they go with the tiles of :func:`launch_tiles`.
    """
    if target == "interpret":
        return 4, 1
    return _launch(head_dim, kind, dtype)[2:]


def launch_tiles(head_dim: int, target: str, kind: str, dtype: str = "float16") -> tuple[int, int] | None:
    """The plan tiles ``(BM, BN)`` the kernels of a GPU target are built with.

    Args:
        head_dim, target, kind, dtype: as :func:`launch_config`.

    Returns:
        ``(BM, BN)``, or None for the interpreter (any plan's tiles run there).
    """
    if target == "interpret":
        return None
    return _launch(head_dim, kind, dtype)[:2]


def _check_static(plan) -> None:
    for group in plan.groups:
        if ir.is_dynamic(group.node):
            raise PatternError("patterns with route(...) cannot run on the Triton backend yet (selection at run time)")
        if bool((group.tiles.state == 3).any()):
            raise PatternError("the plan has tiles decided at run time; the Triton backend cannot run it yet")


def make_spec(
    plan,
    kind: str = "forward",
    head_dim: int = 64,
    dtype: torch.dtype = torch.float16,
    kv_heads: int | None = None,
    target: str = "sm_90",
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> KernelSpec:
    """Collect everything the source depends on from a plan and launch facts.

    Args:
        plan: the :class:`~patterndsl.analysis.plan.BlockPlan`.
        kind: ``"forward"`` or ``"backward"``.
        head_dim: head dimension (16..256; padded to a power of two inside).
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``.
        kv_heads: key/value heads (default: the plan's heads); must divide them.
        target: ``"sm_80"``, ``"sm_90"`` or ``"interpret"``.
        num_warps, num_stages: override :func:`launch_config`.

    Returns:
        A :class:`KernelSpec`.
    """
    if kind not in KINDS:
        raise BackendError(f"kernel kind must be one of {KINDS}, got {kind!r}")
    if dtype not in DTYPES:
        raise BackendError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    if target != "interpret" and not re.fullmatch(r"sm_\d+", target):
        raise BackendError(f"target must be 'sm_XY' (e.g. sm_80, sm_90) or 'interpret', got {target!r}")
    if not 1 <= head_dim <= 256:
        raise BackendError(f"head_dim must be between 1 and 256, got {head_dim}")
    kv_heads = plan.heads if kv_heads is None else kv_heads
    if kv_heads < 1 or plan.heads % kv_heads:
        raise BackendError(f"key/value heads ({kv_heads}) must divide the query heads ({plan.heads})")
    _check_static(plan)
    warps, stages = launch_config(head_dim, target, kind, DTYPES[dtype])
    pir = plan.pattern
    groups = []
    for group in plan.groups:
        forms = bounds.render_form(group.forms)
        groups.append(GroupSpec(tuple(group.heads), group.node, None if forms is None else tuple(forms.items())))
    n = torch.arange(plan.q_len)
    return KernelSpec(
        kind=kind,
        pattern_name=getattr(pir, "name", "<mask>"),
        pattern_params=", ".join(f"{k}={v!r}" for k, v in getattr(pir, "params", ())),
        layout=getattr(pir, "layout", None),
        groups=tuple(groups),
        q_len=plan.q_len,
        kv_len=plan.kv_len,
        heads=plan.heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=DTYPES[dtype],
        block_m=plan.block_m,
        block_n=plan.block_n,
        q_reordered=not torch.equal(plan.q_order, n),
        k_reordered=not torch.equal(plan.kv_order, torch.arange(plan.kv_len)),
        order=plan.order,
        num_warps=num_warps or warps,
        num_stages=num_stages or stages,
        target=target,
    )


def aux_tables(spec: KernelSpec) -> tuple[list[str], torch.Tensor]:
    """Render every group's predicate; returns the function texts and the AUX tensor they read."""
    aux = AuxTables()
    texts = [
        render_predicate(f"_allowed_g{g}", group.node, spec.layout, spec.q_len, spec.kv_len, aux, spec.heads)
        for g, group in enumerate(spec.groups)
    ]
    return texts, aux.tensor()


_FORM_LOOPS = """\
    # Closed-form key-tile range of query tile m (no index tensor is read).
    lo = $lo
    hi = $hi
    full_lo = tl.maximum($full_lo, lo)
    full_hi = tl.minimum(tl.minimum($full_hi, hi), NKB_EVEN)
    no_full = full_lo >= full_hi
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    for n in range(lo, full_lo):
        $call_partial
    for n in range(full_lo, full_hi):
        $call_full
    for n in range(full_hi, hi):
        $call_partial
"""

_LIST_LOOPS = """\
    # Key tiles of query tile m from the CSR lists: partial ones first, then full ones.
    start = tl.load(ROW_PTR + m)
    split = tl.load(ROW_SPLIT + m)
    end = tl.load(ROW_PTR + m + 1)
    for idx in range(start, split):
        n = tl.load(ROW_COLS + idx)
        $call_partial
    for idx in range(split, end):
        n = tl.load(ROW_COLS + idx)
        $call_full
"""

_CALLS = {
    "forward": (
        "acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, KORD, AUX, n, rows, h,\n"
        "                          qk_scale, _allowed_g$g, $masked)"
    ),
    "backward": (
        "dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KORD, AUX, n, rows, h,\n"
        "              qk_scale, _allowed_g$g, $masked)"
    ),
}


def _as_tensor(code: str) -> str:
    # A bound without m is a Python int inside the kernel; range() and tl.where want tensors.
    return code if re.search(r"\bm\b", code) else f"tl.cast({code}, tl.int32)"


def _loops(spec: KernelSpec, g: int, group: GroupSpec) -> str:
    call = string.Template(_CALLS[spec.kind])
    # Continuation lines of a call sit under the loop body (8 spaces).
    partial = call.substitute(g=g, masked="True").replace("\n", "\n        ")
    full = call.substitute(g=g, masked="False").replace("\n", "\n        ")
    if group.forms is None:
        text = string.Template(_LIST_LOOPS).substitute(call_partial=partial, call_full=full)
    else:
        forms = {name: _as_tensor(code) for name, code in group.forms}
        text = string.Template(_FORM_LOOPS).substitute(call_partial=partial, call_full=full, **forms)
    return text.rstrip("\n")


def _dot_precision(spec: KernelSpec) -> str:
    # float32 inputs run on tensor cores as TF32 on a GPU (IEEE float32 falls back to FMA loops that
    # spill registers; three-pass TF32 spills too); the interpreter computes exactly anyway.
    if spec.dtype != "float32":
        return "tf32"
    return "ieee" if spec.target == "interpret" else "tf32"


def _precision_note(spec: KernelSpec) -> str:
    if spec.dtype != "float32" or _dot_precision(spec) != "tf32":
        return ""
    return (
        "# precision:  float32 inputs: the matrix products (QK^T, PV and the backward's) run as TF32 on\n"
        "#             tensor cores (10-bit mantissa, relative error ~1e-3); softmax and accumulation\n"
        "#             stay float32. The CPU backend and the interpreter compute in exact float32.\n"
    )


def render(spec: KernelSpec) -> str:
    """The Triton source text of a spec (deterministic: no ids, no timestamps).

    Args:
        spec: from :func:`make_spec`.

    Returns:
        Python source defining the ``@triton.jit`` kernels named in :func:`kernel_names`.
    """
    predicates, _ = aux_tables(spec)
    group_template = _template(f"{spec.kind}_group.py.tmpl")
    kernels = []
    group_lines = []
    for g, group in enumerate(spec.groups):
        loop_kind = "closed-form bounds" if group.forms is not None else "CSR tile lists"
        kernels.append(
            group_template.substitute(g=g, n_heads=len(group.heads), loops=_loops(spec, g, group), loop_kind=loop_kind)
        )
        group_lines.append(f"#   g{g}: heads {list(group.heads)}, {loop_kind}: {group.node}")
        if group.forms is not None:
            group_lines.append("#       " + ", ".join(f"{name} = {code}" for name, code in group.forms))
    common = _template("common.py.tmpl").substitute(
        kind=spec.kind,
        pattern_name=spec.pattern_name,
        pattern_params=spec.pattern_params,
        cache_key=spec.key,
        LQ=spec.q_len,
        LK=spec.kv_len,
        NH=spec.heads,
        NHK=spec.kv_heads,
        GQA=spec.heads // spec.kv_heads,
        D=spec.head_dim,
        DP=spec.padded_dim,
        EVEN_D=spec.head_dim == spec.padded_dim,
        BM=spec.block_m,
        BN=spec.block_n,
        NKB_EVEN=spec.kv_len // spec.block_n,
        Q_REORDERED=spec.q_reordered,
        K_REORDERED=spec.k_reordered,
        DOT_PRECISION=_dot_precision(spec),
        precision_note=_precision_note(spec),
        dtype=spec.dtype,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        target=spec.target,
        order=spec.order,
        group_lines="\n".join(group_lines),
        floor_helpers=FLOOR_HELPERS,
        predicates="\n\n".join(predicates),
    )
    body = _template(f"{spec.kind}.py.tmpl").substitute(kernels="\n\n".join(kernels))
    return common.rstrip("\n") + "\n\n\n" + body.rstrip("\n") + "\n"


def kernel_names(spec: KernelSpec) -> list[str]:
    """Names of the kernels (launch entry points) a spec's source defines, in launch order."""
    if spec.kind == "forward":
        return [f"fwd_g{g}" for g in range(len(spec.groups))]
    names = ["bwd_preprocess"]
    for g in range(len(spec.groups)):
        names += [f"bwd_dq_g{g}", f"bwd_dkdv_g{g}"]
    return names
