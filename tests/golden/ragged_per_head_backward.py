# ----------------------------------------------------------------------------
# patterndsl generated Triton kernels, ragged batches and paged caches (backward pass).
# Do not edit: regenerated from the pattern below whenever the cache key changes.
#
# pattern:    mix()
# shapes:     NH=8 query heads, NHK=2 key/value heads (GQA=4), head dim D=64 padded to DP=64
# keys:       [batch, NHK, Lk, D], element b's keys at b
# dtype:      bfloat16 (accumulation in float32; DOT_PRECISION=tf32)
# tiles:      BM=64 query rows (16 for decoding) x BN=32 keys; num_warps=8, num_stages=1,
#             target=sm_90
# head groups (heads that share one pattern, one kernel each):
#   g0: heads [0, 1, 2]: causal & window(64)
#   g1: heads [3, 4, 5, 6, 7]: causal & sink(4)
#
# Symbols:
#   piece         one program's work, a row of PIECES (NF int32 fields): batch element b, ROW0 =
#                 Lk_b - Lq_b (plan row of the element's query 0: positions are end-aligned), R0 (the
#                 first plan row of the BM-row block), Lq_b, Lk_b, the piece's key tiles
#                 COLS[START:SPLIT] (partial: element rule and Lk_b checked) and COLS[SPLIT:END] (full:
#                 no mask), and PART: -1 writes O/LSE, else the float32 partial slot a split row
#                 block (flash decoding) writes for the log-sum-exp combine, and KVH: the key/value head
#                 whose heads run the piece (a routed call's pieces list one head's chosen tiles), -1 for all
#   rows, cols    query and key positions (plan rows of the square plan family: q = row, k = col);
#                 element query index i = row - ROW0 exists iff 0 <= i < Lq_b; nothing at or past
#                 Lk_b is read
#   page          paged keys: position k of element b is slot k % PS of physical page BT[b, k // PS]
#                 (-1: a freed page, never read)
#   LSE           natural-log sum of exp over allowed keys; -inf for a row with none
#   AUX           int8 lookup tables of random(...) primitives (a single 0 if none)
#   SEL           int32, a routed call's choice: per list (b * NHK + kv head, SEL_STRIDE entries) and route,
#                 ROUTE_GROUPS query groups of topk chosen key blocks (-1: none); groups count from the
#                 element's first query (ROW0 // qblock):
#   (no route: SEL is one unread entry)
# ----------------------------------------------------------------------------
import triton
import triton.language as tl

LQ = tl.constexpr(1073741824)
LK = tl.constexpr(1073741824)
NH = tl.constexpr(8)
NHK = tl.constexpr(2)
GQA = tl.constexpr(4)
D = tl.constexpr(64)
DP = tl.constexpr(64)
EVEN_D = tl.constexpr(True)
BM = tl.constexpr(64)
BN = tl.constexpr(32)
PAGED = tl.constexpr(False)
PS = tl.constexpr(1)
PAGE_TILES = tl.constexpr(False)
NF = tl.constexpr(10)
SEL_STRIDE = tl.constexpr(1)
ROUTE_GROUPS = tl.constexpr(16)
DOT_PRECISION = tl.constexpr("tf32")
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fdiv(a, b):
    # Floor division: Triton's // truncates towards zero.
    t = a // b
    return t - (((a % b) != 0) & ((a < 0) != (b < 0))).to(t.dtype)


@triton.jit
def _fmod(a, b):
    # Floor remainder (sign of the divisor), as in Python.
    r = a % b
    return r + b * (((r != 0) & ((r < 0) != (b < 0))).to(r.dtype))


