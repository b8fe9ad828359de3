# ----------------------------------------------------------------------------
# patterndsl generated Triton kernels, ragged batches and paged caches (forward pass).
# Do not edit: regenerated from the pattern below whenever the cache key changes.
#
# pattern:    moba()
# shapes:     NH=8 query heads, NHK=2 key/value heads (GQA=4), head dim D=128 padded to DP=128
# keys:       paged, PS=16 keys per page through the block table BT [batch, max_pages]
# dtype:      float16 (accumulation in float32; DOT_PRECISION=tf32)
# tiles:      BM=16 query rows (16 for decoding) x BN=32 keys; num_warps=4, num_stages=2,
#             target=sm_90
# head groups (heads that share one pattern, one kernel each):
#   g0: heads [0, 1, 2]: causal & (route(4, among = causal & ~window(64)) | window(64))
#   g1: heads [3, 4, 5, 6, 7]: sink(4) | causal & ~route(2, block = 32, score = max, qblock = 4)
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
#   SEL[0:32]: route(2, block = 32, score = max, qblock = 4)
#   SEL[32:96]: route(4, among = causal & ~window(64))
# ----------------------------------------------------------------------------
import triton
import triton.language as tl

LQ = tl.constexpr(1073741824)
LK = tl.constexpr(1073741824)
NH = tl.constexpr(8)
NHK = tl.constexpr(2)
GQA = tl.constexpr(4)
D = tl.constexpr(128)
DP = tl.constexpr(128)
EVEN_D = tl.constexpr(True)
BM = tl.constexpr(16)
BN = tl.constexpr(32)
PAGED = tl.constexpr(True)
PS = tl.constexpr(16)
PAGE_TILES = tl.constexpr(False)
NF = tl.constexpr(10)
SEL_STRIDE = tl.constexpr(96)
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
def _allowed_g0_c0(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal & window(64)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & ((k <= q) & ((k >= q - 64) & (k <= q + 0)))


@triton.jit
def _allowed_g0_c1(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & (k <= q)


@triton.jit
def _allowed_g0(i, j, h, AUX, SEL, sel, row0):
    """Element rule: route p holds where the call chose key block j // block_p for query group
    i // qblock_p - row0 // qblock_p of this element and key/value head (SEL); the routes' values pick the
    corner (each route replaced by full or empty) that equals the pattern there."""
    # r0: route(4, among = causal & ~window(64))
    r0 = _routed(SEL + sel + 32, i // 64 - row0 // 64, j // 64, 4)
    return (
        ((r0 == 0) & _allowed_g0_c0(i, j, h, AUX))
        | (r0 & _allowed_g0_c1(i, j, h, AUX))
    )


@triton.jit
def _allowed_g1_c0(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: causal | sink(4)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & ((k <= q) | (k < 4))


@triton.jit
def _allowed_g1_c1(i, j, h, AUX):
    """Allowed (query index i [BM, 1], key index j [1, BN], head h) for: sink(4)"""
    inb = (i < LQ) & (j < LK)
    q = i + (LK - LQ)
    k = j
    return inb & (k < 4)


@triton.jit
def _allowed_g1(i, j, h, AUX, SEL, sel, row0):
    """Element rule: route p holds where the call chose key block j // block_p for query group
    i // qblock_p - row0 // qblock_p of this element and key/value head (SEL); the routes' values pick the
    corner (each route replaced by full or empty) that equals the pattern there."""
    # r0: route(2, block = 32, score = max, qblock = 4)
    r0 = _routed(SEL + sel + 0, i // 4 - row0 // 4, j // 32, 2)
    return (
        ((r0 == 0) & _allowed_g1_c0(i, j, h, AUX))
        | (r0 & _allowed_g1_c1(i, j, h, AUX))
    )



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
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, BT, stride_bt, b, n, kvl, row0, rows, h, qk_scale, stride_kz,
              stride_kn, stride_vz, stride_vn, AUX, SEL, sel, ALLOWED: tl.constexpr, MASKED: tl.constexpr):
    # One key tile of the online softmax; scores live in the log2 domain (qk_scale includes LOG2E).
    cols, page, slot, ok = _keys_at(BT, stride_bt, b, n, kvl)
    k = _load_keys(k_base, page * stride_kz + slot * stride_kn, ok, MASKED)
    v = _load_keys(v_base, page * stride_vz + slot * stride_vn, ok, MASKED)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(ALLOWED(rows[:, None], cols[None, :], h, AUX, SEL, sel, row0) & ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["lq"])
def combine(O, LSE, OP, LP, SPLITS, HEADS, lq):
    # Flash decoding's second step: the pieces of one split row block (SPLITS row: b, ROW0, R0, Lq_b,
    # first part, parts, KVH) merged by log-sum-exp. Grid: (split row blocks of a head group, its heads).
    t = tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    base = SPLITS + t * 7
    kvh = tl.load(base + 6)
    if (kvh >= 0) & (kvh != h // GQA):
        return
    b = tl.load(base).to(tl.int64)
    i = tl.load(base + 2) + tl.arange(0, BM) - tl.load(base + 1)
    live = (i >= 0) & (i < tl.load(base + 3))
    p0 = tl.load(base + 4)
    p1 = p0 + tl.load(base + 5)
    r = tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    for p in range(p0, p1):
        slot = (h + p * NH).to(tl.int64) * BM + r
        lp = tl.load(LP + slot)
        op = tl.load(OP + slot[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
        m_new = tl.maximum(m, lp)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lp - m_use)
        den = den * alpha + w
        acc = acc * alpha[:, None] + op * w[:, None]
        m = m_new
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    row = (b * NH + h) * lq
    _store_queries(O + row * D, i, live, D, (acc / den_safe[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + row + i, tl.where(empty, float("-inf"), (m + tl.log2(den_safe)) * LN2), mask=live)


# A decoding step has new table widths and query counts each call: one compiled kernel serves them all.
@triton.jit(do_not_specialize=["stride_bt", "lq"])
def fwd_g0(Q, K, V, O, LSE, OP, LP, PIECES, COLS, BT, HEADS, AUX, SEL, scale, stride_qz, stride_qh, stride_qm,
            stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_bt, lq):
    # Forward of head group 0 over one piece's key tiles. Grid: (pieces, heads in group).
    pc = tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    hk = h // GQA
    kvh = tl.load(PIECES + pc * NF + 9)
    if (kvh >= 0) & (kvh != hk):
        return
    b, row0, r0, ql, kvl = _piece(PIECES, pc)
    sel = (b * NHK + hk) * SEL_STRIDE
    rows = r0 + tl.arange(0, BM)
    i = rows - row0
    live = (i >= 0) & (i < ql)
    q = _load_queries(Q + b * stride_qz + h.to(tl.int64) * stride_qh, i, live, stride_qm)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    start = tl.load(PIECES + pc * NF + 5)
    split = tl.load(PIECES + pc * NF + 6)
    end = tl.load(PIECES + pc * NF + 7)
    for idx in range(start, split):
        n = tl.load(COLS + idx)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, BT, stride_bt, b, n, kvl, row0, rows, h,
                                  qk_scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, SEL, sel, _allowed_g0,
                                  True)
    for idx in range(split, end):
        n = tl.load(COLS + idx)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, BT, stride_bt, b, n, kvl, row0, rows, h,
                                  qk_scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, SEL, sel, _allowed_g0,
                                  False)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    part = tl.load(PIECES + pc * NF + 8)
    if part < 0:
        row = (b * NH + h) * lq
        _store_queries(O + row * D, i, live, D, out.to(O.dtype.element_ty))
        tl.store(LSE + row + i, lse2 * LN2, mask=live)
    else:
        # One piece of a split row block: float32 partials for the combine (log2 domain).
        slot = (part * NH + h).to(tl.int64) * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, DP)
        tl.store(OP + slot[:, None] * D + offs_d[None, :], out, mask=offs_d[None, :] < D)
        tl.store(LP + slot, lse2)


# A decoding step has new table widths and query counts each call: one compiled kernel serves them all.
@triton.jit(do_not_specialize=["stride_bt", "lq"])
def fwd_g1(Q, K, V, O, LSE, OP, LP, PIECES, COLS, BT, HEADS, AUX, SEL, scale, stride_qz, stride_qh, stride_qm,
            stride_kz, stride_kh, stride_kn, stride_vz, stride_vh, stride_vn, stride_bt, lq):
    # Forward of head group 1 over one piece's key tiles. Grid: (pieces, heads in group).
    pc = tl.program_id(0)
    h = tl.load(HEADS + tl.program_id(1))
    hk = h // GQA
    kvh = tl.load(PIECES + pc * NF + 9)
    if (kvh >= 0) & (kvh != hk):
        return
    b, row0, r0, ql, kvl = _piece(PIECES, pc)
    sel = (b * NHK + hk) * SEL_STRIDE
    rows = r0 + tl.arange(0, BM)
    i = rows - row0
    live = (i >= 0) & (i < ql)
    q = _load_queries(Q + b * stride_qz + h.to(tl.int64) * stride_qh, i, live, stride_qm)
    k_base = K + hk.to(tl.int64) * stride_kh
    v_base = V + hk.to(tl.int64) * stride_vh
    qk_scale = scale * LOG2E
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    start = tl.load(PIECES + pc * NF + 5)
    split = tl.load(PIECES + pc * NF + 6)
    end = tl.load(PIECES + pc * NF + 7)
    for idx in range(start, split):
        n = tl.load(COLS + idx)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, BT, stride_bt, b, n, kvl, row0, rows, h,
                                  qk_scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, SEL, sel, _allowed_g1,
                                  True)
    for idx in range(split, end):
        n = tl.load(COLS + idx)
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, BT, stride_bt, b, n, kvl, row0, rows, h,
                                  qk_scale, stride_kz, stride_kn, stride_vz, stride_vn, AUX, SEL, sel, _allowed_g1,
                                  False)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    part = tl.load(PIECES + pc * NF + 8)
    if part < 0:
        row = (b * NH + h) * lq
        _store_queries(O + row * D, i, live, D, out.to(O.dtype.element_ty))
        tl.store(LSE + row + i, lse2 * LN2, mask=live)
    else:
        # One piece of a split row block: float32 partials for the combine (log2 domain).
        slot = (part * NH + h).to(tl.int64) * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, DP)
        tl.store(OP + slot[:, None] * D + offs_d[None, :], out, mask=offs_d[None, :] < D)
        tl.store(LP + slot, lse2)
