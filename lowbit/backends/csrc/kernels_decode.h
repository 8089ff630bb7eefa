// Weights that decode to floats 64 columns at a time, times float32 activations: codebook (k-means) indices
// and 16-bit floats. A GEMV for few rows of activations (codebooks and fp16/bf16) and, for codebooks, a
// decoder into float32 or bf16 for many rows (then a GEMM); each on an AVX2 path and an AVX-512 path.
//
// Codebooks: 2- or 4-bit indices into a table of 2^bits floats per row and group of columns,
// W[n, k] = book[n, k / G, code[n, k]]. Packed layout: row by row, chunks of 64 columns, 8 * bits bytes
// each, built so that one 16-byte load widened to 32-bit lanes gives 16 consecutive columns per bit field:
//   4-bit: bytes 0..15 hold columns i (low nibble) and 16 + i (high nibble), bytes 16..31 columns 32 + i
//          and 48 + i;
//   2-bit: byte i holds columns i, 16 + i, 32 + i and 48 + i in its bit pairs, lowest first.
// Tables stay in the checkpoint's dtype (float16, or float32 when a value does not fit float16), [N, K/G,
// 2^bits] contiguous; a table becomes one register (AVX-512: 16 lanes, vpermps picks by index) or two
// (AVX2: two 8-lane vpermps and a blend on the index's bit 3).
//
// 16-bit floats: the weight [N, K] as stored (float16 or bf16), widened to float32 8 or 16 at a time.
//
// fp8 (e4m3 or e5m2): the weight [N, K] as stored, one byte each, with a float32 scale per row and group of
// columns. Each byte becomes a float16 bit pattern with F16C's vcvtph2ps behind it: e5m2 is float16's top
// byte; e4m3's fields moved into float16's (bias 15 against 7) read as the value times 2^-8, subnormals
// included, and the 2^8 goes into the group's scale (exact: a power of two). e4m3's NaN pattern (0x7F)
// would read as 480: the kernel's prepare refuses weights that hold it. value * scale is then one float32
// rounding, as the format's own dequantization gives.
//
// Lookups and widening are exact, so the GEMV differs from x @ W^T by float summation order only. The
// bf16 decoder rounds each table once to bf16 (to nearest even); every decoded weight is then a table
// entry's bf16 rounding, as W.to(bfloat16) would give.

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace lowbit {
namespace dec {

constexpr int CH = 64;  // columns per chunk

inline bool bits_ok(int64_t bits) { return bits == 2 || bits == 4; }
inline int64_t chunk_bytes(int bits) { return 8 * bits; }
inline bool shape_ok(int64_t n, int64_t k, int64_t bits, int64_t g) {
  return bits_ok(bits) && n >= 1 && k >= CH && k % CH == 0 && g >= CH && g % CH == 0 && k % g == 0;
}

// codes [N, K] (one uint8 per code, < 2^bits) rows r0..r1 -> the packed layout.
inline bool pack_rows(const uint8_t* codes, int64_t k, int bits, int64_t r0, int64_t r1, uint8_t* out) {
  const int64_t nch = k / CH, cb = chunk_bytes(bits);
  const int fields = 8 / bits;
  uint8_t bad = 0;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c = 0; c < nch; ++c) {
      const uint8_t* src = codes + r * k + c * CH;
      uint8_t* dst = out + (r * nch + c) * cb;
      std::memset(dst, 0, (size_t)cb);
      for (int col = 0; col < CH; ++col) {
        const uint8_t v = src[col];
        bad |= (uint8_t)(v >> bits);
        // Column col = 16 * fields * seg + 16 * f + i sits in byte 16 * seg + i, field f.
        const int seg = col / (16 * fields), f = (col / 16) % fields, i = col % 16;
        dst[16 * seg + i] |= (uint8_t)(v << (bits * f));
      }
    }
  return bad == 0;
}

// ---------------------------------------------------------------- AVX2

// Float32 bits rounded to bf16 (nearest, ties to even) and back: what the bf16 decoder looks up, so that
// dropping each decoded value's low 16 bits is exact. Tables are finite (the format checks).
LOWBIT_INLINE __m256i round_bf16_8(__m256i u) {
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
  return _mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u));
}

