// patterndsl native CPU decoding: few query rows over a key/value cache read in place (issue 14).
//
// Built into the same library as attention.cpp (its own translation unit; only simd.h's helpers are
// shared with the tile kernels). Every buffer is float32 with a contiguous last dimension; the caller
// (patterndsl/runtime/cpu/native/decoding.py) has checked the shapes and the table's pages.
//
// Symbols:
//   q [B, H, Lq, D] by strides (qsb, qsh, qsi); out [B, H, Lq, D] and lse [B, H, Lq] contiguous
//   k, v: pages by strides (page, kv head, row): a paged cache [P, Hkv, ps, D], or an unpaged
//         [B, Hkv, Lk, D] seen as one page of ps = Lk per element (table[b] = b)
//   table[b * tstride + p]: physical page of element b's logical page p (< 0: not held)
//   tiles[t * 8 + ...]: b, i0, n (rows i0 .. i0 + n of element b), run_lo, run_hi (its key runs
//         runs[2 r], runs[2 r + 1] = [start, stop) positions), mask_off (-1: every pair allowed),
//         mask_heads (1: one mask for every head, else H), nk (keys of the tile)
//   masks: bytes [mask_heads][n][nk] from mask_off (nonzero = allowed)
// One work item is (tile, kv head, key split): the G = H / Hkv query heads reading that kv head
// are R = G * n rows against the same keys (each key and value row is loaded once for all of
// them). Splits of one (tile, kv head) are merged by log-sum-exp at the end, in the same region.
// Before any work every table entry of an element's held pages (those below kv_lengths[b]) is checked
// to be a page of the cache or -1, and every page a run reads to be held.
// Return codes: 0 done; 1 bad arguments; 2 a table entry outside the cache, or a page not held that a
// run reaches (the caller's checks and exact path decide); 3 a result is not finite (the caller's
// selecting path reruns).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "simd.h"

namespace {

constexpr float kDecLog2e = 1.4426950408889634f;
constexpr float kDecLn2 = 0.6931471805599453f;
constexpr int64_t kDecMaxRows = 64;  // rows of one item (rounded up to 4)
constexpr int64_t kDecChunk = 128;   // keys per online-softmax step
constexpr int64_t kDecMaxDim = 512;

// Lane i of the result is the sum of the 16 lanes of v[i] (a transposing reduction tree).
inline __m512 dec_reduce16(__m512 v[16]) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // z's lane 4 L + e holds v[L + 4 e]: put v[p] at lane p.
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(idx, z);
}

// S[r][j] = q[r] . k[j] for 4 rows (local, row stride D) and 4 keys (pointers), into S (row stride C).
inline void dec_scores_4x4(const float* q, const float* const* kr, int64_t nd, int64_t D, float* s, int64_t C,
                           const float* const* next) {
  if (next)  // the rows of the keys after these (their first lines; the hardware follows the rest)
    for (int j = 0; j < 4; ++j) _mm_prefetch((const char*)next[j], _MM_HINT_T0);
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < nd; ++d) {
    __m512 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = _mm512_loadu_ps(kr[j] + 16 * d);
    for (int r = 0; r < 4; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * D + 16 * d);
      for (int j = 0; j < 4; ++j) acc[4 * r + j] = _mm512_fmadd_ps(qv, kv[j], acc[4 * r + j]);
    }
  }
  const __m512 sum = dec_reduce16(acc);
  for (int r = 0; r < 4; ++r) _mm_storeu_ps(s + r * C, _mm512_extractf32x4_ps(sum, r));
}

// o[r] += sum_j p[r][j] * v[j] for 4 rows and NV 16-wide dim blocks starting at dim block d0.
template <int NV>
inline void dec_pv_4(const float* p, int64_t C, int64_t nj, const float* const* vr, int64_t d0, float* o, int64_t D) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; ++r)
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_loadu_ps(o + r * D + 16 * (d0 + n));
  for (int64_t j = 0; j < nj; ++j) {
    __m512 vv[NV];
    for (int n = 0; n < NV; ++n) vv[n] = _mm512_loadu_ps(vr[j] + 16 * (d0 + n));
    for (int r = 0; r < 4; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * C + j]);
      for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_fmadd_ps(w, vv[n], acc[r][n]);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int n = 0; n < NV; ++n) _mm512_storeu_ps(o + r * D + 16 * (d0 + n), acc[r][n]);
}

