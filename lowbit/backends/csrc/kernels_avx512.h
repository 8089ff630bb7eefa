// AVX-512 (F, BW, VL, VBMI) versions of the GEMV and dequantization in kernels.h, on the same
// packed layout: a tile's four row vectors of 8 rows are contiguous, so one 64-byte zmm load covers
// 16 rows (two row vectors; int3: 48 bytes spread to 16 lanes by one byte permute, VBMI's vpermb),
// and the scales of those 16 rows are contiguous too. Same arithmetic as the AVX2 path (every
// code * x product exact, one accumulation per group folded with the group's scale), so the two
// differ by float summation order only.
//
// Only the functions defined between the target pragmas below are compiled for AVX-512; everything
// else in the module (torch, the standard library, the AVX2 kernels) keeps the module's AVX2 flags,
// so nothing AVX-512 runs unless the binding dispatched here after checking the CPU.

#pragma once

#include "kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi")
// GCC 12 warns about the intrinsics' own _mm512_undefined_ps() placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace avx512 {

constexpr int ZR = 16;        // rows per zmm
constexpr int NZ = TR / ZR;   // zmm row vectors per tile

// Accumulators per (zmm row vector, activation row) for one activation row: 2 row vectors x NACC1
// independent FMA chains hide the FMA latency.
#ifndef LOWBIT_NACC512
#define LOWBIT_NACC512 4
#endif

// A local unrolling helper: the lambdas it calls carry this region's target, and a helper
// defined outside the region (kernels.h's static_for) could not inline them.
template <typename Fn, int... I>
LOWBIT_INLINE void static_for_impl512(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
LOWBIT_INLINE void static_for512(Fn&& fn) {
  static_for_impl512(fn, std::make_integer_sequence<int, N>{});
}

// 16 rows' 32-bit lanes from two consecutive row vectors at p.
template <int BITS>
LOWBIT_INLINE __m512i load_zvec(const uint8_t* p) {
  if constexpr (BITS == 3) {
    // Rows r = 0..15 sit at bytes 3r..3r+2: one byte permute spreads them to 4-byte lanes. The top
    // byte of each lane is garbage: int3 masks never reach bit 24. Reads 16 bytes past the 48: the
    // stream always continues there (next chunk, scales or the end pad).
    const __m512i idx = _mm512_set_epi8(47, 47, 46, 45, 44, 44, 43, 42, 41, 41, 40, 39, 38, 38, 37, 36,
                                        35, 35, 34, 33, 32, 32, 31, 30, 29, 29, 28, 27, 26, 26, 25, 24,
                                        23, 23, 22, 21, 20, 20, 19, 18, 17, 17, 16, 15, 14, 14, 13, 12,
                                        11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0);
    return _mm512_permutexvar_epi8(idx, _mm512_loadu_si512((const void*)p));
  } else {
    return _mm512_loadu_si512((const void*)p);
  }
}

// 1- and 2-bit codes are decoded by table: a float permute picks lane values from a 16-entry table by
// the low 4 bits of each lane, so one shift serves the 2 (int2) or 4 (int1) codes of a nibble and
// each code costs one permute instead of a mask and a conversion. Those codes come out plain (not
// scaled by their position), so their activations are prepared unscaled (prep_x_rows' raw).
constexpr bool by_table(int bits) { return bits <= 2; }

struct DecodeTables {
  alignas(64) float t[4][16];  // t[r][i]: code r of nibble i
  constexpr DecodeTables(int bits) : t() {
    for (int r = 0; r < 4; ++r)
      for (int i = 0; i < 16; ++i) t[r][i] = (float)((i >> (bits * r)) & ((1 << bits) - 1));
  }
};
inline constexpr DecodeTables kTab2{2}, kTab1{1};

// Code of step s as float, times 2^xexp_of(BITS, s) (see kernels.h); by_table(BITS): the plain code.
template <int BITS, int s>
LOWBIT_INLINE __m512 decode_scaled(__m512i v, const __m512* tab) {
  if constexpr (by_table(BITS)) {
    constexpr int per = 4 / BITS, j = s / per, r = s % per;
    const __m512i idx = j == 0 ? v : _mm512_srli_epi32(v, 4 * j);
    return _mm512_permutexvar_ps(idx, tab[r]);
  } else if constexpr (top_of(BITS, s)) {
    return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, pos_of(BITS, s)));
  } else {
    // The mask becomes an embedded broadcast from memory: no register held per step.
    return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)(((1u << BITS) - 1) << pos_of(BITS, s)))));
  }
}

