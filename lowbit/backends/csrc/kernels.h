// AVX2/FMA kernels for packed low-bit weights x float32 activations. No torch dependency: the
// binding (lowbit_cpu.cpp) owns threading, tensors and argument checks.
//
// Canonical weight: codes uint8 [N, K] in [0, 2^bits), scale and zero float32 [N, K/G],
// W[n, k] = (codes[n, k] - zero[n, k/G]) * scale[n, k/G].
//
// Packed layout, one byte buffer:
//   * rows are taken 32 at a time (a "tile"), as four "row vectors" of 8 rows; 32-bit lane i of a
//     row vector belongs to row i, and holds P consecutive codes of that row (P = 32/bits; int3:
//     8 codes in a 24-bit lane), code s at bit bits*s;
//   * a "chunk" is P columns of the tile: its four row vectors back to back (32 bytes each, int3 24);
//   * a tile is its groups in order; a group is its chunks followed by the scales of the tile's
//     32 rows, in one of two forms: 32-bit (64 floats: the scales, then their -scale*zero) or
//     16-bit (64 halves: the scales, then the zero points; the kernels form -scale*zero in float32,
//     exact since a product of two halves fits in a float). So each tile is one sequential stream.
//   * the buffer starts with a 64-byte pad whose first bytes are a header naming the form (see
//     kHeaderMagic).
//
// GEMV, per step s of a chunk (one column k): w = the 8 rows' codes at k as floats, acc += w * x[k]
// (x broadcast), with a fused multiply-add per row vector. Per group and row vector:
// tot += acc * scale + (-scale*zero) * sum(x over the group), lanes staying rows, so no horizontal
// sums and one FMA per group folds 8 rows.
//
// The codes are never shifted down to bit 0: masking code s in place gives the exact float
// code * 2^(bits*s) after int->float conversion (at most 8 significant bits), and the matching
// activation was multiplied by 2^-(bits*s) beforehand, so every product equals code * x exactly
// (both scalings are powers of two). That saves an instruction per 8 weights. A code at the top
// of a lane is shifted down instead, since masking it in place would set the sign bit.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

namespace lowbit {

constexpr int VR = 8;         // rows per row vector (lanes)
constexpr int NVT = 4;        // row vectors per tile
constexpr int TR = VR * NVT;  // rows per tile

// Codes per lane, bytes per row vector.
constexpr int codes_per_lane(int bits) { return bits == 3 ? 8 : 32 / bits; }
constexpr int vec_bytes(int bits) { return bits == 3 ? 24 : 32; }
// Step s of a lane: at which bit, and whether it sits at the top (shifted instead of masked).
constexpr int pos_of(int bits, int s) { return bits * s; }
constexpr bool top_of(int bits, int s) { return bits * s + bits == 32; }
// Exponent the activation of step s is scaled down by.
constexpr int xexp_of(int bits, int s) { return top_of(bits, s) ? 0 : pos_of(bits, s); }

struct Layout {
  int bits = 0, P = 0, vb = 0;
  int sb = 4;         // bytes per scale and per zero term: 4 (float32) or 2 (float16)
  int64_t n = 0, k = 0, g = 0;  // canonical shape and group size
  int64_t np = 0, ntile = 0, kp = 0;
  int64_t ng = 0;     // groups per row (canonical)
  int64_t ngp = 0;    // groups per row in the packed stream (1 for per-channel)
  int64_t geff = 0;   // group length along the padded K
  int64_t cpg = 0;    // chunks per group
  int64_t chunk_bytes() const { return (int64_t)NVT * vb; }
  int64_t scale_bytes() const { return 2 * TR * (int64_t)sb; }
  int64_t group_bytes() const { return cpg * chunk_bytes() + scale_bytes(); }
  int64_t tile_bytes() const { return ngp * group_bytes(); }
  // Padding on both ends: the int3 loaders read 4 bytes before a row vector (AVX2) and 16 after
  // two (AVX-512). The leading pad is 64 bytes so that the tiles start 64-byte aligned in the
  // (64-byte aligned) buffer: a zmm load of two row vectors then never splits a cache line (every
  // chunk and scale block except int3's is a multiple of 64 bytes). The header lives in the first
  // kHeaderBytes of the leading pad, clear of those reads.
  static constexpr int64_t kPad = 64;
  static constexpr int64_t kPadEnd = 32;
  static constexpr int64_t kHeaderBytes = 8;
  int64_t total_bytes() const { return kPad + ntile * tile_bytes() + kPadEnd; }
  int64_t tile_offset(int64_t t) const { return kPad + t * tile_bytes(); }
};

inline bool shape_ok(int64_t n, int64_t k, int64_t bits, int64_t g) {
  if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8)) return false;
  if (n < 1 || k < 1 || g < 1 || k % g != 0) return false;
  return g == k || g % 32 == 0;  // per-channel takes any K (padded with zero codes)
}

