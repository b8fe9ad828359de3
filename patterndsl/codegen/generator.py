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
lists otherwise; full tiles and partial tiles run in separate loops. A plan
whose pattern uses ``route(...)`` gets the same kernels walking run-time lists
(one per batch element and key/value head, made at every call) with an element
rule that reads the call's choice (:mod:`patterndsl.codegen.routes`).
"""

from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from patterndsl import ir
from patterndsl.codegen import bounds, inputs, key, routes
from patterndsl.codegen import score as score_code
from patterndsl.codegen.launch import dot_precision, launch, padded_head_dim
from patterndsl.codegen.predicate import FLOOR_HELPERS, AuxTables
from patterndsl.errors import BackendError

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
        routes: the ``route`` primitives in ``node`` (empty for a static group).
    """

    heads: tuple[int, ...]
    node: ir.Node
    forms: tuple[tuple[str, str], ...] | None
    routes: tuple[ir.Prim, ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """Everything the generated source depends on; its :attr:`key` names the cache entry.

    ``run_time_lists`` is True for a plan with ``route(...)`` or run-time inputs: every group's
    kernels walk the per-call lists of (batch element, key/value head) and read the chosen tables
    (:mod:`patterndsl.codegen.routes`) or the inputs (``inputs``, :mod:`patterndsl.codegen.inputs`)
    from ``RT``.
    """

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
    run_time_lists: bool = False
    #: The pattern's :class:`patterndsl.scores.Score` (None without a ``score`` statement).
    score: object = None
    inputs: tuple[ir.InputDecl, ...] = ()

    @property
    def padded_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    def canonical(self) -> str:
        """A stable text of every field (nodes printed canonically, spans excluded)."""
        groups = [
            f"heads={g.heads} node={g.node} forms={g.forms} routes={[str(r) for r in g.routes]}" for g in self.groups
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
            self.run_time_lists,
            score_code.describe(self.score),
        ]
        if self.inputs:  # (absent otherwise: the keys of patterns without inputs stay as they were)
            fields.append(repr([(d.name, d.kind, d.dims) for d in self.inputs]))
        return "\n".join(str(f) for f in fields)

    @property
    def key(self) -> str:
        """sha256 over :func:`patterndsl.codegen.key.sources_hash` and :meth:`canonical`, nothing else."""
        text = f"{key.sources_hash()}\n{self.canonical()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def route_list(self) -> tuple[ir.Prim, ...]:
        """Every group's routes, in group order (the order of their tables in ``RT``)."""
        return tuple(dict.fromkeys(r for g in self.groups for r in g.routes))

    def input_layout(self) -> inputs.InputLayout:
        """Where this spec's kernels find each batch element's inputs in ``RT``."""
        nodes = [g.node for g in self.groups]
        read = score_code.inputs_read(self.score)
        return inputs.layout(self.inputs, nodes, self.kv_len, self.heads, self.head_dim, read)

    def run_time_layout(self) -> routes.RunTimeLayout:
        """Where this spec's kernels find each route's tables in ``RT``."""
        return routes.layout(self.route_list, self.layout, self.q_len, self.kv_len)


def per_call(pir) -> bool:
    """Whether a pattern's kernels walk tile lists made at every call (``route(...)`` or run-time inputs)."""
    nodes = [rule.node for rule in pir.heads] + ([pir.default] if pir.default is not None else [])
    return bool(getattr(pir, "inputs", ())) or any(ir.is_dynamic(n) for n in nodes)


def template(name: str) -> string.Template:
    """One of the kernel templates under :data:`TEMPLATES` (shared with :mod:`patterndsl.codegen.ragged`)."""
    return string.Template((TEMPLATES / name).read_text())


def header_fields(spec) -> dict[str, object]:
    """The substitutions every kernel module's header and constants share.

    Args:
        spec: a :class:`KernelSpec` or a :class:`patterndsl.codegen.ragged.RaggedSpec` (the fields
            both have: kind, pattern, key, heads, head size, tiles, dtype and launch).

    Returns:
        ``string.Template`` keyword values by name.
    """
    return dict(
        kind=spec.kind,
        pattern_name=spec.pattern_name,
        pattern_params=spec.pattern_params,
        cache_key=spec.key,
        NH=spec.heads,
        NHK=spec.kv_heads,
        GQA=spec.heads // spec.kv_heads,
        D=spec.head_dim,
        DP=spec.padded_dim,
        EVEN_D=spec.head_dim == spec.padded_dim,
        BM=spec.block_m,
        BN=spec.block_n,
        DOT_PRECISION=dot_precision(spec.dtype, spec.target),
        dtype=spec.dtype,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        target=spec.target,
        floor_helpers=FLOOR_HELPERS,
    )


def pattern_header(pir) -> tuple[str, str]:
    """The pattern's name and ``k=v`` parameter text that a spec's header shows."""
    return getattr(pir, "name", "<mask>"), ", ".join(f"{k}={v!r}" for k, v in getattr(pir, "params", ()))


def _reordered(perm: torch.Tensor | None) -> bool:
    # An identity order is implicit (None): nothing of size L is built for it.
    return perm is not None and not torch.equal(perm, torch.arange(len(perm)))


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
        num_warps, num_stages: override the launch table (:func:`patterndsl.codegen.launch.launch`).

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
    pir = plan.pattern
    decls = tuple(getattr(pir, "inputs", ()))
    run_time = bool(decls) or any(ir.is_dynamic(group.node) for group in plan.groups)
    tables = score_code.has_tables(getattr(pir, "score", None))
    reordered = _reordered(plan.q_perm) or _reordered(plan.kv_perm)
    row = launch(head_dim, target, kind, DTYPES[dtype], run_time, tables, (plan.block_m, plan.block_n), reordered)
    groups = []
    for group in plan.groups:
        forms = None if run_time else bounds.render_form(group.forms)
        groups.append(
            GroupSpec(
                tuple(group.heads),
                group.node,
                None if forms is None else tuple(forms.items()),
                ir.routes(group.node),
            )
        )
    pattern_name, pattern_params = pattern_header(pir)
    return KernelSpec(
        kind=kind,
        pattern_name=pattern_name,
        pattern_params=pattern_params,
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
        q_reordered=_reordered(plan.q_perm),
        k_reordered=_reordered(plan.kv_perm),
        order=plan.order,
        num_warps=num_warps or row.num_warps,
        num_stages=num_stages or row.num_stages,
        target=target,
        run_time_lists=run_time,
        score=getattr(pir, "score", None),
        inputs=decls,
    )


def aux_tables(spec: KernelSpec) -> tuple[list[str], torch.Tensor]:
    """Render every group's element rule; returns the function texts and the AUX tensor they read."""
    aux = AuxTables()
    run_time = spec.run_time_layout()
    texts = []
    for g, group in enumerate(spec.groups):
        sizes = (spec.layout, spec.q_len, spec.kv_len, aux, spec.heads)
        if spec.inputs:
            texts.append(inputs.render_group(f"_allowed_g{g}", group.node, spec.input_layout(), *sizes))
        else:
            texts.append(routes.render_group(f"_allowed_g{g}", group.node, run_time, *sizes))
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
    # Key tiles of query tile m from the CSR lists$lists_note: partial ones first, then full ones.
    start = tl.load(ROW_PTR + $row)
    split = tl.load(ROW_SPLIT + $row)
    end = tl.load(ROW_PTR + $row + 1)
    for idx in range(start, split):
        n = tl.load(ROW_COLS + idx)
        $call_partial
    for idx in range(split, end):
        n = tl.load(ROW_COLS + idx)
        $call_full
"""

_CALLS = {
    "forward": (
        "acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, KORD, AUX, RT, lst, n,\n"
        "                          rows, h, qk_scale, _allowed_g$g, $masked)"
    ),
    "backward": (
        "dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, KORD, AUX, RT, DTAB, lst, n,\n"
        "              rows, h, qk_scale, _allowed_g$g, $masked)"
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
        row, note = _list_index(spec, "m", "NQT")
        text = string.Template(_LIST_LOOPS).substitute(call_partial=partial, call_full=full, row=row, lists_note=note)
    else:
        forms = {name: _as_tensor(code) for name, code in group.forms}
        text = string.Template(_FORM_LOOPS).substitute(call_partial=partial, call_full=full, **forms)
    return text.rstrip("\n")


def _list_index(spec: KernelSpec, tile: str, count: str) -> tuple[str, str]:
    # Static lists are shared by every batch element and head of a group; run-time lists are one CSR
    # list per (batch element, key/value head) lst, laid end to end.
    if spec.run_time_lists:
        return f"lst * {count} + {tile}", " (this call's list lst)"
    return tile, ""


def _precision_note(spec: KernelSpec) -> str:
    if spec.dtype != "float32" or dot_precision(spec.dtype, spec.target) != "tf32":
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
    group_template = template(f"{spec.kind}_group.py.tmpl")
    kernels = []
    group_lines = []
    col, _ = _list_index(spec, "n", "NKT")
    for g, group in enumerate(spec.groups):
        loop_kind = "closed-form bounds" if group.forms is not None else "CSR tile lists"
        if spec.run_time_lists:
            loop_kind = "run-time CSR tile lists"
        kernels.append(
            group_template.substitute(
                g=g, n_heads=len(group.heads), loops=_loops(spec, g, group), loop_kind=loop_kind, col=col
            )
        )
        group_lines.append(f"#   g{g}: heads {list(group.heads)}, {loop_kind}: {group.node}")
        if group.forms is not None:
            group_lines.append("#       " + ", ".join(f"{name} = {code}" for name, code in group.forms))
    common = template("common.py.tmpl").substitute(
        header_fields(spec),
        LQ=spec.q_len,
        LK=spec.kv_len,
        NQT=-(-spec.q_len // spec.block_m),
        NKT=-(-spec.kv_len // spec.block_n),
        CH_STRIDE=spec.run_time_layout().chosen_stride,
        NKB_EVEN=spec.kv_len // spec.block_n,
        Q_REORDERED=spec.q_reordered,
        K_REORDERED=spec.k_reordered,
        precision_note=_precision_note(spec),
        order=spec.order,
        group_lines="\n".join(group_lines),
        score_functions=score_code.render(spec.score, spec.layout, spec.input_layout() if spec.inputs else None),
        predicates="\n\n".join(predicates),
    )
    body = template(f"{spec.kind}.py.tmpl").substitute(kernels="\n\n".join(kernels))
    return common.rstrip("\n") + "\n\n\n" + body.rstrip("\n") + "\n"


def kernel_names(spec: KernelSpec) -> list[str]:
    """Names of the kernels (launch entry points) a spec's source defines, in launch order."""
    if spec.kind == "forward":
        return [f"fwd_g{g}" for g in range(len(spec.groups))]
    names = ["bwd_preprocess"]
    for g in range(len(spec.groups)):
        names += [f"bwd_dq_g{g}", f"bwd_dkdv_g{g}"]
    return names