template <int BITS, int s>
LOWBIT_INLINE __m512 decode_plain(__m512i v) {
  __m512i q = _mm512_srli_epi32(v, pos_of(BITS, s));
  if constexpr (!top_of(BITS, s)) q = _mm512_and_si512(q, _mm512_set1_epi32((1 << BITS) - 1));
  return _mm512_cvtepi32_ps(q);
}

// Scales of rows [r0, r0 + 16) of the group scale block at sp (see kernels.h's load_scales).
LOWBIT_INLINE void load_scales(const Layout& L, const uint8_t* sp, int r0, __m512& sc, __m512& bz) {
  if (L.sb == 2) {
    const uint16_t* h = (const uint16_t*)sp;
    sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + r0)));
    const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + TR + r0)));
    bz = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(sc, z)),
                                              _mm512_set1_epi32((int)0x80000000u)));
  } else {
    const float* f = (const float*)sp;
    sc = _mm512_loadu_ps(f + r0);
    bz = _mm512_loadu_ps(f + TR + r0);
  }
}

// MT activation rows against the whole tile (both zmm row vectors).
template <int BITS, int MT>
void gemv_tile(const Layout& L, const GemvArgs& a) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS);
  constexpr int NACC = MT == 1 ? LOWBIT_NACC512 : (MT == 2 ? 2 : 1);
  __m512 acc[MT][NZ][NACC], tot[MT][NZ];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < NZ; ++u) tot[m][u] = _mm512_setzero_ps();

  __m512 tab[4];
  if constexpr (by_table(BITS))
    for (int r = 0; r < 4; ++r) tab[r] = _mm512_load_ps((BITS == 2 ? kTab2 : kTab1).t[r]);

  const uint8_t* p = a.tile;
  const float* xk = a.xp;
  for (int64_t g = 0; g < L.ngp; ++g) {
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < NZ; ++u)
        for (int j = 0; j < NACC; ++j) acc[m][u][j] = _mm512_setzero_ps();
    auto chunk = [&](const uint8_t* cp, const float* cx) LOWBIT_LAMBDA_INLINE {
      if constexpr (LOWBIT_PF > 0) {
        _mm_prefetch((const char*)(cp + LOWBIT_PF), _MM_HINT_T0);
        _mm_prefetch((const char*)(cp + LOWBIT_PF + 64), _MM_HINT_T0);
      }
      __m512i w[NZ];
      for (int u = 0; u < NZ; ++u) w[u] = load_zvec<BITS>(cp + u * 2 * VB);
      static_for512<P>([&](auto sc) LOWBIT_LAMBDA_INLINE {
        constexpr int s = decltype(sc)::value;
        __m512 q[NZ];
        for (int u = 0; u < NZ; ++u) q[u] = decode_scaled<BITS, s>(w[u], tab);
        for (int m = 0; m < MT; ++m) {
          const __m512 xb = _mm512_set1_ps(cx[s * MT + m]);
          for (int u = 0; u < NZ; ++u) acc[m][u][s % NACC] = _mm512_fmadd_ps(q[u], xb, acc[m][u][s % NACC]);
        }
      });
    };
    int64_t c = 0;
    if constexpr (P < 8) {
      for (; c + 2 <= L.cpg; c += 2, p += 2 * NVT * VB, xk += 2 * P * MT) {
        chunk(p, xk);
        chunk(p + NVT * VB, xk + P * MT);
      }
    }
    for (; c < L.cpg; ++c, p += NVT * VB, xk += P * MT) chunk(p, xk);
    if constexpr (LOWBIT_PF > 0) {
      for (int64_t l = 0; l < L.scale_bytes(); l += 64) _mm_prefetch((const char*)(p + LOWBIT_PF + l), _MM_HINT_T0);
    }
    for (int u = 0; u < NZ; ++u) {
      __m512 sc, bz;
      load_scales(L, p, u * ZR, sc, bz);
      for (int m = 0; m < MT; ++m) {
        __m512 sum = acc[m][u][0];
        for (int j = 1; j < NACC; ++j) sum = _mm512_add_ps(sum, acc[m][u][j]);
        tot[m][u] = _mm512_fmadd_ps(sum, sc, tot[m][u]);
        tot[m][u] = _mm512_fmadd_ps(bz, _mm512_set1_ps(a.xs[g * MT + m]), tot[m][u]);
      }
    }
    p += L.scale_bytes();
  }

  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + m * L.n;
    for (int u = 0; u < NZ; ++u) {
      const int r0 = u * ZR;
      if (r0 >= a.nvalid) break;
      const int cnt = a.nvalid - r0 < ZR ? a.nvalid - r0 : ZR;
      const __mmask16 k = (__mmask16)((1u << cnt) - 1);
      __m512 out = tot[m][u];
      if (a.bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(k, a.bias + r0));
      _mm512_mask_storeu_ps(yr + r0, k, out);
    }
  }
}

