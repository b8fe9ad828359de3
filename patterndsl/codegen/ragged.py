"""Stage 5 (codegen): kernels for ragged batches and paged key/value caches (LANGUAGE.md section 9).

Comes in: a pattern whose meaning reads positions only (the runtime's ``ragged.position_only``), its
head groups, the launch facts (heads, key/value heads, head dim, dtype, key tile ``BN``, target)
and, for a paged cache, the page size. Goes out: a :class:`RaggedSpec` (its :attr:`RaggedSpec.key`
names the cache entry) and deterministic Triton source with, per head group, a forward kernel
``fwd_gN`` and a backward kernel ``bwd_gN`` walking *pieces* (a batch element's block of query rows
and a run of its key tiles, made per call from the square plan family), plus ``combine``, the
log-sum-exp merge of the pieces of a row block split over its key tiles (flash decoding).

Every length is read at run time from the piece (``Lq_b``, ``Lk_b``), so one module serves every
length; keys are read through the block table when paged and never at or past ``Lk_b``. The element
rule is the static predicate rendered at a length no call reaches (positions are plan rows of the
square family, where query and key positions coincide with indices).

Groups whose node holds ``route(...)`` (decoding steps of a :class:`patterndsl.PagedKVCache`, forward
only) read the call's choice from ``SEL``: per batch element and key/value head, for every route in
:func:`route_layout` order, ``ROUTE_GROUPS`` query groups of ``topk`` chosen key blocks each (``-1``
for none). A route holds at ``(i, j)`` where key block ``j // block`` is listed for query group
``i // qblock - ROW0 // qblock`` (the element's own groups, numbered as
:func:`patterndsl.semantics.route_blocks` numbers them), and the routes' values pick the corner (each
route replaced by ``full`` or ``empty``) equal to the pattern there. Nothing in the module depends on a
length or on the choice, so every step of a generation runs the same compiled kernels.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.codegen import key
from patterndsl.codegen.generator import DTYPES, header_fields, pattern_header, template
from patterndsl.codegen.launch import padded_head_dim, ragged_launch
from patterndsl.codegen.predicate import AuxTables, render_predicate
from patterndsl.errors import BackendError

#: The length the element rules are rendered at: positions stay below it (int32 arithmetic, 2**30 keys).
POSITION_CAP = 2**30
#: Query rows of a decoding call's blocks (``tl.dot`` needs at least 16).
DECODE_ROWS = 16
#: Query groups a routed call lists per element and route (a call of at most ``DECODE_ROWS`` queries has at most
#: that many groups).
ROUTE_GROUPS = DECODE_ROWS


@dataclass(frozen=True)
class RouteSlot:
    """Where one route's choice sits in a list of ``SEL``: ``ROUTE_GROUPS x topk`` entries from ``offset``."""

    prim: ir.Prim
    offset: int
    topk: int


def route_layout(groups) -> tuple[tuple[RouteSlot, ...], int]:
    """``(slots, stride)``: the routes of ``groups`` (``(heads, node)`` pairs, or objects with ``node``) in
    ``SEL`` order, and the entries per (element, key/value head) list."""
    nodes = [g[1] if isinstance(g, tuple) else g.node for g in groups]
    prims = sorted({p for node in nodes for p in ir.routes(node)}, key=ir.sort_key)
    slots, at = [], 0
    for prim in prims:
        topk = int(prim.arg("topk"))
        slots.append(RouteSlot(prim, at, topk))
        at += ROUTE_GROUPS * topk
    return tuple(slots), at


@dataclass(frozen=True)
class RaggedSpec:
    """Everything a ragged module's source depends on.

    Attributes:
        kind: ``"forward"`` or ``"backward"``.
        pattern_name, pattern_params: for the header.
        groups: ``(heads, node)`` per head group.
        heads, kv_heads, head_dim: sizes baked into the source.
        dtype: the input dtype name.
        block_m: query rows per program (16 for decoding calls).
        block_n: keys per tile (the plan family's ``BN``).
        page_size: keys per page of a paged cache, 0 for ``[B, Hkv, Lk, D]`` keys.
        num_warps, num_stages, target: the launch configuration.
    """

    kind: str
    pattern_name: str
    pattern_params: str
    groups: tuple[tuple[tuple[int, ...], ir.Node], ...]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    page_size: int
    num_warps: int
    num_stages: int
    target: str

    @property
    def padded_dim(self) -> int:
        return padded_head_dim(self.head_dim)

    def canonical(self) -> str:
        """A stable text of every field (nodes printed canonically)."""
        groups = [f"heads={heads} node={node}" for heads, node in self.groups]
        fields = [
            "ragged",
            self.kind,
            self.pattern_name,
            self.pattern_params,
            *groups,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.dtype,
            self.block_m,
            self.block_n,
            self.page_size,
            self.num_warps,
            self.num_stages,
            self.target,
        ]
        return "\n".join(str(f) for f in fields)

    @property
    def key(self) -> str:
        """sha256 over :func:`patterndsl.codegen.key.sources_hash` and :meth:`canonical`."""
        text = f"{key.sources_hash()}\n{self.canonical()}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def make_spec(
    pir: ir.PatternIR,
    groups,
    kind: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int = 0,
    target: str = "sm_90",
    rows: int = DECODE_ROWS,
    block_n: int | None = None,
) -> RaggedSpec:
    """The spec of a ragged module.

    Args:
        pir: the pattern (its name and parameters go into the header).
        groups: the plan's head groups (``heads`` and ``node`` each).
        kind: ``"forward"`` or ``"backward"``.
        heads, kv_heads, head_dim: sizes.
        dtype: ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``.
        page_size: keys per page, or 0 when not paged.
        target: ``"sm_80"``, ``"sm_90"`` or ``"interpret"``.
        rows: query rows per program (``BM``).
        block_n: keys per tile (default: the launch table's for this pass).

    Returns:
        The :class:`RaggedSpec`.
    """
    if dtype not in DTYPES:
        raise BackendError(f"the Triton kernels take float16, bfloat16 or float32, got {dtype}")
    row = ragged_launch(head_dim, target, kind, DTYPES[dtype], rows)
    bn = block_n or (row.tiles[1] if row.tiles else 16)
    pattern_name, pattern_params = pattern_header(pir)
    return RaggedSpec(
        kind=kind,
        pattern_name=pattern_name,
        pattern_params=pattern_params,
        groups=tuple((tuple(g.heads), g.node) for g in groups),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=DTYPES[dtype],
        block_m=rows,
        block_n=bn,
        page_size=int(page_size),
        num_warps=row.num_warps,
        num_stages=row.num_stages,
        target=target,
    )