@triton.jit
def _allowed_g0(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal & window(64)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & ((k <= q) & ((k >= q - 64) & (k <= q + 0)))


@triton.jit
def _allowed_g1(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal & sink(4)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & ((k <= q) & (k < 4))



@triton.jit
def _piece(PIECES, pc):
    base = PIECES + pc * NF
    b = tl.load(base).to(tl.int64)
    row0 = tl.load(base + 1)
    r0 = tl.load(base + 2)
    ql = tl.load(base + 3)
    kvl = tl.load(base + 4)
    return b, row0, r0, ql, kvl


@triton.jit
def _routed(base, g, blk, TOPK: tl.constexpr):
    # Whether key block blk [1, BN] is among the TOPK blocks listed at base + g * TOPK for query group g [BM, 1].
    ok = (g >= 0) & (g < ROUTE_GROUPS)
    hit = tl.zeros([BM, BN], dtype=tl.int32)
    for t in range(TOPK):
        hit += tl.where(tl.load(base + g * TOPK + t, mask=ok, other=-1) == blk, 1, 0)
    return hit > 0


@triton.jit
def _keys_at(BT, stride_bt, b, n, kvl):
    # Key tile n of element b: positions, their page (or b when not paged), slot, and which may be read.
    cols = n * BN + tl.arange(0, BN)
    ok = cols < kvl
    if PAGED:
        if PAGE_TILES:
            # The tile lies inside one page: one table entry (splat to the tile's rows).
            page = tl.load(BT + b * stride_bt + (n * BN) // PS).to(tl.int64) + tl.zeros([BN], dtype=tl.int64)
        else:
            page = tl.load(BT + b * stride_bt + cols // PS, mask=ok, other=-1).to(tl.int64)
        ok = ok & (page >= 0)
        slot = (cols % PS).to(tl.int64)
    else:
        page = b
        slot = cols.to(tl.int64)
    return cols, page, slot, ok


@triton.jit
def _load_keys(base, offs, ok, MASKED: tl.constexpr):
    # A [BN, DP] block of key (or value) rows at element offsets offs; a partial tile or a paged cache
    # reads only rows that exist (ok), a full unpaged tile reads without a bounds check.
    offs_d = tl.arange(0, DP)
    ptrs = base + offs[:, None] + offs_d[None, :]
    if MASKED or PAGED:
        if EVEN_D:
            x = tl.load(ptrs, mask=ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _load_queries(base, i, ok, stride):
    offs_d = tl.arange(0, DP)
    ptrs = base + i[:, None].to(tl.int64) * stride + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_queries(base, i, ok, stride, x):
    offs_d = tl.arange(0, DP)
    tl.store(base + i[:, None].to(tl.int64) * stride + offs_d[None, :], x, mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_tile(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, BT, stride_bt, b, n, kvl, rows, h, qk_scale,
              scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, ALLOWED: tl.constexpr, MASKED: tl.constexpr):
    # One key tile: dq += dS @ K here; dK += dS^T @ Q and dV += P^T @ dO added atomically at the keys'
    # own positions (pages shared by elements, and the heads of one key/value head, sum there).
    cols, page, slot, ok = _keys_at(BT, stride_bt, b, n, kvl)
    k_offs = page * stride_kz + slot * stride_kn
    v_offs = page * stride_vz + slot * stride_vn
    k = _load_keys(k_base, k_offs, ok, MASKED)
    v = _load_keys(v_base, v_offs, ok, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        p = tl.where(ALLOWED(rows[:, None], cols[None, :], h, AUX) & ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    offs_d = tl.arange(0, DP)
    keep = ok[:, None] & (offs_d[None, :] < D)
    dv = tl.dot(tl.trans(p).to(do.dtype), do, input_precision=DOT_PRECISION)
    tl.atomic_add(dv_base + v_offs[:, None] + offs_d[None, :], dv, mask=keep)
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=DOT_PRECISION) * scale
    tl.atomic_add(dk_base + k_offs[:, None] + offs_d[None, :], dk, mask=keep)
    return dq


# A decoding step has new table widths and query counts each call: one compiled kernel serves them all.
@triton.jit(do_not_specialize=["stride_bt", "lq"])
def bwd_g0(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PIECES, COLS, BT, HEADS, AUX, scale, stride_qz, stride_qh,
            stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_dz, stride_dh,
            stride_dm, stride_bt, lq):
    # Gradients of head group 0 over one piece's key tiles. DK/DV are float32 with K's/V's strides.
    # Grid: (pieces, heads in group).
    pc = tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    hk = h // GQA
    b, row0, r0, ql, kvl = _piece(PIECES, pc)
    rows = r0 + tl.arange(0, BM)
    i = rows - row0
    live = (i >= 0) & (i < ql)
    q = _load_queries(Q + b * stride_qz + h.to(tl.int64) * stride_qh, i, live, stride_qm)
    do = _load_queries(DO + b * stride_dz + h.to(tl.int64) * stride_dh, i, live, stride_dm)
    row = (b * NH + h) * lq
    # Rows that do not exist or have no allowed key (lse = -inf) get +inf, so their P is exactly 0.
    lse = tl.load(LSE + row + i, mask=live, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row + i, mask=live, other=0.0)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    dk_base = DK + hk.to(tl.int64) * stride_kh
    dv_base = DV + hk.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    dq = tl.zeros([BM, DP], dtype=tl.float32)
    start = tl.load(PIECES + pc * NF + 5)
    split = tl.load(PIECES + pc * NF + 6)
    end = tl.load(PIECES + pc * NF + 7)
    for idx in range(start, split):
        n = tl.load(COLS + idx)
        dq = _bwd_tile(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, BT, stride_bt, b, n, kvl, rows, h,
                       qk_scale, scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, _allowed_g0, True)
    for idx in range(split, end):
        n = tl.load(COLS + idx)
        dq = _bwd_tile(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, BT, stride_bt, b, n, kvl, rows, h,
                       qk_scale, scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, _allowed_g0, False)
    _store_queries(DQ + row * D, i, live, D, (dq * scale).to(DQ.dtype.element_ty))


# A decoding step has new table widths and query counts each call: one compiled kernel serves them all.
@triton.jit(do_not_specialize=["stride_bt", "lq"])
def bwd_g1(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, PIECES, COLS, BT, HEADS, AUX, scale, stride_qz, stride_qh,
            stride_qm, stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_dz, stride_dh,
            stride_dm, stride_bt, lq):
    # Gradients of head group 1 over one piece's key tiles. DK/DV are float32 with K's/V's strides.
    # Grid: (pieces, heads in group).
    pc = tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    hk = h // GQA
    b, row0, r0, ql, kvl = _piece(PIECES, pc)
    rows = r0 + tl.arange(0, BM)
    i = rows - row0
    live = (i >= 0) & (i < ql)
    q = _load_queries(Q + b * stride_qz + h.to(tl.int64) * stride_qh, i, live, stride_qm)
    do = _load_queries(DO + b * stride_dz + h.to(tl.int64) * stride_dh, i, live, stride_dm)
    row = (b * NH + h) * lq
    # Rows that do not exist or have no allowed key (lse = -inf) get +inf, so their P is exactly 0.
    lse = tl.load(LSE + row + i, mask=live, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row + i, mask=live, other=0.0)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    dk_base = DK + hk.to(tl.int64) * stride_kh
    dv_base = DV + hk.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    dq = tl.zeros([BM, DP], dtype=tl.float32)
    start = tl.load(PIECES + pc * NF + 5)
    split = tl.load(PIECES + pc * NF + 6)
    end = tl.load(PIECES + pc * NF + 7)
    for idx in range(start, split):
        n = tl.load(COLS + idx)
        dq = _bwd_tile(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, BT, stride_bt, b, n, kvl, rows, h,
                       qk_scale, scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, _allowed_g1, True)
    for idx in range(split, end):
        n = tl.load(COLS + idx)
        dq = _bwd_tile(dq, q, do, lse2, delta, k_base, v_base, dk_base, dv_base, BT, stride_bt, b, n, kvl, rows, h,
                       qk_scale, scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, _allowed_g1, False)
    _store_queries(DQ + row * D, i, live, D, (dq * scale).to(DQ.dtype.element_ty))