template <int BITS>
void gemv_tiles_t(const Layout& L, const uint8_t* qw, const float* xp, const float* xs, int64_t M,
                  const float* bias, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    GemvArgs a;
    a.tile = qw + L.tile_offset(t);
    a.bias = bias ? bias + t * TR : nullptr;
    a.nvalid = (int)(L.n - t * TR < TR ? L.n - t * TR : TR);
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      a.xp = xp + m0 * L.kp;
      a.xs = xs + m0 * L.ngp;
      a.y = y + m0 * L.n + t * TR;
      switch (M - m0 < MT_MAX ? M - m0 : MT_MAX) {
        case 1: avx512::gemv_tile<BITS, 1>(L, a); break;
        case 2: avx512::gemv_tile<BITS, 2>(L, a); break;
        case 3: avx512::gemv_tile<BITS, 3>(L, a); break;
        case 4: avx512::gemv_tile<BITS, 4>(L, a); break;
      }
    }
  }
}

// Same contract as lowbit::gemv_tiles, with xp prepared raw when by_table(L.bits).
inline void gemv_tiles(const Layout& L, const uint8_t* qw, const float* xp, const float* xs, int64_t M,
                       const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (L.bits) {
    case 8: avx512::gemv_tiles_t<8>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 4: avx512::gemv_tiles_t<4>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 3: avx512::gemv_tiles_t<3>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 2: avx512::gemv_tiles_t<2>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 1: avx512::gemv_tiles_t<1>(L, qw, xp, xs, M, bias, y, t0, t1); break;
  }
}

// ---------------------------------------------------------------------------------------------
// 1-, 2- and 3-bit codes for a few activation rows, by partial-sum tables. Each 4-bit window of a
// lane's codes (bits 4t..4t+3) touches the codes of at most 4 (int1), 2 (int2) or 2 (int3, some
// split across windows) columns; a table of the 16 values sum_r coef_r(i) * x[column r] per window,
// built once per call for all rows of W, turns one float permute and one add into the window's
// whole contribution: per lane of codes, 8 windows (int3: 6) take one shift, permute and add each
// instead of a mask, conversion and FMA per code (16 / 32 / 8 codes). coef_r(i) is the part of
// code r that window value i holds (int3: the bits of a code split across two windows, times their
// place value), so every term is an exact product of a small integer and x; the sums are rounded
// in a fixed order.

// 3-bit codes stay on the per-code path for now: their tables (6 per 8 columns) streamed from L2 for
// every tile slowed the DRAM-bound decode (measured 0.8x of AVX2 single-threaded) though they win in cache.
constexpr bool by_lut(int bits) { return bits <= 2; }
constexpr int lut_windows(int bits) { return bits == 3 ? 6 : 8; }  // 4-bit windows per lane

// Tables per chunk of P columns: lut_windows * 16 floats per activation row.
inline int64_t lut_floats(const Layout& L, int64_t M) { return L.kp / L.P * lut_windows(L.bits) * M * 16; }

