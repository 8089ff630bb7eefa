// GEMV with int8 activations on the packed layout of kernels.h: integer dot products (AVX2's
// vpmaddubsw, AVX-512 VNNI's vpdpbusd) instead of a float multiply-add per weight, as llama.cpp's
// Q8 dot products do. For decode, where the float GEMV spends more instructions per weight byte than
// the memory system leaves it time for.
//
// Activations: each row of x is cut into blocks of QB = 32 columns (of the padded K); a block is
// rounded to int8 codes q = round(x * 127 / max|x|) with step sx = max|x| / 127 (symmetric, as
// llama.cpp's Q8_0). So y = sum_groups sw * sum_blocks sx * sum(code * q)  -  sw * zw * sum(sx * sum q):
// the block's integer sum of code * q is exact, then scaled by sx in float32 and by the group's
// weight scale; the zero-point term uses the dequantized activations' sum, so the result is the exact
// product of the dequantized weights with the dequantized activations up to float summation order.
//
// The packed layout is unchanged: a 32-bit lane holds P = 32/bits consecutive codes of one row (int3:
// 8 in 24 bits). The integer instructions take 4 bytes per lane against 4 int8 activations, so the
// activations of a chunk (P columns) are stored permuted to match the bytes each step extracts:
//   int8: the lane's bytes are codes 0..3 as they are;
//   int4: byte j holds codes 2j (low nibble) and 2j+1 (high): steps take columns (0,2,4,6), (1,3,5,7);
//   int2: byte j holds codes 4j..4j+3 at bits 0,2,4,6: step i takes columns (i, 4+i, 8+i, 12+i);
//   int3: AVX-512 VBMI's vpmultishiftqb pulls codes 0..3, then 4..7, into bytes: natural order. AVX2
//     has no per-byte shift, so there each 32-bit lane is made of two 16-bit windows of the row's three
//     bytes, a code is masked in place at bit o (code * 2^o, o <= 7), and vpmaddwd multiplies pairs of
//     such words by int16 activations scaled by 2^(7 - o): every product is code * x * 2^7, exact
//     (see int3_row for the order).
// AVX-512 masks nibbles and crumbs in place (a code times 16 or 4^i fits a byte) with one accumulator
// per position, and shifts the exact integer sums back once per block; AVX2's vpmaddubsw saturates
// at 16 bits, so there codes are shifted down to plain values first, and int8 codes go through the
// sign trick (|code - 128| times x with the sign of code - 128; the -128 returns in the zero point).

#pragma once

#include <vector>

#include "kernels.h"
#include "kernels_avx512.h"