// One table of 2^BITS entries (float16 or float32 storage) as two 8-lane halves (entries 0..7, 8..15).
template <int BITS, typename Book, bool BF16>
LOWBIT_INLINE void table8(const Book* b, __m256& lo, __m256& hi) {
  if constexpr (sizeof(Book) == 2) {
    if constexpr (BITS == 4) {
      lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)b));
      hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 8)));
    } else {
      lo = _mm256_cvtph_ps(_mm_loadl_epi64((const __m128i*)b));
    }
  } else {
    if constexpr (BITS == 4) {
      lo = _mm256_loadu_ps(b);
      hi = _mm256_loadu_ps(b + 8);
    } else {
      lo = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(b), 0);
    }
  }
  if constexpr (BITS == 2) hi = lo;
  if constexpr (BF16) {
    lo = _mm256_castsi256_ps(round_bf16_8(_mm256_castps_si256(lo)));
    hi = _mm256_castsi256_ps(round_bf16_8(_mm256_castps_si256(hi)));
  }
}

// 8 columns' weights from 8 indices (0..15, or 0..3 at 2 bits) and the table's two halves.
template <int BITS>
LOWBIT_INLINE __m256 lookup8(__m256i idx, __m256 lo, __m256 hi) {
  if constexpr (BITS == 2) {
    (void)hi;
    return _mm256_permutevar8x32_ps(lo, idx);
  } else {
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  }
}

// Calls fn(col, w) for the 64 columns of one chunk, 8 at a time (col: the first column of the 8).
template <int BITS, typename Fn>
LOWBIT_INLINE void chunk8(const uint8_t* p, __m256 lo, __m256 hi, Fn&& fn) {
  constexpr int F = 8 / BITS, SC = 16 * F, SEGS = CH / SC;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int seg = 0; seg < SEGS; ++seg)
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 16 * seg + 8 * h)));
      for (int f = 0; f < F; ++f) {
        const __m256i idx = _mm256_and_si256(_mm256_srli_epi32(v, BITS * f), mask);
        fn(SC * seg + 16 * f + 8 * h, lookup8<BITS>(idx, lo, hi));
      }
    }
}

// Sources of weights for the GEMV: rows of K columns, read a chunk of 64 columns at a time, in groups of
// columns that share a setup (a codebook's table). chunk(n, c, group, fn) calls fn(col, w) with the 8 (AVX2)
// or 16 (AVX-512) weights of row n from column 64 * c + col on.
template <int BITS, typename Book>
struct Codebook8 {
  const uint8_t* q;
  const Book* books;
  int64_t k, g;
  struct Group {
    __m256 lo, hi;
  };
  int64_t group_cols() const { return g; }
  LOWBIT_INLINE float row_scale(int64_t) const { return 1.0f; }
  LOWBIT_INLINE Group group(int64_t n, int64_t gi) const {
    Group t;
    table8<BITS, Book, false>(books + ((n * (k / g) + gi) << BITS), t.lo, t.hi);
    return t;
  }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, const Group& t, Fn&& fn) const {
    chunk8<BITS>(q + (n * (k / CH) + c) * chunk_bytes(BITS), t.lo, t.hi, fn);
  }
};

// 16-bit float weights [N, K]: float16 (F16C's vcvtph2ps) or bf16 (the bits moved up into a float32).
template <bool BF16W>
struct Half8 {
  const uint16_t* w;
  int64_t k;
  struct Group {};
  int64_t group_cols() const { return k; }
  LOWBIT_INLINE float row_scale(int64_t) const { return 1.0f; }
  LOWBIT_INLINE Group group(int64_t, int64_t) const { return {}; }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, const Group&, Fn&& fn) const {
    const uint16_t* p = w + n * k + c * CH;
    for (int j = 0; j < CH / 8; ++j) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(p + 8 * j));
      fn(8 * j, BF16W ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h));
    }
  }
};

// 8 fp8 bytes (zero-extended to 16-bit lanes) -> the float16 bit patterns described at the top.
template <bool E5M2>
LOWBIT_INLINE __m128i fp8_half8(__m128i v) {
  if constexpr (E5M2) return _mm_slli_epi16(v, 8);
  // v << 7 puts exponent and mantissa in place and the sign on bit 14; adding the sign there again carries
  // it to bit 15 and clears bit 14.
  const __m128i h = _mm_slli_epi16(v, 7);
  return _mm_add_epi16(h, _mm_and_si128(h, _mm_set1_epi16(0x4000)));
}