// Tables for M <= MT_MAX activation rows from xp, their unscaled copies by prep_x_rows (raw; [kp][M],
// zero past k): lut[c][t][m][i] for window t of chunk c (columns c * P ..).
inline void prep_lut(const Layout& L, const float* xp, int64_t M, float* lut) {
  const int bits = L.bits, P = L.P, nw = lut_windows(bits);
  // coef[t][r]: the code-r part of window value i, for the codes r a window touches (first, count).
  __m512 coef[8][4];
  int first[8], count[8];
  for (int t = 0; t < nw; ++t) {
    first[t] = 4 * t / bits;
    count[t] = (4 * t + 3) / bits - first[t] + 1;
    for (int r = 0; r < count[t]; ++r) {
      alignas(64) float c[16];
      const int code = first[t] + r;
      for (int i = 0; i < 16; ++i) {
        int v = 0;
        for (int j = 0; j < 4; ++j) {
          const int b = 4 * t + j;
          if (b / bits == code) v += ((i >> j) & 1) << (b - bits * code);
        }
        c[i] = (float)v;
      }
      coef[t][r] = _mm512_load_ps(c);
    }
  }
  const int64_t nc = L.kp / P;
  for (int64_t ch = 0; ch < nc; ++ch) {
    for (int t = 0; t < nw; ++t) {
      for (int64_t m = 0; m < M; ++m) {
        const float* xk = xp + (ch * P + first[t]) * M + m;
        // Products exact: each fused multiply-add rounds one sum.
        __m512 v = _mm512_mul_ps(coef[t][0], _mm512_set1_ps(xk[0]));
        if (count[t] >= 2) v = _mm512_fmadd_ps(coef[t][1], _mm512_set1_ps(xk[M]), v);
        if (count[t] == 4) {
          const __m512 hi =
              _mm512_fmadd_ps(coef[t][3], _mm512_set1_ps(xk[3 * M]), _mm512_mul_ps(coef[t][2], _mm512_set1_ps(xk[2 * M])));
          v = _mm512_add_ps(v, hi);
        }
        _mm512_storeu_ps(lut + ((ch * nw + t) * M + m) * 16, v);
      }
    }
  }
}

// MT activation rows (a.xp: their tables from prep_lut) against the whole tile.
template <int BITS, int MT>
void gemv_tile_lut(const Layout& L, const GemvArgs& a) {
  constexpr int VB = vec_bytes(BITS), NIB = lut_windows(BITS);
  constexpr int NACC = MT == 1 ? LOWBIT_NACC512 : (MT == 2 ? 2 : 1);
  __m512 acc[MT][NZ][NACC], tot[MT][NZ];
  for (int m = 0; m < MT; ++m)
    for (int u = 0; u < NZ; ++u) tot[m][u] = _mm512_setzero_ps();

  const uint8_t* p = a.tile;
  const float* tb = a.xp;
  for (int64_t g = 0; g < L.ngp; ++g) {
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < NZ; ++u)
        for (int j = 0; j < NACC; ++j) acc[m][u][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < L.cpg; ++c, p += NVT * VB, tb += NIB * MT * 16) {
      if constexpr (LOWBIT_PF > 0) {
        _mm_prefetch((const char*)(p + LOWBIT_PF), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + LOWBIT_PF + 64), _MM_HINT_T0);
      }
      __m512i w[NZ];
      for (int u = 0; u < NZ; ++u) w[u] = load_zvec<BITS>(p + u * 2 * VB);
      static_for512<NIB>([&](auto tc) LOWBIT_LAMBDA_INLINE {
        constexpr int t = decltype(tc)::value;
        __m512i idx[NZ];
        for (int u = 0; u < NZ; ++u) idx[u] = t == 0 ? w[u] : _mm512_srli_epi32(w[u], 4 * t);
        for (int m = 0; m < MT; ++m) {
          const __m512 T = _mm512_loadu_ps(tb + (t * MT + m) * 16);
          for (int u = 0; u < NZ; ++u)
            acc[m][u][t % NACC] = _mm512_add_ps(acc[m][u][t % NACC], _mm512_permutexvar_ps(idx[u], T));
        }
      });
    }
    if constexpr (LOWBIT_PF > 0) {
      for (int64_t l = 0; l < L.scale_bytes(); l += 64) _mm_prefetch((const char*)(p + LOWBIT_PF + l), _MM_HINT_T0);
    }
    for (int u = 0; u < NZ; ++u) {
      __m512 sc, bz;
      load_scales(L, p, u * ZR, sc, bz);
      for (int m = 0; m < MT; ++m) {
        __m512 sum = acc[m][u][0];
        for (int j = 1; j < NACC; ++j) sum = _mm512_add_ps(sum, acc[m][u][j]);
        tot[m][u] = _mm512_fmadd_ps(sum, sc, tot[m][u]);
        tot[m][u] = _mm512_fmadd_ps(bz, _mm512_set1_ps(a.xs[g * MT + m]), tot[m][u]);
      }
    }
    p += L.scale_bytes();
  }

  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + m * L.n;
    for (int u = 0; u < NZ; ++u) {
      const int r0 = u * ZR;
      if (r0 >= a.nvalid) break;
      const int cnt = a.nvalid - r0 < ZR ? a.nvalid - r0 : ZR;
      const __mmask16 k = (__mmask16)((1u << cnt) - 1);
      __m512 out = tot[m][u];
      if (a.bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(k, a.bias + r0));
      _mm512_mask_storeu_ps(yr + r0, k, out);
    }
  }
}