namespace lowbit {
namespace q8 {

constexpr int QB = 32;  // activation columns per int8 step size

inline bool bits_ok(int bits) { return bits == 8 || bits == 4 || bits == 3 || bits == 2; }

// Blocks per row of the padded K.
inline int64_t nblocks(const Layout& L) { return (L.kp + QB - 1) / QB; }

// Column of the chunk that stored position j holds (see the header comment).
inline int perm_of(int bits, int j) {
  switch (bits) {
    case 4: return j < 4 ? 2 * j : 2 * (j - 4) + 1;
    case 2: return 4 * (j % 4) + j / 4;
    default: return j;  // int8, int3
  }
}

// Row m of x [*, k] -> xq [kp] (int8, permuted per chunk), sx [nblocks] (block steps) and xs [ngp] (per
// group: sum over its blocks of sx * sum(q), in double then float). Columns past k are zero.
inline void prep_row(const Layout& L, const float* x, int8_t* xq, float* sx, float* xs) {
  const int P = L.P;
  int pos[32];
  for (int j = 0; j < P; ++j) pos[perm_of(L.bits, j)] = j;
  const int64_t nb = nblocks(L);
  int32_t qsum[4096 / QB + 1];  // a block's sum of codes, for the groups; big rows go through heap
  std::vector<int32_t> heap;
  int32_t* bsum = qsum;
  if (nb > (int64_t)(sizeof(qsum) / sizeof(qsum[0]))) {
    heap.resize(nb);
    bsum = heap.data();
  }
  // Whole blocks of 32 in vector registers: the rounding (cvtps2dq, to nearest even) equals nearbyint's.
  // Every quantity is computed as the scalar tail below computes it, so both give the same codes.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) static const int8_t kShuf4[32] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
                                                0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
  alignas(32) static const int8_t kShuf2[32] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m256i shuf = _mm256_load_si256((const __m256i*)(L.bits == 4 ? kShuf4 : kShuf2));
  const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t b = 0;
  for (; (b + 1) * QB <= L.k; ++b) {
    const float* xb = x + b * QB;
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], nosign), _mm256_and_ps(v[1], nosign)),
                             _mm256_max_ps(_mm256_and_ps(v[2], nosign), _mm256_and_ps(v[3], nosign)));
    m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4e));
    m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xb1));
    const float amax = _mm256_cvtss_f32(m);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    sx[b] = amax / 127.f;
    const __m256 vi = _mm256_set1_ps(inv);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vi));
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    alignas(32) int32_t part[8];
    _mm256_store_si256((__m256i*)part, s32);
    bsum[b] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    bytes = _mm256_permutevar8x32_epi32(bytes, order);  // the packs interleave 128-bit lanes: undo it
    if (L.bits == 4 || L.bits == 2) bytes = _mm256_shuffle_epi8(bytes, shuf);  // chunks of 8 / 16 stay in a lane
    _mm256_storeu_si256((__m256i*)(xq + b * QB), bytes);
  }
  for (; b < nb; ++b) {
    const int64_t c0 = b * QB, c1 = std::min<int64_t>(L.kp, c0 + QB), ce = std::min<int64_t>(L.k, c1);
    float amax = 0.f;
    for (int64_t c = c0; c < ce; ++c) amax = std::max(amax, std::fabs(x[c]));
    const float step = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    sx[b] = step;
    int32_t s = 0;
    for (int64_t c = c0; c < c1; ++c) {
      int q = 0;
      if (c < ce) q = (int)std::nearbyint(std::min(127.f, std::max(-127.f, x[c] * inv)));
      s += q;
      const int64_t ch = c / P;
      xq[ch * P + pos[c % P]] = (int8_t)q;
    }
    bsum[b] = s;
  }
  // Blocks never straddle groups: a group is a multiple of 32 columns, or the whole row.
  const int64_t bpg = L.ngp == 1 ? nb : L.geff / QB;
  for (int64_t g = 0; g < L.ngp; ++g) {
    double acc = 0;
    for (int64_t b = g * bpg; b < std::min(nb, (g + 1) * bpg); ++b) acc += (double)sx[b] * (double)bsum[b];
    xs[g] = (float)acc;
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8 rows per ymm; NV row vectors of a tile per pass.

// int3 on AVX2. A row vector loaded from p - 4 as load_vec<3> loads it has row r's bytes B0 B1 B2 at
// 4 + 3r (low half, rows 0-3) or 3r (high half, rows 4-7). Code j sits at bits 3j..3j+2 of B0 B1 B2.
// Two in-lane shuffles make the words M = (B0 B1, B1 B2) and N = (B2, B2); in-place masks then pick
// the pairs (code 0, code 3), (1, 4), (2, 5) from M and (6, 7) from N, at bits (0, 1), (3, 4), (6, 7),
// (2, 5) of their words.
struct Int3Pairs {
  __m256i idx_m, idx_n, mask[4];
  Int3Pairs() {
    alignas(32) int8_t m[32], nn[32];
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 4; ++r) {
        const int b = h == 0 ? 4 + 3 * r : 3 * r, o = 16 * h + 4 * r;
        const int8_t tm[4] = {(int8_t)b, (int8_t)(b + 1), (int8_t)(b + 1), (int8_t)(b + 2)};
        const int8_t tn[4] = {(int8_t)(b + 2), (int8_t)0x80, (int8_t)(b + 2), (int8_t)0x80};
        for (int i = 0; i < 4; ++i) m[o + i] = tm[i], nn[o + i] = tn[i];
      }
    idx_m = _mm256_load_si256((const __m256i*)m);
    idx_n = _mm256_load_si256((const __m256i*)nn);
    static const int bit[4][2] = {{0, 1}, {3, 4}, {6, 7}, {2, 5}};
    for (int i = 0; i < 4; ++i) mask[i] = _mm256_set1_epi32((7 << bit[i][0]) | (7 << (16 + bit[i][1])));
  }
};