inline void dec_pv(const float* p, int64_t C, int64_t nj, const float* const* vr, int64_t nd, float* o, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 4 <= nd; d0 += 4) dec_pv_4<4>(p, C, nj, vr, d0, o, D);
  switch (nd - d0) {
    case 3: dec_pv_4<3>(p, C, nj, vr, d0, o, D); break;
    case 2: dec_pv_4<2>(p, C, nj, vr, d0, o, D); break;
    case 1: dec_pv_4<1>(p, C, nj, vr, d0, o, D); break;
    default: break;
  }
}

struct DecArgs {
  const float* q;
  int64_t qsb, qsh, qsi;
  const float* k;
  const float* v;
  int64_t ksp, ksh, ksr, vsp, vsh, vsr;
  int64_t ps, n_pages;
  const int64_t* table;
  int64_t tstride;
  float* out;
  float* lse;
  int64_t H, Lq, D, Hkv;
  const int64_t* tiles;
  const int64_t* runs;
  const uint8_t* masks;
  float scale;
};

struct DecItem {
  int64_t tile, kvh, j0, j1, slot;  // keys j0 .. j1 of the tile's list; slot: partial result (-1: final)
};

// Per-thread buffers for items of at most rp rows (a multiple of 4); only ``zeros`` is initialised.
struct DecScratch {
  std::unique_ptr<float[]> q, o, s, m, l, ro, rl;
  std::vector<const float*> kr, vr;
  std::vector<float> zeros;
  DecScratch(int64_t D, int64_t rp)
      : q(new float[rp * D]), o(new float[rp * D]), s(new float[rp * kDecChunk]), m(new float[rp]),
        l(new float[rp]), ro(new float[rp * D]), rl(new float[rp]), kr(kDecChunk), vr(kDecChunk), zeros(D, 0.0f) {}
};