// The factor a group's scale takes so that scale * (decoded float16) is the weight.
constexpr float fp8_unit(bool e5m2) { return e5m2 ? 1.0f : 256.0f; }

// PER_ROW: one scale per row (the group is the whole row): applied to the row's dot product once, instead of
// to every weight.
template <bool E5M2, bool PER_ROW>
struct Fp8x8 {
  static constexpr bool per_row = PER_ROW;
  const uint8_t* w;
  const float* scale;  // [N, K / g]
  int64_t k, g;
  struct Group {
    __m256 s;
  };
  int64_t group_cols() const { return g; }
  LOWBIT_INLINE float row_scale(int64_t n) const { return PER_ROW ? scale[n] * fp8_unit(E5M2) : 1.0f; }
  LOWBIT_INLINE Group group(int64_t n, int64_t gi) const {
    if constexpr (PER_ROW) return {_mm256_setzero_ps()};
    return {_mm256_set1_ps(scale[n * (k / g) + gi] * fp8_unit(E5M2))};
  }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, const Group& t, Fn&& fn) const {
    const uint8_t* p = w + n * k + c * CH;
    for (int j = 0; j < CH / 8; ++j) {
      const __m256 v = _mm256_cvtph_ps(fp8_half8<E5M2>(_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(p + 8 * j)))));
      fn(8 * j, PER_ROW ? v : _mm256_mul_ps(v, t.s));
    }
  }
};

// y[m, n] = x[m] . W[n] (+ bias[n]) for rows n0..n1 and M activation rows (M <= 4 per pass).
template <typename Src, int M>
void gemv_avx2_t(const Src& src, int64_t k, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                 int64_t n0, int64_t n1) {
  constexpr int NA = M == 1 ? 4 : 2;  // independent FMA chains per activation row
  const int64_t gch = src.group_cols() / CH, ngrp = k / src.group_cols();
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      const auto grp = src.group(n, gi);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const float* xc = x + c * CH;
        int s = 0;
        src.chunk(n, c, grp, [&](int col, __m256 w) {
          for (int m = 0; m < M; ++m)
            acc[m][s % NA] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xc + m * ldx + col), acc[m][s % NA]);
          ++s;
        });
      }
    }
    for (int m = 0; m < M; ++m) {
      __m256 a = acc[m][0];
      for (int i = 1; i < NA; ++i) a = _mm256_add_ps(a, acc[m][i]);
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      r = _mm_add_ps(r, _mm_movehl_ps(r, r));
      r = _mm_add_ss(r, _mm_movehdup_ps(r));
      y[m * ldy + n] = _mm_cvtss_f32(r) * src.row_scale(n) + (bias ? bias[n] : 0.0f);
    }
  }
}

// W rows n0..n1 into out [N, K] (float32, or bf16 as uint16).
template <int BITS, typename Book, bool BF16>
void decode_avx2_t(const uint8_t* q, const Book* books, int64_t k, int64_t g, int64_t n0, int64_t n1, void* out) {
  constexpr int E = 1 << BITS;
  const int64_t nch = k / CH, gch = g / CH, ngrp = k / g, cb = chunk_bytes(BITS);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      __m256 lo, hi;
      table8<BITS, Book, BF16>(books + (n * ngrp + gi) * E, lo, hi);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const int64_t base = n * k + c * CH;
        chunk8<BITS>(q + (n * nch + c) * cb, lo, hi, [&](int col, __m256 w) {
          if constexpr (BF16) {
            // The entries are bf16 values: their top 16 bits are the bf16 encoding.
            const __m256i u = _mm256_srli_epi32(_mm256_castps_si256(w), 16);
            const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
            _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(out) + base + col), h);
          } else {
            _mm256_storeu_ps(static_cast<float*>(out) + base + col, w);
          }
        });
      }
    }
}

