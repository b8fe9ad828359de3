"""Stage 5 (codegen) for patterns with ``route(...)`` (a subpackage so that its text stays out of the
static kernels' cache key): Triton kernels that run tile lists chosen at run time.

Comes in: a :class:`RouteKernelSpec` (one head group's pattern node and its routes,
baked-in sizes, dtype, tiles). Goes out: deterministic Triton source with a
forward kernel (online softmax, float32 accumulation, LSE) and a backward
kernel (dQ per query tile; dK/dV added atomically per key tile), both walking
per (batch element, key-value head) CSR lists of key tiles that
:mod:`patterndsl.runtime.dynamic` merged from the static plan and this call's
choice.

Element rule on a partial tile. With routes ``r_1..r_n`` replaced by ``empty``
or ``full`` the pattern is static: corner ``c`` (bit ``p`` set: route ``p``
full) is rendered by :func:`patterndsl.codegen.predicate.render_predicate`. At
an element each route is true or false, so the pattern equals the corner whose
bits are the routes' values there; each route's value is one load of the
chosen table ``CHOSEN[b, kv_head, group(i), block(j)]``. Full tiles skip the
mask.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch

from patterndsl import ir
from patterndsl.codegen import generator, predicate
from patterndsl.codegen.predicate import FLOOR_HELPERS, AuxTables, render_predicate

#: Triton dtypes by torch dtype name.
DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}


@dataclass(frozen=True)
class RouteKernelSpec:
    """Everything the routed kernels of one head group are specialised to.

    Attributes:
        name: the pattern's name (for the header).
        node: the head group's pattern node.
        routes: the routes in ``node`` (bit order of the corners).
        layout: the pattern's layout or None.
        q_len, kv_len: baked-in lengths.
        heads, kv_heads: query and key-value heads.
        head_dim: ``D`` (padded to a power of two ``DP`` in the kernel).
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``.
        block: tiles ``(BM, BN)``.
        num_warps: launch warps.
    """

    name: str
    node: ir.Node
    routes: tuple[ir.Prim, ...]
    layout: ir.Layout | None
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    block: tuple[int, int]
    num_warps: int = 4

    @property
    def padded_dim(self) -> int:
        return generator.padded_head_dim(self.head_dim)

    @property
    def key(self) -> str:
        """Hash of everything that changes the source (and of this generator's own text)."""
        # This module's text, the predicate renderer it calls and the generator helpers it uses shape the source.
        me = hashlib.sha256()
        for path in (__file__, predicate.__file__, generator.__file__):
            with open(path, "rb") as f:
                me.update(f.read())
        me = me.hexdigest()
        text = repr((me, str(self.node), [str(r) for r in self.routes], self.layout, self.q_len, self.kv_len))
        text += repr((self.heads, self.kv_heads, self.head_dim, self.dtype, self.block, self.num_warps))
        return "route_" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _corner(node: ir.Node, routes: tuple[ir.Prim, ...], bits: tuple[int, ...]) -> ir.Node:
    from patterndsl.runtime.dynamic import substitute

    return substitute(node, {r: (ir.FULL if bit else ir.EMPTY) for r, bit in zip(routes, bits, strict=True)})


def _predicates(spec: RouteKernelSpec) -> tuple[list[tuple[int, ...]], list[str], AuxTables]:
    """The corners (one bit per route: replaced by ``full`` or ``empty``), their predicate texts, and the
    ``random`` tables the predicates read through ``AUX``."""
    aux = AuxTables()
    corners = list(itertools.product((0, 1), repeat=len(spec.routes)))
    funcs = [
        render_predicate(
            f"_corner_{c}", _corner(spec.node, spec.routes, bits), spec.layout, spec.q_len, spec.kv_len, aux
        )
        for c, bits in enumerate(corners)
    ]
    return corners, funcs, aux


def aux_table(spec: RouteKernelSpec) -> torch.Tensor:
    """The int8 ``AUX`` tensor the kernels of ``spec`` read (``random`` tables; one zero byte without)."""
    return _predicates(spec)[2].tensor()


def render(spec: RouteKernelSpec) -> str:
    """The Triton source of the routed forward and backward kernels of ``spec``.

    Args:
        spec: the kernel spec.

    Returns:
        Source text starting with a header comment naming the pattern, sizes and cache key.
    """
    corners, funcs, _ = _predicates(spec)
    bm, bn = spec.block
    n = len(spec.routes)
    route_args = "".join(f", CH{p}, QG{p}, KB{p}, NG{p}, NB{p}" for p in range(n))
    loads = []
    for p in range(n):
        loads.append(f"    kb{p} = tl.load(KB{p} + j, mask=cmask, other=0)")
        loads.append(
            f"    r{p} = tl.load(CH{p} + lst * NG{p} * NB{p} + g{p}[:, None] * NB{p} + kb{p}[None, :],"
            " mask=rmask[:, None] & cmask[None, :], other=0) != 0"
        )
    terms = []
    for c, bits in enumerate(corners):
        conds = [f"r{p}" if bit else f"(r{p} == 0)" for p, bit in enumerate(bits)]
        call = f"_corner_{c}(i[:, None], j[None, :], h, AUX)"
        terms.append(" & ".join([*conds, call]) if conds else call)
    allowed = " | ".join(f"({t})" for t in terms)
    group_loads = "\n".join(f"    g{p} = tl.load(QG{p} + i, mask=rmask, other=0)" for p in range(n))
    header = [
        "# " + "-" * 76,
        "# patterndsl generated Triton kernels for a pattern with route(...). Do not edit.",
        f"# pattern:   {spec.name}: {spec.node}",
        f"# routes:    {', '.join(str(r) for r in spec.routes)}",
        f"# shapes:    LQ={spec.q_len}, LK={spec.kv_len}, NH={spec.heads}, NHK={spec.kv_heads}, D={spec.head_dim}",
        f"# dtype:     {spec.dtype}; tiles BM={bm} x BN={bn}; num_warps={spec.num_warps}",
        f"# cache key: {spec.key}",
        "# Symbols: i, j original query / key indices (q = i + LK - LQ, k = j); lst = b * NHK + kv head",
        "#   indexes the run-time CSR lists ROWPTR/COLS/STATE (state 2 full: no mask) and the chosen",
        "#   tables CHp [B*NHK, NGp, NBp] of route p (query group QGp[i], key block KBp[j]).",
        "# " + "-" * 76,
    ]
    precision = "ieee" if spec.dtype == "float32" else "tf32"
    body = _TEMPLATE.format(
        floor_helpers=FLOOR_HELPERS,
        LQ=spec.q_len,
        LK=spec.kv_len,
        NH=spec.heads,
        GQA=spec.heads // spec.kv_heads,
        NHK=spec.kv_heads,
        D=spec.head_dim,
        DP=spec.padded_dim,
        BM=bm,
        BN=bn,
        PREC=precision,
        funcs="\n\n".join(funcs),
        route_args=route_args,
        group_loads=group_loads,
        loads="\n".join(loads),
        allowed=allowed,
    )
    return "\n".join(header) + "\n" + body


_TEMPLATE = '''import triton
import triton.language as tl

LQ = tl.constexpr({LQ})
LK = tl.constexpr({LK})
NH = tl.constexpr({NH})
GQA = tl.constexpr({GQA})
NHK = tl.constexpr({NHK})
D = tl.constexpr({D})
DP = tl.constexpr({DP})
BM = tl.constexpr({BM})
BN = tl.constexpr({BN})
DOT_PRECISION = tl.constexpr("{PREC}")
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


{floor_helpers}


{funcs}


@triton.jit
def _allowed(i, j, h, b, lst, st, rmask, cmask, AUX{route_args}):
    """Element mask of tile (rows i, cols j) for head h, list lst, tile state st."""
{group_loads}
{loads}
    allowed = {allowed}
    allowed = allowed | (st == 2)
    return allowed & rmask[:, None] & cmask[None, :]


@triton.jit
def route_fwd(Q, K, V, O, LSE, ROWPTR, COLS, STATE, HEADS, AUX{route_args},
              qk_scale, NHG, NQT, sqb, sqh, sqm, skb, skh, skn, sob, soh, som):
    m = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // NHG
    h = tl.load(HEADS + bg % NHG)
    kvh = h // GQA
    lst = b * NHK + kvh
    i = m * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    rmask = i < LQ
    dmask = d < D
    qt = tl.load(Q + b * sqb + h * sqh + i[:, None] * sqm + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    start = tl.load(ROWPTR + lst * (NQT + 1) + m)
    end = tl.load(ROWPTR + lst * (NQT + 1) + m + 1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    for t in range(start, end):
        n = tl.load(COLS + t)
        st = tl.load(STATE + t)
        j = n * BN + tl.arange(0, BN)
        cmask = j < LK
        kvmask = cmask[:, None] & dmask[None, :]
        kt = tl.load(K + b * skb + kvh * skh + j[:, None] * skn + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
        ok = _allowed(i, j, h, b, lst, st, rmask, cmask, AUX{route_args})
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + b * skb + kvh * skh + j[:, None] * skn + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    omask = rmask[:, None] & dmask[None, :]
    tl.store(O + b * sob + h * soh + i[:, None] * som + d[None, :], out.to(O.dtype.element_ty), mask=omask)
    tl.store(LSE + (b * NH + h) * LQ + i, lse, mask=rmask)


@triton.jit
def route_bwd(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, ROWPTR, COLS, STATE, HEADS, AUX{route_args},
              qk_scale, scale, NHG, NQT, sqb, sqh, sqm, skb, skh, skn):
    m = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // NHG
    h = tl.load(HEADS + bg % NHG)
    kvh = h // GQA
    lst = b * NHK + kvh
    i = m * BM + tl.arange(0, BM)
    d = tl.arange(0, DP)
    rmask = i < LQ
    dmask = d < D
    qmask = rmask[:, None] & dmask[None, :]
    qoff = b * sqb + h * sqh + i[:, None] * sqm + d[None, :]
    qt = tl.load(Q + qoff, mask=qmask, other=0.0)
    dot_ = tl.load(DO + qoff, mask=qmask, other=0.0)
    lse = tl.load(LSE + (b * NH + h) * LQ + i, mask=rmask, other=float("inf"))
    # Rows with no allowed key have lse = -inf: +inf makes their P exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + (b * NH + h) * LQ + i, mask=rmask, other=0.0)
    start = tl.load(ROWPTR + lst * (NQT + 1) + m)
    end = tl.load(ROWPTR + lst * (NQT + 1) + m + 1)
    dq = tl.zeros([BM, DP], tl.float32)
    for t in range(start, end):
        n = tl.load(COLS + t)
        st = tl.load(STATE + t)
        j = n * BN + tl.arange(0, BN)
        cmask = j < LK
        kvmask = cmask[:, None] & dmask[None, :]
        koff = b * skb + kvh * skh + j[:, None] * skn + d[None, :]
        kt = tl.load(K + koff, mask=kvmask, other=0.0)
        vt = tl.load(V + koff, mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
        ok = _allowed(i, j, h, b, lst, st, rmask, cmask, AUX{route_args})
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(dot_.dtype)), dot_, input_precision=DOT_PRECISION)
        tl.atomic_add(DV + koff, dv, mask=kvmask)
        dp = tl.dot(dot_, tl.trans(vt), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PRECISION)
        dk = tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=DOT_PRECISION) * scale
        tl.atomic_add(DK + koff, dk, mask=kvmask)
    tl.store(DQ + qoff, dq * scale, mask=qmask)
'''


#: Pointer arguments by element type (the rest of the kernels' arguments are int32 scalars).
_INPUTS = {"Q", "K", "V", "O", "DO", "DQ"}
_FLOAT_PTRS = {"LSE", "DELTA", "DK", "DV"}
_BYTE_PTRS = {"STATE", "AUX"}
_FLOAT_SCALARS = {"qk_scale", "scale"}


def compile_aot(spec: RouteKernelSpec, target: str = "sm_90", num_stages: int = 2):
    """Build the routed kernels of ``spec`` ahead of time for a CUDA target (no GPU needed).

    Args:
        spec: the kernel spec.
        target: ``"sm_80"`` or ``"sm_90"``.
        num_stages: software pipelining stages.

    Returns:
        One :class:`patterndsl.codegen.inspect.AotKernel` per kernel (``route_fwd``, ``route_bwd``)
        with its SASS resources (registers, spills, MMA counts).
    """
    from patterndsl import kernel_cache
    from patterndsl.codegen import inspect as aot

    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[spec.dtype]
    module = kernel_cache.load(spec, render, interpret=False)
    out = []
    for name in ("route_fwd", "route_bwd"):
        fn = getattr(module, name)
        sig = {}
        for arg in fn.arg_names:
            if arg in _INPUTS:
                sig[arg] = ptr
            elif arg in _FLOAT_PTRS:
                sig[arg] = "*fp32"
            elif arg in _BYTE_PTRS or arg.startswith("CH"):
                sig[arg] = "*i8"
            elif arg in _FLOAT_SCALARS:
                sig[arg] = "fp32"
            elif arg in ("ROWPTR", "COLS", "HEADS") or arg.startswith(("QG", "KB")):
                sig[arg] = "*i32"
            else:
                sig[arg] = "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if sig[arg].startswith("*")}
        compiled = aot.compile_aot(fn, sig, target, spec.num_warps, num_stages, attrs)
        kernel = aot.AotKernel(name, target, dict(compiled.asm), compiled.metadata.shared, spec.num_warps, num_stages)
        kernel.resources = aot.sass_resources(kernel.asm["cubin"], kernel.asm["ptx"], target)
        out.append(kernel)
    return out


def kernel_source(pattern, q_len: int, kv_len: int | None = None, heads: int = 1, **options) -> str:
    """The routed kernels' source of a pattern with ``route`` (``Pattern.kernel_source``).

    Args:
        pattern: a :class:`patterndsl.Pattern` whose pattern uses ``route``.
        q_len, kv_len, heads: sizes.
        **options: ``head_dim`` (64), ``dtype`` (``torch.float16``), ``kv_heads`` (``heads``),
            ``block`` (the routed default); ``kind`` is accepted and ignored (one source holds
            forward and backward).

    Returns:
        The source of every head group's kernels, in head-group order.
    """
    import torch

    from patterndsl.runtime import plans, triton_route

    kv_len = q_len if kv_len is None else kv_len
    block = tuple(options.get("block", triton_route.block_for(options.get("head_dim", 64))))
    dtype = str(options.get("dtype", torch.float16)).replace("torch.", "")
    plan = plans.build(pattern.ir, q_len, kv_len, heads, block, "identity")
    out = []
    for group in plan.groups:
        routes = tuple(dict.fromkeys(p for p in ir.walk(group.node) if isinstance(p, ir.Prim) and p.name == "route"))
        spec = RouteKernelSpec(
            pattern.ir.name, group.node, routes, pattern.ir.layout, q_len, kv_len, heads,
            options.get("kv_heads", heads), options.get("head_dim", 64), dtype, block, triton_route.NUM_WARPS,
        )  # fmt: skip
        out.append(render(spec))
    return "\n".join(out)