// Header of the packed buffer: 4 magic bytes, then the scale width in bytes (2 or 4), then zeros.
constexpr uint8_t kHeaderMagic[4] = {'l', 'b', 'p', 'k'};

// Call only when shape_ok; sb is 4 (float32 scales) or 2 (float16).
inline Layout make_layout(int64_t n, int64_t k, int64_t bits, int64_t g, int sb = 4) {
  Layout L;
  L.sb = sb;
  L.bits = (int)bits;
  L.P = codes_per_lane(L.bits);
  L.vb = vec_bytes(L.bits);
  L.n = n;
  L.k = k;
  L.g = g;
  L.np = (n + TR - 1) / TR * TR;
  L.ntile = L.np / TR;
  L.kp = (k + L.P - 1) / L.P * L.P;
  L.ng = k / g;
  if (g == k) {
    L.ngp = 1;
    L.geff = L.kp;
  } else {
    L.ngp = L.ng;
    L.geff = g;
  }
  L.cpg = L.geff / L.P;
  return L;
}

// ---------------------------------------------------------------------------------------------
// Packing: tiles [t0, t1) into a zero-initialised buffer. Returns false if a code needs more bits.
// scale and zero are float32 [n, ng] for the 32-bit form (sb == 4), float16 bit patterns for sb == 2.

inline void write_header(const Layout& L, uint8_t* out) {
  std::memcpy(out, kHeaderMagic, 4);
  out[4] = (uint8_t)L.sb;
}

// The scale width a buffer's header names: 4 or 2, 0 for anything else (packed buffers are derived
// from the canonical weight when a model loads, never stored, so there is no older form to accept).
inline int read_header(const uint8_t* buf) {
  if (std::memcmp(buf, kHeaderMagic, 4) != 0 || buf[5] || buf[6] || buf[7]) return 0;
  return (buf[4] == 2 || buf[4] == 4) ? buf[4] : 0;
}