// Rows n0..n1 of a weight source (one whose chunk(...) gives each weight's value: fp8) into out [.., K],
// row n at out row n - r0: float32, or bf16 rounded to nearest even.
template <typename Src, bool BF16>
void decode_src_avx2_t(const Src& src, int64_t k, int64_t n0, int64_t n1, int64_t r0, void* out) {
  static_assert(!Src::per_row, "a per-row source leaves its scale to the dot product: it cannot decode W");
  const int64_t gch = src.group_cols() / CH, ngrp = k / src.group_cols();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      const auto grp = src.group(n, gi);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const int64_t base = (n - r0) * k + c * CH;
        src.chunk(n, c, grp, [&](int col, __m256 w) {
          if constexpr (BF16) {
            const __m256i u = _mm256_srli_epi32(round_bf16_8(_mm256_castps_si256(w)), 16);
            const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
            _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(out) + base + col), h);
          } else {
            _mm256_storeu_ps(static_cast<float*>(out) + base + col, w);
          }
        });
      }
    }
}

}  // namespace dec
}  // namespace lowbit

// ---------------------------------------------------------------- AVX-512 (F, BW, VL), run-time dispatched
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vbmi")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lowbit {
namespace avx512 {  // the module's AVX-512 code lives under lowbit::avx512 (a test disassembles the module)
namespace dec {

using lowbit::dec::CH;
using lowbit::dec::chunk_bytes;

// One table of 2^BITS entries (float16 or float32 storage) in one register; bf16-rounded if asked.
template <int BITS, typename Book, bool BF16>
LOWBIT_INLINE __m512 table16(const Book* b) {
  __m512 t;
  if constexpr (sizeof(Book) == 2) {
    if constexpr (BITS == 4)
      t = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
    else
      t = _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadl_epi64((const __m128i*)b)));
  } else {
    if constexpr (BITS == 4)
      t = _mm512_loadu_ps(b);
    else
      t = _mm512_zextps128_ps512(_mm_loadu_ps(b));
  }
  if constexpr (BF16) {
    __m512i u = _mm512_castps_si512(t);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    t = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
  }
  return t;
}

// Calls fn(col, w) for the 64 columns of one chunk, 16 at a time; the table is one register.
template <int BITS, typename Fn>
LOWBIT_INLINE void chunk16(const uint8_t* p, __m512 table, Fn&& fn) {
  constexpr int F = 8 / BITS, SC = 16 * F, SEGS = CH / SC;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  for (int seg = 0; seg < SEGS; ++seg) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 16 * seg)));
    for (int f = 0; f < F; ++f) {
      const __m512i idx = f == 0 ? _mm512_and_si512(v, mask) : _mm512_and_si512(_mm512_srli_epi32(v, BITS * f), mask);
      fn(SC * seg + 16 * f, _mm512_permutexvar_ps(idx, table));
    }
  }
}

template <int BITS, typename Book>
struct Codebook16 {
  const uint8_t* q;
  const Book* books;
  int64_t k, g;
  int64_t group_cols() const { return g; }
  LOWBIT_INLINE float row_scale(int64_t) const { return 1.0f; }
  LOWBIT_INLINE __m512 group(int64_t n, int64_t gi) const {
    return table16<BITS, Book, false>(books + ((n * (k / g) + gi) << BITS));
  }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, __m512 table, Fn&& fn) const {
    chunk16<BITS>(q + (n * (k / CH) + c) * chunk_bytes(BITS), table, fn);
  }
};

template <bool BF16W>
struct Half16 {
  const uint16_t* w;
  int64_t k;
  int64_t group_cols() const { return k; }
  LOWBIT_INLINE float row_scale(int64_t) const { return 1.0f; }
  LOWBIT_INLINE int group(int64_t, int64_t) const { return 0; }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, int, Fn&& fn) const {
    const uint16_t* p = w + n * k + c * CH;
    for (int j = 0; j < CH / 16; ++j) {
      const __m256i h = _mm256_loadu_si256((const __m256i*)(p + 16 * j));
      fn(16 * j, BF16W ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h));
    }
  }
};