template <int BITS, int MT>
void gemv_tiles_lut_t(const Layout& L, const uint8_t* qw, const float* lut, const float* xs, const float* bias,
                      float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    GemvArgs a;
    a.tile = qw + L.tile_offset(t);
    a.bias = bias ? bias + t * TR : nullptr;
    a.nvalid = (int)(L.n - t * TR < TR ? L.n - t * TR : TR);
    a.xp = lut;
    a.xs = xs;
    a.y = y + t * TR;
    avx512::gemv_tile_lut<BITS, MT>(L, a);
  }
}

// GEMV of M <= MT_MAX rows of 1-, 2- or 3-bit weights from prep_lut's tables (xs from prep_x_rows).
inline void gemv_tiles_lut(const Layout& L, const uint8_t* qw, const float* lut, const float* xs, int64_t M,
                           const float* bias, float* y, int64_t t0, int64_t t1) {
#define LOWBIT_LUT_CASE(B, MT) avx512::gemv_tiles_lut_t<B, MT>(L, qw, lut, xs, bias, y, t0, t1)
#define LOWBIT_LUT_BITS(B)         \
  switch (M) {                     \
    case 1: LOWBIT_LUT_CASE(B, 1); break; \
    case 2: LOWBIT_LUT_CASE(B, 2); break; \
    case 3: LOWBIT_LUT_CASE(B, 3); break; \
    case 4: LOWBIT_LUT_CASE(B, 4); break; \
  }
  switch (L.bits) {
    case 3: LOWBIT_LUT_BITS(3); break;
    case 2: LOWBIT_LUT_BITS(2); break;
    case 1: LOWBIT_LUT_BITS(1); break;
  }
#undef LOWBIT_LUT_BITS
#undef LOWBIT_LUT_CASE
}

template <int BITS>
void dequant_t_tiles_t(const Layout& L, const uint8_t* qw, int64_t t0, int64_t t1, float* wt, int64_t ldw) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = qw + L.tile_offset(t);
    float* wc = wt + (t - t0) * TR;
    for (int64_t g = 0; g < L.ngp; ++g) {
      __m512 sc[NZ], bz[NZ];
      for (int u = 0; u < NZ; ++u) load_scales(L, p + L.cpg * NVT * VB, u * ZR, sc[u], bz[u]);
      for (int64_t c = 0; c < L.cpg; ++c, p += NVT * VB) {
        float* wk = wc + (g * L.geff + c * P) * ldw;
        for (int u = 0; u < NZ; ++u) {
          const __m512i w = load_zvec<BITS>(p + u * 2 * VB);
          static_for512<P>([&](auto sci) LOWBIT_LAMBDA_INLINE {
            constexpr int s = decltype(sci)::value;
            _mm512_storeu_ps(wk + s * ldw + u * ZR, _mm512_fmadd_ps(decode_plain<BITS, s>(w), sc[u], bz[u]));
          });
        }
      }
      p += L.scale_bytes();
    }
  }
}

// Same contract as lowbit::dequant_t_tiles.
inline void dequant_t_tiles(const Layout& L, const uint8_t* qw, int64_t t0, int64_t t1, float* wt,
                            int64_t ldw) {
  switch (L.bits) {
    case 8: avx512::dequant_t_tiles_t<8>(L, qw, t0, t1, wt, ldw); break;
    case 4: avx512::dequant_t_tiles_t<4>(L, qw, t0, t1, wt, ldw); break;
    case 3: avx512::dequant_t_tiles_t<3>(L, qw, t0, t1, wt, ldw); break;
    case 2: avx512::dequant_t_tiles_t<2>(L, qw, t0, t1, wt, ldw); break;
    case 1: avx512::dequant_t_tiles_t<1>(L, qw, t0, t1, wt, ldw); break;
  }
}

}  // namespace avx512
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