inline bool pack_tiles(const Layout& L, const uint8_t* codes, const void* scale, const void* zero,
                       int64_t t0, int64_t t1, uint8_t* out) {
  const int P = L.P, bits = L.bits, lane_bytes = L.bits == 3 ? 3 : 4;
  const uint32_t cmax = (1u << bits) - 1;
  bool ok = true;
  for (int64_t t = t0; t < t1; ++t) {
    uint8_t* tp = out + L.tile_offset(t);
    for (int64_t g = 0; g < L.ngp; ++g) {
      uint8_t* gp = tp + g * L.group_bytes();
      for (int row = 0; row < TR; ++row) {
        const int64_t n = t * TR + row;
        if (n >= L.n) break;  // padding rows keep zero codes and zero scales
        const int v = row / VR, lane = row % VR;
        const uint8_t* crow = codes + n * L.k;
        for (int64_t c = 0; c < L.cpg; ++c) {
          uint32_t word = 0;
          for (int s = 0; s < P; ++s) {
            const int64_t kk = g * L.geff + c * P + s;
            if (kk >= L.k) break;
            const uint32_t q = crow[kk];
            ok &= q <= cmax;
            word |= (q & cmax) << (bits * s);
          }
          std::memcpy(gp + c * L.chunk_bytes() + v * L.vb + lane * lane_bytes, &word, lane_bytes);
        }
        uint8_t* sp = gp + L.cpg * L.chunk_bytes();
        if (L.sb == 2) {
          uint16_t sz[2] = {0, 0};
          if (g < L.ng) {
            sz[0] = ((const uint16_t*)scale)[n * L.ng + g];
            sz[1] = ((const uint16_t*)zero)[n * L.ng + g];
          }
          std::memcpy(sp + 2 * row, &sz[0], 2);
          std::memcpy(sp + 2 * (TR + row), &sz[1], 2);
        } else {
          float sz[2] = {0.f, 0.f};
          if (g < L.ng) {
            const float s = ((const float*)scale)[n * L.ng + g], z = ((const float*)zero)[n * L.ng + g];
            sz[0] = s;
            sz[1] = -(s * z);
          }
          std::memcpy(sp + 4 * row, &sz[0], sizeof(float));
          std::memcpy(sp + 4 * (TR + row), &sz[1], sizeof(float));
        }
      }
    }
  }
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Activations: copies scaled to match the in-place codes, and per-group sums of the raw values.

inline float x_mult(int bits, int s) {
  int e = 0;
  switch (bits) {
    case 8: e = xexp_of(8, s); break;
    case 4: e = xexp_of(4, s); break;
    case 3: e = xexp_of(3, s); break;
    case 2: e = xexp_of(2, s); break;
    case 1: e = xexp_of(1, s); break;
  }
  return std::ldexp(1.0f, -e);
}

// Activation rows per pass over a tile.
constexpr int MT_MAX = 4;

// Rows [m0, m1) of x [M, k] -> xp, xs. Rows are grouped MT_MAX at a time (the rows of one pass),
// and within a group interleaved per column: xp[c][kk][j] for row c * MT_MAX + j, the same for xs
// per group, so the kernel finds all its rows' activations of one column side by side.
// raw: copies unscaled, for a kernel that decodes every code to its plain value.
inline void prep_x_rows(const Layout& L, const float* x, int64_t M, int64_t m0, int64_t m1, float* xp,
                        float* xs, bool raw = false) {
  float mult[32];
  for (int s = 0; s < L.P; ++s) mult[s] = raw ? 1.0f : x_mult(L.bits, s);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t c0 = m / MT_MAX * MT_MAX, j = m - c0, mt = std::min<int64_t>(MT_MAX, M - c0);
    const float* xr = x + m * L.k;
    float* xpr = xp + c0 * L.kp + j;
    int64_t kv = 0;
    if (mt == 1) {
      // One row alone (decode): contiguous, 32 columns per step (the multipliers repeat every P <= 32).
      alignas(32) float m32[32];
      for (int i = 0; i < 32; ++i) m32[i] = mult[i % L.P];
      for (; kv + 32 <= L.k; kv += 32)
        for (int i = 0; i < 32; i += 8)
          _mm256_storeu_ps(xpr + kv + i, _mm256_mul_ps(_mm256_loadu_ps(xr + kv + i), _mm256_load_ps(m32 + i)));
    }
    for (int64_t kb = kv; kb < L.k; kb += L.P) {
      const int64_t len = std::min<int64_t>(L.P, L.k - kb);
      for (int64_t i = 0; i < len; ++i) xpr[(kb + i) * mt] = xr[kb + i] * mult[i];
    }
    for (int64_t kk = L.k; kk < L.kp; ++kk) xpr[kk * mt] = 0.f;
    for (int64_t g = 0; g < L.ngp; ++g) {
      const int64_t k0 = g * L.geff, k1 = std::min(L.k, k0 + L.geff);
      // Double, since this sum multiplies the zero point; eight fixed partial sums so the compiler
      // can vectorise while the result stays the same on every call.
      // Partial i sums columns k0 + i, k0 + i + 8, ...: two vectors of four doubles hold them.
      __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
      int64_t kk = k0;
      for (; kk + 8 <= k1; kk += 8) {
        lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm_loadu_ps(xr + kk)));
        hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm_loadu_ps(xr + kk + 4)));
      }
      alignas(32) double part[8];
      _mm256_store_pd(part, lo);
      _mm256_store_pd(part + 4, hi);
      for (; kk < k1; ++kk) part[0] += (double)xr[kk];
      const double acc =
          ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      xs[c0 * L.ngp + g * mt + j] = (float)acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel pieces

#define LOWBIT_INLINE inline __attribute__((always_inline))
#define LOWBIT_LAMBDA_INLINE __attribute__((always_inline))

template <typename Fn, int... I>
LOWBIT_INLINE void static_for_impl(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
LOWBIT_INLINE void static_for(Fn&& fn) {
  static_for_impl(fn, std::make_integer_sequence<int, N>{});
}

template <int BITS>
LOWBIT_INLINE __m256i load_vec(const uint8_t* p) {
  if constexpr (BITS == 3) {
    // Three bytes per lane. Loading from p - 4 puts bytes 0..11 (lanes 0-3) at 4..15 of the low
    // half and bytes 12..23 (lanes 4-7) at 0..11 of the high half, so one in-lane shuffle spreads
    // them out. The top byte of each lane is left as garbage: int3 masks never reach bit 24.
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(p - 4));
    const __m256i shuf = _mm256_setr_epi8(4, 5, 6, 7, 7, 8, 9, 10, 10, 11, 12, 13, 13, 14, 15, 15,
                                          0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 11);
    return _mm256_shuffle_epi8(raw, shuf);
  } else {
    return _mm256_loadu_si256((const __m256i*)p);
  }
}