// The activations of one row for int3 on AVX2, from prep_row's codes (natural order): per chunk of 8,
// int16 [x0*2^7, x3*2^6, x1*2^4, x4*2^3, x2*2^1, x5, x6*2^5, x7*2^2], each scaled against its code's bit
// in Int3Pairs (|x| * 2^7 <= 16256 fits; a block's sum stays below 2^29).
inline void int3_row(const Layout& L, const int8_t* xq, int16_t* x16) {
  static const int src[8] = {0, 3, 1, 4, 2, 5, 6, 7}, sh[8] = {7, 6, 4, 3, 1, 0, 5, 2};
  for (int64_t c = 0; c < L.kp; c += 8)
    for (int i = 0; i < 8; ++i) x16[c + i] = (int16_t)(xq[c + src[i]] * (1 << sh[i]));
}

template <int BITS, int NV>
void gemv_tile_avx2(const Layout& L, const uint8_t* tile, const int8_t* xq, const float* sxb, const float* xs,
                    const float* bias, float* y, int nvalid, int v0) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS), CPB = QB / P;
  // int3 takes its activations from int3_row: xq then points at int16 data.
  constexpr int XSTEP = BITS == 3 ? 2 * P : P;  // bytes of activations per chunk
  static const Int3Pairs i3;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const __m256i low = _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03);
  const __m256i bias8 = _mm256_set1_epi8((char)0x80);
  __m256 tot[NV], fac[NV];
  for (int v = 0; v < NV; ++v) tot[v] = _mm256_setzero_ps();
  const uint8_t* p = tile;
  const int8_t* xk = xq;
  const float* sb = sxb;
  for (int64_t g = 0; g < L.ngp; ++g) {
    for (int v = 0; v < NV; ++v) fac[v] = _mm256_setzero_ps();
    for (int64_t c = 0; c < L.cpg;) {
      const int64_t nc = std::min<int64_t>(CPB, L.cpg - c);
      __m256i acc[NV];  // int8/int3: int32 sums; int4/int2: int16 sums of the block (at most 30480 in size)
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_si256();
      for (int64_t j = 0; j < nc; ++j, p += NVT * VB, xk += XSTEP) {
        if constexpr (LOWBIT_PF > 0) {
          _mm_prefetch((const char*)(p + LOWBIT_PF + v0 * VB), _MM_HINT_T0);
          if constexpr (NV * VB > 64) _mm_prefetch((const char*)(p + LOWBIT_PF + v0 * VB + 64), _MM_HINT_T0);
        }
        if constexpr (BITS == 3) {
          __m256i xp[4];
          for (int i = 0; i < 4; ++i) xp[i] = _mm256_set1_epi32(*(const int32_t*)(xk + 4 * i));
          for (int v = 0; v < NV; ++v) {
            const __m256i raw = _mm256_loadu_si256((const __m256i*)(p + (v0 + v) * VB - 4));
            const __m256i m = _mm256_shuffle_epi8(raw, i3.idx_m), n = _mm256_shuffle_epi8(raw, i3.idx_n);
            const __m256i s0 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(m, i3.mask[0]), xp[0]),
                                                _mm256_madd_epi16(_mm256_and_si256(m, i3.mask[1]), xp[1]));
            const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_and_si256(m, i3.mask[2]), xp[2]),
                                                _mm256_madd_epi16(_mm256_and_si256(n, i3.mask[3]), xp[3]));
            acc[v] = _mm256_add_epi32(acc[v], _mm256_add_epi32(s0, s1));
          }
          continue;
        }
        for (int v = 0; v < NV; ++v) {
          const __m256i w = _mm256_loadu_si256((const __m256i*)(p + (v0 + v) * VB));
          if constexpr (BITS == 8) {
            const __m256i xb = _mm256_set1_epi32(*(const int32_t*)xk);
            const __m256i ws = _mm256_xor_si256(w, bias8);  // code - 128 as int8
            const __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xb, ws));
            acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(pr, ones16));
          } else if constexpr (BITS == 4) {
            const __m256i lo = _mm256_and_si256(w, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
            acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(*(const int32_t*)xk)));
            acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(*(const int32_t*)(xk + 4))));
          } else {  // 2
            for (int i = 0; i < 4; ++i) {
              const __m256i q = _mm256_and_si256(i ? _mm256_srli_epi16(w, 2 * i) : w, low);
              acc[v] = _mm256_add_epi16(acc[v], _mm256_maddubs_epi16(q, _mm256_set1_epi32(*(const int32_t*)(xk + 4 * i))));
            }
          }
        }
      }
      c += nc;
      const __m256 s = _mm256_set1_ps(BITS == 3 ? *sb++ * (1.f / 128) : *sb++);  // int3: products carry 2^7
      for (int v = 0; v < NV; ++v) {
        const __m256i a32 = BITS == 8 || BITS == 3 ? acc[v] : _mm256_madd_epi16(acc[v], ones16);
        fac[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32), s, fac[v]);
      }
    }
    const __m256 xsg = _mm256_set1_ps(xs[g]);
    for (int v = 0; v < NV; ++v) {
      // int8 summed code - 128: the zero point moves by -128.
      if (L.sb == 2) {  // tot += (fac - zero * xs) * scale, as the AVX-512 kernel below
        const uint16_t* h = (const uint16_t*)p;
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + (v0 + v) * VR)));
        __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + TR + (v0 + v) * VR)));
        if constexpr (BITS == 8) z = _mm256_sub_ps(z, _mm256_set1_ps(128.f));  // exact: z is a float16
        tot[v] = _mm256_fmadd_ps(_mm256_fnmadd_ps(z, xsg, fac[v]), sc, tot[v]);
      } else {
        __m256 sc, bz;
        load_scales(L, p, (v0 + v) * VR, sc, bz);
        if constexpr (BITS == 8) bz = _mm256_fmadd_ps(sc, _mm256_set1_ps(128.f), bz);  // bz + 128 * sc, one rounding
        tot[v] = _mm256_fmadd_ps(fac[v], sc, tot[v]);
        tot[v] = _mm256_fmadd_ps(bz, xsg, tot[v]);
      }
    }
    p += L.scale_bytes();
  }
  for (int v = 0; v < NV; ++v) {
    const int r0 = (v0 + v) * VR;
    if (r0 >= nvalid) break;
    alignas(32) float o[VR];
    _mm256_store_ps(o, tot[v]);
    for (int i = 0; i < VR && r0 + i < nvalid; ++i) y[r0 + i] = bias ? o[i] + bias[r0 + i] : o[i];
  }
}