// One item: online softmax over its keys. Writes o (normalised) and lse2 (base 2) of its R rows into
// dst_o [R][D] / dst_l [R]. Returns 0, or 2 when a page is not held or out of the cache.
int dec_item(const DecArgs& a, const DecItem& it, DecScratch& sc, float* dst_o, float* dst_l) {
  const int64_t* t = a.tiles + 8 * it.tile;
  const int64_t b = t[0], i0 = t[1], n = t[2], run_lo = t[3], run_hi = t[4], mask_off = t[5], mask_heads = t[6],
                nk = t[7];
  const int64_t G = a.H / a.Hkv, R = G * n, Rp = (R + 3) / 4 * 4, D = a.D, nd = D / 16;
  const float mul = a.scale * kDecLog2e;
  // Rows r = g * n + ii: query head h = kvh * G + g, row i0 + ii (scaled to base 2); padding rows are zero.
  for (int64_t r = 0; r < Rp; ++r) {
    float* dst = sc.q.get() + r * D;
    if (r >= R) {
      std::fill(dst, dst + D, 0.0f);
      continue;
    }
    const int64_t h = it.kvh * G + r / n, i = i0 + r % n;
    const float* src = a.q + b * a.qsb + h * a.qsh + i * a.qsi;
    for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * mul;
  }
  std::fill(sc.o.get(), sc.o.get() + Rp * D, 0.0f);
  std::fill(sc.m.get(), sc.m.get() + Rp, -std::numeric_limits<float>::infinity());
  std::fill(sc.l.get(), sc.l.get() + Rp, 0.0f);
  const uint8_t* mrow[kDecMaxRows];
  for (int64_t r = 0; r < R; ++r) {
    if (mask_off < 0) {
      mrow[r] = nullptr;
      continue;
    }
    const int64_t h = it.kvh * G + r / n, ii = r % n;
    mrow[r] = a.masks + mask_off + ((mask_heads > 1 ? h * n : 0) + ii) * nk;
  }
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // Walk the runs to key j0 of the tile's list.
  int64_t run = run_lo, before = 0;
  while (run < run_hi && before + (a.runs[2 * run + 1] - a.runs[2 * run]) <= it.j0) {
    before += a.runs[2 * run + 1] - a.runs[2 * run];
    ++run;
  }
  int64_t pos = a.runs[2 * run] + (it.j0 - before);
  const int64_t* trow = a.table + b * a.tstride;
  for (int64_t c0 = it.j0; c0 < it.j1; c0 += kDecChunk) {
    const int64_t nj = std::min(kDecChunk, it.j1 - c0), njp = (nj + 15) / 16 * 16;
    const int64_t C = njp;
    for (int64_t j = 0; j < nj;) {
      while (pos >= a.runs[2 * run + 1]) {
        ++run;
        pos = a.runs[2 * run];
      }
      // The rest of this page within the run and the chunk: one table read, rows by stride.
      const int64_t page = trow[pos / a.ps], off = pos % a.ps;
      if (page < 0 || page >= a.n_pages) return 2;
      const int64_t m = std::min({a.ps - off, a.runs[2 * run + 1] - pos, nj - j});
      const float* kp = a.k + page * a.ksp + it.kvh * a.ksh + off * a.ksr;
      const float* vp = a.v + page * a.vsp + it.kvh * a.vsh + off * a.vsr;
      for (int64_t i = 0; i < m; ++i) {
        sc.kr[j + i] = kp + i * a.ksr;
        sc.vr[j + i] = vp + i * a.vsr;
      }
      j += m;
      pos += m;
    }
    for (int64_t j = nj; j < njp; ++j) sc.kr[j] = sc.vr[j] = sc.zeros.data();
    float* s = sc.s.get();
    for (int64_t r0 = 0; r0 < Rp; r0 += 4)
      for (int64_t j = 0; j < njp; j += 4)
        dec_scores_4x4(sc.q.get() + r0 * D, sc.kr.data() + j, nd, D, s + r0 * C + j, C,
                       r0 == 0 && j + 8 <= njp ? sc.kr.data() + j + 4 : nullptr);
    for (int64_t r = 0; r < R; ++r) {
      float* sr = s + r * C;
      const uint8_t* mk = mrow[r] ? mrow[r] + c0 : nullptr;
      __m512 mx = ninf;
      for (int64_t j = 0; j < njp; j += 16) {
        __mmask16 keep = j + 16 <= nj ? (__mmask16)0xFFFF : (__mmask16)((1u << (nj - j)) - 1u);
        if (mk) {
          __mmask16 allowed;
          if (j + 16 <= nj) {
            allowed = _mm_cmpneq_epi8_mask(_mm_loadu_si128((const __m128i*)(mk + j)), _mm_setzero_si128());
          } else {
            allowed = _mm_mask_cmpneq_epi8_mask(keep, _mm_maskz_loadu_epi8(keep, mk + j), _mm_setzero_si128());
          }
          keep &= allowed;
        }
        const __m512 x = _mm512_mask_blend_ps(keep, ninf, _mm512_loadu_ps(sr + j));
        _mm512_storeu_ps(sr + j, x);
        mx = _mm512_max_ps(mx, x);
      }
      const float m_old = sc.m[r];
      const float m_new = std::max(m_old, _mm512_reduce_max_ps(mx));
      if (m_new == -std::numeric_limits<float>::infinity()) {
        std::fill(sr, sr + C, 0.0f);  // nothing allowed yet: zero weights, o stays zero
        continue;
      }
      const float alpha = m_old == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp2(m_old - m_new);
      const __m512 mv = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < njp; j += 16) {
        const __m512 x = _mm512_loadu_ps(sr + j);
        const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
        const __m512 e = pdsl_simd::exp2_ps(_mm512_sub_ps(_mm512_maskz_mov_ps(live, x), mv));
        const __m512 p = _mm512_maskz_mov_ps(live, e);
        _mm512_storeu_ps(sr + j, p);
        sum = _mm512_add_ps(sum, p);
      }
      sc.l[r] = sc.l[r] * alpha + _mm512_reduce_add_ps(sum);
      sc.m[r] = m_new;
      if (alpha != 1.0f) {
        float* orow = sc.o.get() + r * D;
        const __m512 av = _mm512_set1_ps(alpha);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(av, _mm512_loadu_ps(orow + d)));
      }
    }
    for (int64_t r = R; r < Rp; ++r) std::fill(s + r * C, s + r * C + C, 0.0f);
    for (int64_t r0 = 0; r0 < Rp; r0 += 4) dec_pv(s + r0 * C, C, nj, sc.vr.data(), nd, sc.o.get() + r0 * D, D);
  }
  for (int64_t r = 0; r < R; ++r) {
    const float l = sc.l[r];
    float* od = dst_o + r * D;
    const float* os = sc.o.get() + r * D;
    if (l > 0.0f) {
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < D; ++d) od[d] = os[d] * inv;
      dst_l[r] = sc.m[r] + std::log2(l);
    } else {
      std::fill(od, od + D, 0.0f);
      dst_l[r] = -std::numeric_limits<float>::infinity();
    }
  }
  return 0;
}