// In-place masks per (bits, step), read from memory: keeping up to 31 of them in registers would
// push the accumulators out to the stack.
struct MaskTable {
  alignas(32) uint32_t m[9][32][8];
  constexpr MaskTable() : m() {
    for (int b = 1; b <= 8; ++b)
      for (int s = 0; s < 32; ++s)
        for (int i = 0; i < 8; ++i)
          m[b][s][i] = (b * s + b <= 32) ? ((1u << b) - 1) << (b * s) : 0u;
  }
};
inline constexpr MaskTable kMasks{};

// Code of step s as float, times 2^xexp_of(BITS, s).
template <int BITS, int s>
LOWBIT_INLINE __m256 decode_scaled(__m256i v) {
  if constexpr (top_of(BITS, s)) {
    return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, pos_of(BITS, s)));
  } else {
    // Inline asm pins the mask as a memory operand (the compiler would otherwise rebuild the
    // constants in registers and spill accumulators to make room).
    __m256i q;
    asm("vpand %2, %1, %0" : "=x"(q) : "x"(v), "m"(*(const __m256i*)kMasks.m[BITS][s]));
    return _mm256_cvtepi32_ps(q);
  }
}

// Code of step s as float (for dequantization).
template <int BITS, int s>
LOWBIT_INLINE __m256 decode_plain(__m256i v) {
  __m256i q = _mm256_srli_epi32(v, pos_of(BITS, s));
  if constexpr (!top_of(BITS, s)) q = _mm256_and_si256(q, _mm256_set1_epi32((1 << BITS) - 1));
  return _mm256_cvtepi32_ps(q);
}

// Scales of rows [r0, r0 + 8) of a group whose scale block starts at sp: the scale, and the term
// that multiplies sum(x), -scale*zero. The 16-bit form stores the zero point; the product of two
// halves is exact in float32, so -(s * z) here equals the 32-bit form's value bit for bit.
LOWBIT_INLINE void load_scales(const Layout& L, const uint8_t* sp, int r0, __m256& sc, __m256& bz) {
  if (L.sb == 2) {
    const uint16_t* h = (const uint16_t*)sp;
    sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + r0)));
    const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + TR + r0)));
    bz = _mm256_xor_ps(_mm256_mul_ps(sc, z), _mm256_set1_ps(-0.0f));
  } else {
    const float* f = (const float*)sp;
    sc = _mm256_loadu_ps(f + r0);
    bz = _mm256_loadu_ps(f + TR + r0);
  }
}

// Bytes ahead of the current chunk that the GEMV prefetches (0: rely on the hardware prefetcher). Off:
// on a 2-core Zen 4 the int4 GEMV streamed the same or faster without software prefetch, on 4 KB and on
// 2 MB pages, in one interleaved run (2 threads, 2 MB pages, memory reading 60 GB/s: 47 GB/s without,
// 36-44 with 1-16 KB ahead).
#ifndef LOWBIT_PF
#define LOWBIT_PF 0
#endif

struct GemvArgs {
  const uint8_t* tile;  // this tile's stream
  const float* xp;      // scaled activations of this pass's rows, [kp][MT] (see prep_x_rows)
  const float* xs;      // per-group activation sums of this pass's rows, [ngp][MT]
  float* y;             // output, first row of this pass, at the tile's first column; row stride n
  const float* bias;    // at the tile's first column, or null
  int nvalid;           // rows of the tile that exist
};