template <bool E5M2, bool PER_ROW>
struct Fp8x16 {
  static constexpr bool per_row = PER_ROW;
  const uint8_t* w;
  const float* scale;  // [N, K / g]
  int64_t k, g;
  int64_t group_cols() const { return g; }
  LOWBIT_INLINE float row_scale(int64_t n) const {
    return PER_ROW ? scale[n] * lowbit::dec::fp8_unit(E5M2) : 1.0f;
  }
  LOWBIT_INLINE __m512 group(int64_t n, int64_t gi) const {
    if constexpr (PER_ROW) return _mm512_setzero_ps();
    return _mm512_set1_ps(scale[n * (k / g) + gi] * lowbit::dec::fp8_unit(E5M2));
  }
  template <typename Fn>
  LOWBIT_INLINE void chunk(int64_t n, int64_t c, __m512 s, Fn&& fn) const {
    const uint8_t* p = w + n * k + c * CH;
    // Byte i of a 16-byte load to byte 2i + 1, the high half of word i (a local constant: no AVX-512 code may
    // run when the module loads).
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6, 0, 7, 0, 8, 0, 9, 0, 10, 0, 11, 0,
                                            12, 0, 13, 0, 14, 0, 15);
    for (int j = 0; j < CH / 16; ++j) {
      // One byte permute (VBMI) puts the 16 bytes in the high halves of 16 words, zeros below: e5m2's
      // float16 bits. e4m3's: that shifted right by one (arithmetic, so the sign stays on bit 15), with the
      // sign's copy on bit 14 cleared.
      const __m256i hi = _mm256_maskz_permutexvar_epi8((__mmask32)0xAAAAAAAAu, spread,
                                                       _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(p + 16 * j))));
      __m256i h;
      if constexpr (E5M2)
        h = hi;
      else
        h = _mm256_and_si256(_mm256_srai_epi16(hi, 1), _mm256_set1_epi16((short)0xBFFF));
      const __m512 f = _mm512_cvtph_ps(h);
      fn(16 * j, PER_ROW ? f : _mm512_mul_ps(f, s));
    }
  }
};

template <typename Src, int M>
void gemv_t(const Src& src, int64_t k, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
            int64_t n0, int64_t n1) {
  constexpr int NA = M == 1 ? 4 : 2;  // independent FMA chains per activation row
  const int64_t gch = src.group_cols() / CH, ngrp = k / src.group_cols();
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[M][NA];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      const auto grp = src.group(n, gi);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const float* xc = x + c * CH;
        int s = 0;
        src.chunk(n, c, grp, [&](int col, __m512 w) {
          for (int m = 0; m < M; ++m)
            acc[m][s % NA] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xc + m * ldx + col), acc[m][s % NA]);
          ++s;
        });
      }
    }
    for (int m = 0; m < M; ++m) {
      __m512 a = acc[m][0];
      for (int i = 1; i < NA; ++i) a = _mm512_add_ps(a, acc[m][i]);
      y[m * ldy + n] = _mm512_reduce_add_ps(a) * src.row_scale(n) + (bias ? bias[n] : 0.0f);
    }
  }
}

template <int BITS, typename Book, bool BF16>
void decode_t(const uint8_t* q, const Book* books, int64_t k, int64_t g, int64_t n0, int64_t n1, void* out) {
  constexpr int E = 1 << BITS;
  const int64_t nch = k / CH, gch = g / CH, ngrp = k / g, cb = chunk_bytes(BITS);
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      const __m512 table = table16<BITS, Book, BF16>(books + (n * ngrp + gi) * E);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const int64_t base = n * k + c * CH;
        chunk16<BITS>(q + (n * nch + c) * cb, table, [&](int col, __m512 w) {
          if constexpr (BF16)
            _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(out) + base + col),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
          else
            _mm512_storeu_ps(static_cast<float*>(out) + base + col, w);
        });
      }
    }
}

// decode_src_avx2_t's AVX-512 form.
template <typename Src, bool BF16>
void decode_src_t(const Src& src, int64_t k, int64_t n0, int64_t n1, int64_t r0, void* out) {
  static_assert(!Src::per_row, "a per-row source leaves its scale to the dot product: it cannot decode W");
  const int64_t gch = src.group_cols() / CH, ngrp = k / src.group_cols();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t gi = 0; gi < ngrp; ++gi) {
      const auto grp = src.group(n, gi);
      for (int64_t c = gi * gch; c < (gi + 1) * gch; ++c) {
        const int64_t base = (n - r0) * k + c * CH;
        src.chunk(n, c, grp, [&](int col, __m512 w) {
          if constexpr (BF16) {
            __m512i u = _mm512_castps_si512(w);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
            u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
            _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(out) + base + col),
                                _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
          } else {
            _mm512_storeu_ps(static_cast<float*>(out) + base + col, w);
          }
        });
      }
    }
}

}  // namespace dec
}  // namespace avx512
}  // namespace lowbit

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