// Row r of an item (tile, kvh) in the output: (b, h, i).
inline int64_t dec_out_row(const DecArgs& a, const int64_t* t, int64_t kvh, int64_t r) {
  const int64_t G = a.H / a.Hkv, n = t[2];
  return (t[0] * a.H + kvh * G + r / n) * a.Lq + t[1] + r % n;
}

bool dec_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}


// See the header comment. min_split: fewest keys of a split.
int decode_call(const float* q, int64_t qsb, int64_t qsh, int64_t qsi, const float* k, const float* v, int64_t ksp,
                int64_t ksh, int64_t ksr, int64_t vsp, int64_t vsh, int64_t vsr, int64_t ps, int64_t n_pages,
                const int64_t* table, int64_t tstride, const int64_t* kv_lengths, int64_t batch, float* out,
                float* lse, int64_t H, int64_t Lq, int64_t D, int64_t Hkv, int64_t n_tiles, const int64_t* tiles,
                const int64_t* runs, const uint8_t* masks, float scale, int64_t min_split, int threads) {
  if (D % 16 || D < 16 || D > kDecMaxDim || Hkv < 1 || H % Hkv || ps < 1 || min_split < 1 || threads < 1) return 1;
  int64_t rp = 4;  // rows of the largest item, rounded up to 4
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t rows = (H / Hkv) * tiles[8 * t + 2];
    if (rows > kDecMaxRows || rows < 1 || tiles[8 * t + 7] < 1) return 1;
    rp = std::max(rp, (rows + 3) / 4 * 4);
  }
  const DecArgs a{q, qsb, qsh, qsi, k, v, ksp, ksh, ksr, vsp, vsh, vsr, ps, n_pages, table, tstride,
                  out, lse, H, Lq, D, Hkv, tiles, runs, masks, scale};
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t held = (kv_lengths[b] + ps - 1) / ps;
    if (kv_lengths[b] < 0 || held > tstride) return 2;
    for (int64_t p = 0; p < held; ++p)
      if (table[b * tstride + p] < -1 || table[b * tstride + p] >= n_pages) return 2;
  }
  int64_t total = 0;
  for (int64_t t = 0; t < n_tiles; ++t) total += tiles[8 * t + 7] * Hkv;
  // Splits: enough items for every thread (a few each, for balance), none shorter than min_split keys.
  const int64_t want = std::max<int64_t>(min_split, total / (2 * threads) + 1);
  std::vector<DecItem> items;
  std::vector<int64_t> first;  // per (tile, kv head): its first item; splits are consecutive
  int64_t slots = 0;
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t nk = tiles[8 * t + 7];
    const int64_t parts = std::max<int64_t>(1, nk / want);
    for (int64_t h = 0; h < Hkv; ++h) {
      first.push_back((int64_t)items.size());
      for (int64_t s = 0; s < parts; ++s) {
        const int64_t j0 = nk * s / parts, j1 = nk * (s + 1) / parts;
        items.push_back({t, h, j0, j1, parts > 1 ? slots++ : -1});
      }
    }
  }
  first.push_back((int64_t)items.size());
  const int64_t G = H / Hkv, nitems = (int64_t)items.size(), ngroups = n_tiles * Hkv;
  std::vector<float> part_o(slots * rp * D), part_l(slots * rp);
  std::atomic<int> code{0};
  const int nt = (int)std::min<int64_t>(threads, nitems);
  auto run_item = [&](DecScratch& sc, int64_t i) {
    float *row_o = sc.ro.get(), *row_l = sc.rl.get();
    const DecItem& it = items[i];
    const int64_t* t = tiles + 8 * it.tile;
    float* dst_o = it.slot >= 0 ? part_o.data() + it.slot * rp * D : row_o;
    float* dst_l = it.slot >= 0 ? part_l.data() + it.slot * rp : row_l;
    const int rc = dec_item(a, it, sc, dst_o, dst_l);
    if (rc) {
      code.store(rc);
      return;
    }
    if (it.slot >= 0) return;
    const int64_t R = G * t[2];
    for (int64_t r = 0; r < R; ++r) {
      const int64_t row = dec_out_row(a, t, it.kvh, r);
      std::copy(dst_o + r * D, dst_o + (r + 1) * D, out + row * D);
      lse[row] = dst_l[r] * kDecLn2;
      if (!dec_finite(out + row * D, D) || std::isnan(lse[row])) code.store(3);
    }
  };
  auto merge = [&](int64_t g) {
    const int64_t i0 = first[g], i1 = first[g + 1];
    if (i1 - i0 < 2) return;
    const DecItem& it = items[i0];
    const int64_t* t = tiles + 8 * it.tile;
    const int64_t R = G * t[2];
    for (int64_t r = 0; r < R; ++r) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = i0; i < i1; ++i) mx = std::max(mx, part_l[items[i].slot * rp + r]);
      const int64_t row = dec_out_row(a, t, it.kvh, r);
      float* od = out + row * D;
      std::fill(od, od + D, 0.0f);
      if (mx == -std::numeric_limits<float>::infinity()) {
        lse[row] = -std::numeric_limits<float>::infinity();
        continue;
      }
      float den = 0.0f;
      for (int64_t i = i0; i < i1; ++i) {
        const float w = std::exp2(part_l[items[i].slot * rp + r] - mx);
        if (w == 0.0f) continue;
        den += w;
        const float* os = part_o.data() + (items[i].slot * rp + r) * D;
        for (int64_t d = 0; d < D; ++d) od[d] += w * os[d];
      }
      for (int64_t d = 0; d < D; ++d) od[d] /= den;
      lse[row] = (mx + std::log2(den)) * kDecLn2;
      if (!dec_finite(od, D) || std::isnan(lse[row])) code.store(3);
    }
  };
  if (nt <= 1) {
    DecScratch sc(D, rp);
    for (int64_t i = 0; i < nitems && !code.load(); ++i) run_item(sc, i);
    for (int64_t g = 0; g < ngroups && !code.load(); ++g) merge(g);
    return code.load();
  }