// MT activation rows against row vectors [v0, v0 + NV) of one tile. NACC accumulators per
// (row vector, activation row) hide the FMA latency when NV * MT chains alone are too few.
template <int BITS, int NV, int MT>
void gemv_tile(const Layout& L, const GemvArgs& a, int v0) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS);
  constexpr int NACC = NV * MT >= 6 ? 1 : 2;
  __m256 acc[MT][NV][NACC], tot[MT][NV];
  for (int m = 0; m < MT; ++m)
    for (int v = 0; v < NV; ++v) tot[m][v] = _mm256_setzero_ps();

  const uint8_t* p = a.tile;
  const float* xk = a.xp;
  for (int64_t g = 0; g < L.ngp; ++g) {
    for (int m = 0; m < MT; ++m)
      for (int v = 0; v < NV; ++v)
        for (int j = 0; j < NACC; ++j) acc[m][v][j] = _mm256_setzero_ps();
    // One chunk: P columns of the NV row vectors.
    auto chunk = [&](const uint8_t* cp, const float* cx) LOWBIT_LAMBDA_INLINE {
      if constexpr (LOWBIT_PF > 0) {
        _mm_prefetch((const char*)(cp + LOWBIT_PF), _MM_HINT_T0);
        _mm_prefetch((const char*)(cp + LOWBIT_PF + 64), _MM_HINT_T0);
      }
      __m256i w[NV];
      for (int v = 0; v < NV; ++v) w[v] = load_vec<BITS>(cp + (v0 + v) * VB);
      static_for<P>([&](auto sc) LOWBIT_LAMBDA_INLINE {
        constexpr int s = decltype(sc)::value;
        // Statement order matters to the register allocator (16 ymm): one activation row decodes
        // and multiplies vector by vector; several rows decode once, then take one broadcast at a
        // time, which keeps their accumulators out of the stack.
        if constexpr (MT == 1) {
          const __m256 xb = _mm256_broadcast_ss(cx + s);
          for (int v = 0; v < NV; ++v)
            acc[0][v][s % NACC] = _mm256_fmadd_ps(decode_scaled<BITS, s>(w[v]), xb, acc[0][v][s % NACC]);
        } else {
          __m256 q[NV];
          for (int v = 0; v < NV; ++v) q[v] = decode_scaled<BITS, s>(w[v]);
          for (int m = 0; m < MT; ++m) {
            const __m256 xb = _mm256_broadcast_ss(cx + s * MT + m);
            for (int v = 0; v < NV; ++v) acc[m][v][s % NACC] = _mm256_fmadd_ps(q[v], xb, acc[m][v][s % NACC]);
          }
        }
      });
    };
    int64_t c = 0;
    if constexpr (P < 8) {
      // int8 has 4 columns per chunk: two chunks per iteration halve the loop overhead.
      for (; c + 2 <= L.cpg; c += 2, p += 2 * NVT * VB, xk += 2 * P * MT) {
        chunk(p, xk);
        chunk(p + NVT * VB, xk + P * MT);
      }
    }
    for (; c < L.cpg; ++c, p += NVT * VB, xk += P * MT) chunk(p, xk);
    // Fold the group: tot += acc * scale + bias * sum(x in group), 8 rows per instruction.
    if constexpr (LOWBIT_PF > 0) {
      // The scales take 128 or 256 bytes of the stream that the chunk loop did not prefetch.
      for (int64_t l = 0; l < L.scale_bytes(); l += 64) _mm_prefetch((const char*)(p + LOWBIT_PF + l), _MM_HINT_T0);
    }
    for (int v = 0; v < NV; ++v) {
      __m256 sc, bz;
      load_scales(L, p, (v0 + v) * VR, sc, bz);
      for (int m = 0; m < MT; ++m) {
        __m256 sum = acc[m][v][0];
        for (int j = 1; j < NACC; ++j) sum = _mm256_add_ps(sum, acc[m][v][j]);
        tot[m][v] = _mm256_fmadd_ps(sum, sc, tot[m][v]);
        tot[m][v] = _mm256_fmadd_ps(bz, _mm256_broadcast_ss(a.xs + g * MT + m), tot[m][v]);
      }
    }
    p += L.scale_bytes();
  }

  for (int m = 0; m < MT; ++m) {
    float* yr = a.y + m * L.n;
    for (int v = 0; v < NV; ++v) {
      const int r0 = (v0 + v) * VR;
      __m256 out = tot[m][v];
      if (a.bias && r0 + VR <= a.nvalid) out = _mm256_add_ps(out, _mm256_loadu_ps(a.bias + r0));
      if (r0 + VR <= a.nvalid) {
        _mm256_storeu_ps(yr + r0, out);
      } else {
        alignas(32) float o[VR];
        _mm256_store_ps(o, out);
        for (int i = 0; r0 + i < a.nvalid; ++i) yr[r0 + i] = a.bias ? o[i] + a.bias[r0 + i] : o[i];
      }
    }
  }
}