template <int BITS>
void gemv_tiles_avx2_t(const Layout& L, const uint8_t* qw, const int8_t* xq, const float* sx, const float* xs,
                       const float* bias, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* tile = qw + L.tile_offset(t);
    const float* bt = bias ? bias + t * TR : nullptr;
    const int nvalid = (int)std::min<int64_t>(TR, L.n - t * TR);
    gemv_tile_avx2<BITS, NVT>(L, tile, xq, sx, xs, bt, y + t * TR, nvalid, 0);
  }
}

// One activation row prepared by prep_row (int3: then rearranged by int3_row, passed as xq), tiles
// [t0, t1); y is that row's output [n].
inline bool gemv_tiles_avx2(const Layout& L, const uint8_t* qw, const int8_t* xq, const float* sx, const float* xs,
                            const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (L.bits) {
    case 8: gemv_tiles_avx2_t<8>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 4: gemv_tiles_avx2_t<4>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 3: gemv_tiles_avx2_t<3>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 2: gemv_tiles_avx2_t<2>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    default: return false;
  }
}

}  // namespace q8
}  // namespace lowbit

// ---------------------------------------------------------------------------------------------
// AVX-512 with VNNI (and VBMI for int3): 16 rows per zmm, the whole tile per pass.

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace avx512 {  // every function holding AVX-512 instructions lives in lowbit::avx512
namespace q8 {

using lowbit::q8::QB;

// Position accumulators per zmm row vector: int4 low and high nibbles, int2 four crumbs; int8 and int3
// two, alternating, for two independent chains.
constexpr int npos(int bits) { return bits == 2 ? 4 : 2; }

template <int BITS>
void gemv_tile_vnni(const Layout& L, const uint8_t* tile, const int8_t* xq, const float* sxb, const float* xs,
                    const float* bias, float* y, int nvalid) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS), CPB = QB / P, NP = npos(BITS);
  __m512 tot[NZ], fac[NZ];
  for (int u = 0; u < NZ; ++u) tot[u] = _mm512_setzero_ps();
  // int3: bit offsets of codes 0..3 (then 4..7) of the two 32-bit lanes of each qword.
  const __m512i ms0 = _mm512_set1_epi64(0x2926232009060300LL), ms1 = _mm512_set1_epi64(0x35322f2c15120f0cLL);
  const uint8_t* p = tile;
  const int8_t* xk = xq;
  const float* sb = sxb;
  for (int64_t g = 0; g < L.ngp; ++g) {
    for (int u = 0; u < NZ; ++u) fac[u] = _mm512_setzero_ps();
    for (int64_t c = 0; c < L.cpg;) {
      const int64_t nc = std::min<int64_t>(CPB, L.cpg - c);
      __m512i acc[NZ][NP];
      for (int u = 0; u < NZ; ++u)
        for (int i = 0; i < NP; ++i) acc[u][i] = _mm512_setzero_si512();
      // One chunk; int8 alternates its two accumulators by chunk (I), a compile-time index: with a run-time
      // one the compiler kept the accumulators in memory and stored them after every chunk.
      auto chunk = [&](auto par) LOWBIT_LAMBDA_INLINE {
        constexpr int I = decltype(par)::value;
        if constexpr (LOWBIT_PF > 0) {
          _mm_prefetch((const char*)(p + LOWBIT_PF), _MM_HINT_T0);
          if constexpr (NVT * VB > 64) _mm_prefetch((const char*)(p + LOWBIT_PF + 64), _MM_HINT_T0);
        }
        for (int u = 0; u < NZ; ++u) {
          const __m512i w = avx512::load_zvec<BITS>(p + u * 2 * VB);
          if constexpr (BITS == 8) {
            acc[u][I] = _mm512_dpbusd_epi32(acc[u][I], w, _mm512_set1_epi32(*(const int32_t*)xk));
          } else if constexpr (BITS == 4) {
            acc[u][0] = _mm512_dpbusd_epi32(acc[u][0], _mm512_and_si512(w, _mm512_set1_epi8(0x0F)),
                                            _mm512_set1_epi32(*(const int32_t*)xk));
            acc[u][1] = _mm512_dpbusd_epi32(acc[u][1], _mm512_and_si512(w, _mm512_set1_epi8((char)0xF0)),
                                            _mm512_set1_epi32(*(const int32_t*)(xk + 4)));
          } else if constexpr (BITS == 3) {
            const __m512i seven = _mm512_set1_epi8(7);
            acc[u][0] = _mm512_dpbusd_epi32(acc[u][0], _mm512_and_si512(_mm512_multishift_epi64_epi8(ms0, w), seven),
                                            _mm512_set1_epi32(*(const int32_t*)xk));
            acc[u][1] = _mm512_dpbusd_epi32(acc[u][1], _mm512_and_si512(_mm512_multishift_epi64_epi8(ms1, w), seven),
                                            _mm512_set1_epi32(*(const int32_t*)(xk + 4)));
          } else {  // 2: crumb i in place, times 4^i
            for (int i = 0; i < 4; ++i)
              acc[u][i] = _mm512_dpbusd_epi32(acc[u][i], _mm512_and_si512(w, _mm512_set1_epi8((char)(3 << (2 * i)))),
                                              _mm512_set1_epi32(*(const int32_t*)(xk + 4 * i)));
          }
        }
        p += NVT * VB;
        xk += P;
      };
      int64_t j = 0;
      if constexpr (BITS == 8)
        for (; j + 2 <= nc; j += 2) {
          chunk(std::integral_constant<int, 0>{});
          chunk(std::integral_constant<int, 1>{});
        }
      for (; j < nc; ++j) chunk(std::integral_constant<int, 0>{});
      c += nc;
      const __m512 s = _mm512_set1_ps(*sb++);
      for (int u = 0; u < NZ; ++u) {
        __m512i a;
        if constexpr (BITS == 4) {
          a = _mm512_add_epi32(acc[u][0], _mm512_srai_epi32(acc[u][1], 4));
        } else if constexpr (BITS == 2) {
          a = _mm512_add_epi32(_mm512_add_epi32(acc[u][0], _mm512_srai_epi32(acc[u][1], 2)),
                               _mm512_add_epi32(_mm512_srai_epi32(acc[u][2], 4), _mm512_srai_epi32(acc[u][3], 6)));
        } else {
          a = _mm512_add_epi32(acc[u][0], acc[u][1]);
        }
        fac[u] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, fac[u]);
      }
    }
    const __m512 xsg = _mm512_set1_ps(xs[g]);
    for (int u = 0; u < NZ; ++u) {
      if (L.sb == 2) {
        // 16-bit scale and zero point: tot += (fac - zero * xs) * scale, two operations where forming
        // -scale * zero first takes four (g32 groups spend a tenth of their work here).
        const uint16_t* h = (const uint16_t*)p;
        const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + u * ZR)));
        const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + TR + u * ZR)));
        tot[u] = _mm512_fmadd_ps(_mm512_fnmadd_ps(z, xsg, fac[u]), sc, tot[u]);
      } else {
        __m512 sc, bz;
        avx512::load_scales(L, p, u * ZR, sc, bz);
        tot[u] = _mm512_fmadd_ps(fac[u], sc, tot[u]);
        tot[u] = _mm512_fmadd_ps(bz, xsg, tot[u]);
      }
    }
    p += L.scale_bytes();
  }
  for (int u = 0; u < NZ; ++u) {
    const int r0 = u * ZR;
    if (r0 >= nvalid) break;
    const int cnt = nvalid - r0 < ZR ? nvalid - r0 : ZR;
    const __mmask16 k = (__mmask16)((1u << cnt) - 1);
    __m512 out = tot[u];
    if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(k, bias + r0));
    _mm512_mask_storeu_ps(y + r0, k, out);
  }
}

template <int BITS>
void gemv_tiles_vnni_t(const Layout& L, const uint8_t* qw, const int8_t* xq, const float* sx, const float* xs,
                       const float* bias, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = (int)(L.n - t * TR < TR ? L.n - t * TR : TR);
    gemv_tile_vnni<BITS>(L, qw + L.tile_offset(t), xq, sx, xs, bias ? bias + t * TR : nullptr, y + t * TR, nvalid);
  }
}

// Same contract as gemv_tiles_avx2, for bits 8/4/3/2.
inline bool gemv_tiles_vnni(const Layout& L, const uint8_t* qw, const int8_t* xq, const float* sx, const float* xs,
                            const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (L.bits) {
    case 8: gemv_tiles_vnni_t<8>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 4: gemv_tiles_vnni_t<4>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 3: gemv_tiles_vnni_t<3>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    case 2: gemv_tiles_vnni_t<2>(L, qw, xq, sx, xs, bias, y, t0, t1); return true;
    default: return false;
  }
}

}  // namespace q8
}  // namespace avx512
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