#pragma omp parallel num_threads(nt)
  {
    DecScratch sc(D, rp);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < nitems; ++i)
      if (!code.load(std::memory_order_relaxed)) run_item(sc, i);
    if (slots) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < ngroups; ++g) merge(g);
    }
  }
  return code.load();
}

}  // namespace

extern "C" {

// The arguments of decode_call as one block (ctypes converts one pointer instead of 31 arguments, ~1 us
// each on a loaded machine): 30 int64 (pointers as integers) in decode_call's order, then scale as a double.
int pdsl_decode(const int64_t* a) {
  double scale;
  std::memcpy(&scale, a + 30, sizeof scale);
  auto f = [a](int i) { return reinterpret_cast<const float*>(a[i]); };
  return decode_call(f(0), a[1], a[2], a[3], f(4), f(5), a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13],
                     reinterpret_cast<const int64_t*>(a[14]), a[15], reinterpret_cast<const int64_t*>(a[16]), a[17],
                     reinterpret_cast<float*>(a[18]), reinterpret_cast<float*>(a[19]), a[20], a[21], a[22], a[23],
                     a[24], reinterpret_cast<const int64_t*>(a[25]), reinterpret_cast<const int64_t*>(a[26]),
                     reinterpret_cast<const uint8_t*>(a[27]), (float)scale, a[28], (int)a[29]);
}

}  // extern "C"