// One activation row takes all four row vectors of a tile at once (8 accumulators); more rows take
// two row vectors per pass (up to 8 accumulators), the second pass finding the tile in L1/L2.
template <int BITS, int MT>
LOWBIT_INLINE void gemv_pass(const Layout& L, const GemvArgs& a) {
  if constexpr (MT == 1) {
    gemv_tile<BITS, NVT, 1>(L, a, 0);
  } else {
    gemv_tile<BITS, NVT / 2, MT>(L, a, 0);
    gemv_tile<BITS, NVT / 2, MT>(L, a, NVT / 2);
  }
}

template <int BITS>
void gemv_tiles_t(const Layout& L, const uint8_t* qw, const float* xp, const float* xs, int64_t M,
                  const float* bias, float* y, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    GemvArgs a;
    a.tile = qw + L.tile_offset(t);
    a.bias = bias ? bias + t * TR : nullptr;
    a.nvalid = (int)std::min<int64_t>(TR, L.n - t * TR);
    for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
      a.xp = xp + m0 * L.kp;
      a.xs = xs + m0 * L.ngp;
      a.y = y + m0 * L.n + t * TR;
      switch (std::min<int64_t>(MT_MAX, M - m0)) {
        case 1: gemv_pass<BITS, 1>(L, a); break;
        case 2: gemv_pass<BITS, 2>(L, a); break;
        case 3: gemv_pass<BITS, 3>(L, a); break;
        case 4: gemv_pass<BITS, 4>(L, a); break;
      }
    }
  }
}

// GEMV over tiles [t0, t1) for all M rows (xp/xs prepared by prep_x_rows); y is [M, n].
inline void gemv_tiles(const Layout& L, const uint8_t* qw, const float* xp, const float* xs, int64_t M,
                       const float* bias, float* y, int64_t t0, int64_t t1) {
  switch (L.bits) {
    case 8: gemv_tiles_t<8>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 4: gemv_tiles_t<4>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 3: gemv_tiles_t<3>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 2: gemv_tiles_t<2>(L, qw, xp, xs, M, bias, y, t0, t1); break;
    case 1: gemv_tiles_t<1>(L, qw, xp, xs, M, bias, y, t0, t1); break;
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization of tiles [t0, t1) into W transposed: wt[k][(t - t0) * 32 + row], k < kp, row
// stride ldw (floats). Each value is code * scale + (-scale * zero), one rounding.

template <int BITS>
void dequant_t_tiles_t(const Layout& L, const uint8_t* qw, int64_t t0, int64_t t1, float* wt, int64_t ldw) {
  constexpr int P = codes_per_lane(BITS), VB = vec_bytes(BITS);
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = qw + L.tile_offset(t);
    float* wc = wt + (t - t0) * TR;
    for (int64_t g = 0; g < L.ngp; ++g) {
      __m256 sc[NVT], bz[NVT];
      for (int v = 0; v < NVT; ++v) load_scales(L, p + L.cpg * NVT * VB, v * VR, sc[v], bz[v]);
      for (int64_t c = 0; c < L.cpg; ++c, p += NVT * VB) {
        float* wk = wc + (g * L.geff + c * P) * ldw;
        for (int v = 0; v < NVT; ++v) {
          const __m256i w = load_vec<BITS>(p + v * VB);
          static_for<P>([&](auto sci) LOWBIT_LAMBDA_INLINE {
            constexpr int s = decltype(sci)::value;
            _mm256_storeu_ps(wk + s * ldw + v * VR, _mm256_fmadd_ps(decode_plain<BITS, s>(w), sc[v], bz[v]));
          });
        }
      }
      p += L.scale_bytes();
    }
  }
}

inline void dequant_t_tiles(const Layout& L, const uint8_t* qw, int64_t t0, int64_t t1, float* wt,
                            int64_t ldw) {
  switch (L.bits) {
    case 8: dequant_t_tiles_t<8>(L, qw, t0, t1, wt, ldw); break;
    case 4: dequant_t_tiles_t<4>(L, qw, t0, t1, wt, ldw); break;
    case 3: dequant_t_tiles_t<3>(L, qw, t0, t1, wt, ldw); break;
    case 2: dequant_t_tiles_t<2>(L, qw, t0, t1, wt, ldw); break;
    case 1: dequant_t_tiles_t<1>(L, qw, t0, t1, wt, ldw); break;
  }
}

}  // namespace lowbit