def render(spec: RaggedSpec) -> str:
    """The Triton source of a ragged spec (deterministic).

    Returns:
        Source defining the kernels :func:`kernel_names` lists.
    """
    aux = AuxTables()
    predicates, kernels, lines = [], [], []
    group = template(f"ragged_{spec.kind}_group.py.tmpl")
    slots, stride = route_layout(spec.groups)
    for g, (heads, node) in enumerate(spec.groups):
        name = f"_allowed_g{g}"
        if spec.kind == "forward":
            predicates.append(_element_rule(name, node, slots, aux, spec.heads))
        elif ir.routes(node):
            raise BackendError(
                "the ragged backward takes patterns without route(...) (a step with gradients recomputes)"
            )
        else:
            predicates.append(render_predicate(name, node, None, POSITION_CAP, POSITION_CAP, aux, spec.heads))
        kernels.append(group.substitute(g=g))
        lines.append(f"#   g{g}: heads {list(heads)}: {node}")
    ps = spec.page_size
    keys_note = (
        f"paged, PS={ps} keys per page through the block table BT [batch, max_pages]"
        if ps
        else "[batch, NHK, Lk, D], element b's keys at b"
    )
    body = template(f"ragged_{spec.kind}.py.tmpl").substitute(kernels="\n\n".join(kernels))
    text = template("ragged.py.tmpl").substitute(
        header_fields(spec),
        CAP=POSITION_CAP,
        PAGED=bool(ps),
        PS=max(ps, 1),
        PAGE_TILES=bool(ps) and ps % spec.block_n == 0,
        SEL_STRIDE=max(stride, 1),
        ROUTE_GROUPS=ROUTE_GROUPS,
        route_lines="\n".join(
            f"#   SEL[{slot.offset}:{slot.offset + ROUTE_GROUPS * slot.topk}]: {slot.prim}" for slot in slots
        )
        or "#   (no route: SEL is one unread entry)",
        keys_note=keys_note,
        group_lines="\n".join(lines),
        predicates="\n\n".join(predicates),
        body=body.rstrip("\n"),
    )
    if aux.chunks:
        raise BackendError("ragged kernels take patterns without random(...) tables")
    return text.rstrip("\n") + "\n"


def _element_rule(name: str, node: ir.Node, slots, aux: AuxTables, heads: int) -> str:
    """``name(i, j, h, AUX, SEL, sel, row0)``: a forward group's element rule (plan rows ``i``, key positions ``j``;
    ``SEL + sel`` the list of this element and key/value head, ``row0`` the element's first query row), and the
    predicates it calls (see the module docstring)."""
    routes = ir.routes(node)
    signature = f"def {name}(i, j, h, AUX, SEL, sel, row0):"
    if not routes:
        static = render_predicate(f"{name}_static", node, None, POSITION_CAP, POSITION_CAP, aux, heads)
        rule = ["@triton.jit", signature, f"    return {name}_static(i, j, h, AUX)"]
        return f"{static}\n\n" + "\n".join(rule) + "\n"
    funcs, terms = [], []
    for c, bits in enumerate(itertools.product((0, 1), repeat=len(routes))):
        values = {r: (ir.FULL if bit else ir.EMPTY) for r, bit in zip(routes, bits, strict=True)}
        pred = f"{name}_c{c}"
        funcs.append(render_predicate(pred, ir.replace(node, values), None, POSITION_CAP, POSITION_CAP, aux, heads))
        conds = [f"r{p}" if bit else f"(r{p} == 0)" for p, bit in enumerate(bits)]
        terms.append(" & ".join([*conds, f"{pred}(i, j, h, AUX)"]))
    lines = [
        "@triton.jit",
        signature,
        '    """Element rule: route p holds where the call chose key block j // block_p for query group',
        "    i // qblock_p - row0 // qblock_p of this element and key/value head (SEL); the routes' values pick the",
        '    corner (each route replaced by full or empty) that equals the pattern there."""',
    ]
    by_prim = {slot.prim: slot for slot in slots}
    for p, prim in enumerate(routes):
        slot, qb, kb = by_prim[prim], int(prim.arg("qblock")), int(prim.arg("block"))
        lines += [
            f"    # r{p}: {prim}",
            f"    r{p} = _routed(SEL + sel + {slot.offset}, i // {qb} - row0 // {qb}, j // {kb}, {slot.topk})",
        ]
    lines += ["    return (", f"        ({terms[0]})", *(f"        | ({t})" for t in terms[1:]), "    )"]
    return "\n\n".join([*funcs, "\n".join(lines) + "\n"])


def kernel_names(spec: RaggedSpec) -> list[str]:
    """The kernels a ragged spec's source defines."""
    if spec.kind == "forward":
        return [f"fwd_g{g}" for g in range(len(spec.groups))] + ["combine"]
    return [f"bwd_g{g}" for g in range(len(spec.groups))]
