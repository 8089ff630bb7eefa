// Low-bit weight x float32 activation matmul for x86 CPUs with AVX2 + FMA.
//
// Canonical weight: codes uint8 [N, K] in [0, 2^bits), scale and zero float32 [N, K/G],
// W[n, k] = (codes[n, k] - zero[n, k/G]) * scale[n, k/G].
//
// Packed layout (see prepack):
//   * rows are taken four at a time ("row tile"); a tile stores, block after block, the four rows'
//     bytes for one block of B = 8*S weights, so a tile is one sequential stream;
//   * inside a row's block, 32-bit lane i (0..7) holds the codes of k = 8*s + i for the S "steps"
//     s, code s at bit bits*s (int8: two lane words, steps 0-3 and 4-7; int3: 24-bit lanes);
//   * scale and bias = -scale*zero per (tile, group): 8 floats {s_r0..s_r3, b_r0..b_r3}.
//
// The GEMV never shifts a code down to bit 0: masking code s in place gives the exact float
// code * 2^(bits*s) after int->float conversion (at most 8 significant bits), and the matching
// activation was multiplied by 2^-(bits*s) beforehand, so each product equals code * x exactly
// (both scalings are powers of two). That saves one instruction per 8 weights. The code in the
// top bits of a lane is shifted instead, since masking it would set the sign bit.
//
// Per group: y += s * sum(code * x) + b * sum(x), with sum(x) per group computed once per call.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

constexpr int NR = 4;  // rows per tile

struct Fmt {
  int bits, S, bytes;  // steps (of 8 weights) per block, bytes per row per block
  int block() const { return 8 * S; }
};

Fmt fmt_of(int bits) {
  switch (bits) {
    case 8: return {8, 8, 64};
    case 4: return {4, 8, 32};
    case 3: return {3, 8, 24};
    case 2: return {2, 16, 32};
    case 1: return {1, 32, 32};
  }
  TORCH_CHECK(false, "lowbit: unsupported bit width ", bits);
}

template <int BITS> struct F;
template <> struct F<8> { static constexpr int S = 8, BYTES = 64; };
template <> struct F<4> { static constexpr int S = 8, BYTES = 32; };
template <> struct F<3> { static constexpr int S = 8, BYTES = 24; };
template <> struct F<2> { static constexpr int S = 16, BYTES = 32; };
template <> struct F<1> { static constexpr int S = 32, BYTES = 32; };

// Where step s lives: which 32-bit lane word, and at which bit.
constexpr int word_of(int bits, int s) { return bits == 8 ? s / 4 : 0; }
constexpr int pos_of(int bits, int s) { return bits == 8 ? 8 * (s % 4) : bits * s; }
constexpr bool top_of(int bits, int s) { return pos_of(bits, s) + bits == 32; }
// Exponent the activation of step s is scaled down by (0 where the code is shifted to bit 0).
constexpr int xexp_of(int bits, int s) { return top_of(bits, s) ? 0 : pos_of(bits, s); }

struct Layout {
  Fmt f;
  int64_t n, k, np, kp, nb, ntile;
  int64_t ngp;   // groups per row in the packed scales (padding included)
  int64_t bpg;   // blocks per group (groups >= one block), else 0
  int spg;       // steps per group (groups shorter than a block), else 0
  int64_t geff;  // group length in the padded K
};

bool shape_ok(int64_t n, int64_t k, int64_t bits, int64_t g) {
  if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8)) return false;
  if (n < 1 || k < 1 || g < 1 || k % g != 0) return false;
  if (g == k) return true;  // per-channel: any K (padded with zero codes)
  const int64_t b = fmt_of((int)bits).block();
  return g % 32 == 0 && (g % b == 0 || b % g == 0);
}

Layout layout_of(int64_t n, int64_t k, int64_t bits, int64_t g) {
  TORCH_CHECK(shape_ok(n, k, bits, g), "lowbit: unsupported shape/format n=", n, " k=", k,
              " bits=", bits, " group_size=", g);
  Layout L;
  L.f = fmt_of((int)bits);
  const int64_t B = L.f.block();
  L.n = n;
  L.k = k;
  L.np = (n + NR - 1) / NR * NR;
  L.ntile = L.np / NR;
  L.kp = (k + B - 1) / B * B;
  L.nb = L.kp / B;
  if (g == k) {
    L.geff = L.kp;
    L.ngp = 1;
    L.bpg = L.nb;
    L.spg = 0;
  } else if (g >= B) {
    L.geff = g;
    L.ngp = k / g;
    L.bpg = g / B;
    L.spg = 0;
  } else {
    L.geff = g;
    L.ngp = L.kp / g;
    L.bpg = 0;
    L.spg = (int)(g / 8);
  }
  return L;
}

int64_t qweight_bytes(const Layout& L) {
  // +32: the int3 loader reads 4 bytes past the last block.
  return L.ntile * L.nb * NR * L.f.bytes + 32;
}

// ---------------------------------------------------------------------------------------------
// Packing

void put_code(uint8_t* rowblock, int bits, int s, int lane, uint32_t c) {
  if (bits == 8) {
    rowblock[(s / 4) * 32 + lane * 4 + (s % 4)] = (uint8_t)c;
    return;
  }
  const int lane_bytes = bits == 3 ? 3 : 4;
  uint8_t* p = rowblock + lane * lane_bytes;
  uint32_t w = 0;
  std::memcpy(&w, p, lane_bytes);
  w |= c << (bits * s);
  std::memcpy(p, &w, lane_bytes);
}

std::vector<at::Tensor> prepack(at::Tensor codes, at::Tensor scale, at::Tensor zero, int64_t bits,
                                int64_t group_size) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte, "lowbit: codes must be uint8 [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1);
  const Layout L = layout_of(n, k, bits, group_size);
  const int64_t ng = k / group_size;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == ng, "lowbit: scale must be [N, K/G]");
  TORCH_CHECK(zero.dim() == 2 && zero.size(0) == n && zero.size(1) == ng, "lowbit: zero must be [N, K/G]");
  codes = codes.contiguous();
  scale = scale.to(at::kFloat).contiguous();
  zero = zero.to(at::kFloat).contiguous();

  auto qw = at::zeros({qweight_bytes(L)}, at::TensorOptions().dtype(at::kByte));
  auto sb = at::zeros({L.ntile, L.ngp, 2 * NR}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* spp = scale.data_ptr<float>();
  const float* zpp = zero.data_ptr<float>();
  uint8_t* qp = qw.data_ptr<uint8_t>();
  float* sbp = sb.data_ptr<float>();
  const int B = L.f.block(), S = L.f.S, BY = L.f.bytes, nbits = L.f.bits;
  const uint32_t cmax = (1u << nbits) - 1;
  std::atomic<bool> bad{false};

  at::parallel_for(0, L.ntile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int r = 0; r < NR; ++r) {
        const int64_t row = t * NR + r;
        if (row >= n) continue;  // padding rows keep zero codes and zero scales
        const uint8_t* crow = cp + row * k;
        for (int64_t b = 0; b < L.nb; ++b) {
          uint8_t* rb = qp + ((t * L.nb + b) * NR + r) * BY;
          for (int s = 0; s < S; ++s) {
            for (int i = 0; i < 8; ++i) {
              const int64_t kk = b * B + 8 * s + i;
              if (kk >= k) continue;
              const uint32_t c = crow[kk];
              if (c > cmax) bad = true;
              put_code(rb, nbits, s, i, c & cmax);
            }
          }
        }
        // Group count from the canonical data; padded groups stay zero.
        const int64_t ngr = (group_size == k) ? 1 : ng;
        for (int64_t g = 0; g < ngr; ++g) {
          const float s = spp[row * ng + g], z = zpp[row * ng + g];
          sbp[(t * L.ngp + g) * 2 * NR + r] = s;
          sbp[(t * L.ngp + g) * 2 * NR + NR + r] = -(s * z);
        }
      }
    }
  });
  TORCH_CHECK(!bad.load(), "lowbit: a code does not fit in ", bits, " bits");
  return {qw, sb};
}

// ---------------------------------------------------------------------------------------------
// Kernel pieces

template <int N, typename Fn, int... I>
inline __attribute__((always_inline)) void static_for_impl(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
inline __attribute__((always_inline)) void static_for(Fn&& fn) {
  static_for_impl<N>(fn, std::make_integer_sequence<int, N>{});
}

template <int BITS>
inline __attribute__((always_inline)) void load_block(const uint8_t* p, __m256i* v) {
  if constexpr (BITS == 8) {
    v[0] = _mm256_loadu_si256((const __m256i*)p);
    v[1] = _mm256_loadu_si256((const __m256i*)(p + 32));
  } else if constexpr (BITS == 3) {
    // lanes 0-3 come from bytes 0..11, lanes 4-7 from bytes 12..23; 3 bytes per lane.
    const __m128i lo = _mm_loadu_si128((const __m128i*)p);
    const __m128i hi = _mm_loadu_si128((const __m128i*)(p + 12));
    const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
    const __m256i shuf = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    v[0] = _mm256_shuffle_epi8(raw, shuf);
  } else {
    v[0] = _mm256_loadu_si256((const __m256i*)p);
  }
}

// Code of step s as float, times 2^xexp_of(BITS, s).
template <int BITS, int s>
inline __attribute__((always_inline)) __m256 decode_scaled(const __m256i* v) {
  constexpr int w = word_of(BITS, s), pos = pos_of(BITS, s);
  __m256i q;
  if constexpr (top_of(BITS, s)) {
    q = _mm256_srli_epi32(v[w], pos);
  } else {
    q = _mm256_and_si256(v[w], _mm256_set1_epi32((int)(((1u << BITS) - 1) << pos)));
  }
  return _mm256_cvtepi32_ps(q);
}

// Code of step s as float, shifted to bit 0 (for dequantization).
template <int BITS, int s>
inline __attribute__((always_inline)) __m256 decode_plain(const __m256i* v) {
  constexpr int w = word_of(BITS, s), pos = pos_of(BITS, s);
  __m256i q = _mm256_srli_epi32(v[w], pos);
  if constexpr (!top_of(BITS, s)) q = _mm256_and_si256(q, _mm256_set1_epi32((1 << BITS) - 1));
  return _mm256_cvtepi32_ps(q);
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

struct GemvArgs {
  const uint8_t* qw;   // this tile's first block
  const float* sb;     // this tile's scales/biases
  const float* xp;     // scaled activations [M, kp]
  const float* xs;     // activation sums per group [M, ngp]
  int64_t kp, ngp, nb, bpg;
  float* y;            // output [M, ystride], at this tile's first column
  int64_t ystride;
  int nvalid;          // rows of the tile that exist
  const float* bias;   // this tile's bias (or null)
};

// MT activation rows against one tile of four weight rows.
template <int BITS, int MT, int SPG>
void gemv_tile(const GemvArgs& a) {
  constexpr int S = F<BITS>::S, BY = F<BITS>::BYTES;
  constexpr int NV = BITS == 8 ? 2 : 1;
  __m256 acc[MT][NR], tot[MT][NR];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = tot[m][r] = _mm256_setzero_ps();

  const float* sbp = a.sb;
  auto fold = [&]() __attribute__((always_inline)) {
    for (int r = 0; r < NR; ++r) {
      const __m256 sc = _mm256_broadcast_ss(sbp + r);
      for (int m = 0; m < MT; ++m) {
        tot[m][r] = _mm256_fmadd_ps(acc[m][r], sc, tot[m][r]);
        acc[m][r] = _mm256_setzero_ps();
      }
    }
    sbp += 2 * NR;
  };

  int64_t gcount = 0;
  const uint8_t* p = a.qw;
  const float* xb = a.xp;
  for (int64_t b = 0; b < a.nb; ++b, p += NR * BY, xb += 8 * S) {
    // The hardware prefetcher follows one stream well; a nudge ahead helps it start early.
    _mm_prefetch((const char*)(p + 1024), _MM_HINT_T0);
    if constexpr (NR * BY > 64) _mm_prefetch((const char*)(p + 1024 + 64), _MM_HINT_T0);
    if constexpr (NR * BY > 128) {
      _mm_prefetch((const char*)(p + 1024 + 128), _MM_HINT_T0);
      _mm_prefetch((const char*)(p + 1024 + 192), _MM_HINT_T0);
    }
    __m256i v[NR][NV];
    for (int r = 0; r < NR; ++r) load_block<BITS>(p + r * BY, v[r]);
    static_for<S>([&](auto sc) __attribute__((always_inline)) {
      constexpr int s = decltype(sc)::value;
      __m256 xv[MT];
      for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(xb + m * a.kp + 8 * s);
      for (int r = 0; r < NR; ++r) {
        const __m256 w = decode_scaled<BITS, s>(v[r]);
        for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(w, xv[m], acc[m][r]);
      }
      if constexpr (SPG > 0 && (s + 1) % SPG == 0) fold();
    });
    if constexpr (SPG == 0) {
      if (++gcount == a.bpg) {
        gcount = 0;
        fold();
      }
    }
  }

  // Zero-point term: sum over groups of b[g] * sum(x in g), four rows at once.
  for (int m = 0; m < MT; ++m) {
    __m128 bacc = _mm_setzero_ps();
    const float* xsm = a.xs + m * a.ngp;
    for (int64_t g = 0; g < a.ngp; ++g)
      bacc = _mm_fmadd_ps(_mm_loadu_ps(a.sb + g * 2 * NR + NR), _mm_set1_ps(xsm[g]), bacc);
    __m128 out = _mm_add_ps(hsum4(tot[m][0], tot[m][1], tot[m][2], tot[m][3]), bacc);
    alignas(16) float o[NR];
    _mm_store_ps(o, out);
    float* yrow = a.y + m * a.ystride;
    for (int r = 0; r < a.nvalid; ++r) yrow[r] = a.bias ? o[r] + a.bias[r] : o[r];
  }
}

// Activations scaled to match the in-place codes, plus per-group sums of the raw activations.
void prep_x(const Layout& L, const float* x, int64_t M, float* xp, float* xs) {
  const int B = L.f.block();
  std::vector<float> mult(B);
  for (int j = 0; j < B; ++j) {
    int e = 0;
    const int s = j / 8;
    switch (L.f.bits) {
      case 8: e = xexp_of(8, s); break;
      case 4: e = xexp_of(4, s); break;
      case 3: e = xexp_of(3, s); break;
      case 2: e = xexp_of(2, s); break;
      case 1: e = xexp_of(1, s); break;
    }
    mult[j] = std::ldexp(1.0f, -e);
  }
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = x + m * L.k;
      float* xpr = xp + m * L.kp;
      for (int64_t kk = 0; kk < L.k; ++kk) xpr[kk] = xr[kk] * mult[kk % B];
      for (int64_t kk = L.k; kk < L.kp; ++kk) xpr[kk] = 0.f;
      float* xsr = xs + m * L.ngp;
      for (int64_t g = 0; g < L.ngp; ++g) {
        const int64_t k0 = g * L.geff, k1 = std::min(L.k, k0 + L.geff);
        double acc = 0.0;  // double: the sum multiplies the zero point, keep it tight
        for (int64_t kk = k0; kk < k1; ++kk) acc += xr[kk];
        xsr[g] = (float)acc;
      }
    }
  });
}

using TileFn = void (*)(const GemvArgs&);

template <int BITS, int MT>
TileFn pick_spg(int spg) {
  constexpr int S = F<BITS>::S;
  switch (spg) {
    case 0: return gemv_tile<BITS, MT, 0>;
    case 4: return gemv_tile<BITS, MT, 4>;
    case 8: if constexpr (S > 8) return gemv_tile<BITS, MT, 8>; break;
    case 16: if constexpr (S > 16) return gemv_tile<BITS, MT, 16>; break;
  }
  TORCH_CHECK(false, "lowbit: bad steps-per-group ", spg);
}

template <int BITS>
TileFn pick_mt(int mt, int spg) {
  switch (mt) {
    case 1: return pick_spg<BITS, 1>(spg);
    case 2: return pick_spg<BITS, 2>(spg);
    case 3: return pick_spg<BITS, 3>(spg);
    case 4: return pick_spg<BITS, 4>(spg);
  }
  TORCH_CHECK(false, "lowbit: bad row block ", mt);
}

TileFn pick(int bits, int mt, int spg) {
  switch (bits) {
    case 8: return pick_mt<8>(mt, spg);
    case 4: return pick_mt<4>(mt, spg);
    case 3: return pick_mt<3>(mt, spg);
    case 2: return pick_mt<2>(mt, spg);
    case 1: return pick_mt<1>(mt, spg);
  }
  TORCH_CHECK(false, "lowbit: bad bits ", bits);
}

// Activation rows handled together per pass over a weight tile.
constexpr int MT_MAX = 4;

void check_packed(const Layout& L, const at::Tensor& qw, const at::Tensor& sb) {
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous() && qw.numel() == qweight_bytes(L),
              "lowbit: packed weight does not match n/k/bits/group_size");
  TORCH_CHECK(sb.scalar_type() == at::kFloat && sb.is_contiguous() && sb.numel() == L.ntile * L.ngp * 2 * NR,
              "lowbit: packed scales do not match n/k/bits/group_size");
}

void gemv(const Layout& L, const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sb,
          const float* bias, at::Tensor& y) {
  const int64_t M = x.size(0);
  auto xp = at::empty({M, L.kp}, x.options());
  auto xs = at::empty({M, L.ngp}, x.options());
  prep_x(L, x.data_ptr<float>(), M, xp.data_ptr<float>(), xs.data_ptr<float>());
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const float* s = sb.data_ptr<float>();
  const float* xpp = xp.data_ptr<float>();
  const float* xsp = xs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nfull = (int)(M / MT_MAX), rem = (int)(M % MT_MAX);
  TileFn f_full = nfull ? pick(L.f.bits, MT_MAX, L.spg) : nullptr;
  TileFn f_rem = rem ? pick(L.f.bits, rem, L.spg) : nullptr;
  const int64_t tile_bytes = L.nb * NR * L.f.bytes;

  // Each output element is produced by one thread in a fixed order: results do not depend on
  // the thread count.
  at::parallel_for(0, L.ntile, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      GemvArgs a;
      a.qw = q + t * tile_bytes;
      a.sb = s + t * L.ngp * 2 * NR;
      a.kp = L.kp;
      a.ngp = L.ngp;
      a.nb = L.nb;
      a.bpg = L.bpg;
      a.ystride = L.n;
      a.nvalid = (int)std::min<int64_t>(NR, L.n - t * NR);
      a.bias = bias ? bias + t * NR : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
        a.xp = xpp + m0 * L.kp;
        a.xs = xsp + m0 * L.ngp;
        a.y = yp + m0 * L.n + t * NR;
        (M - m0 >= MT_MAX ? f_full : f_rem)(a);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Dequantization (for large M: dequantize a slab of rows, then a float GEMM)

template <int BITS>
void dequant_tiles(const Layout& L, const uint8_t* q, const float* sb, int64_t t0, int64_t t1,
                   float* w, int64_t wstride) {
  constexpr int S = F<BITS>::S, BY = F<BITS>::BYTES, B = 8 * S;
  constexpr int NV = BITS == 8 ? 2 : 1;
  const int64_t tile_bytes = L.nb * NR * BY;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* p = q + t * tile_bytes;
    const float* st = sb + t * L.ngp * 2 * NR;
    for (int64_t b = 0; b < L.nb; ++b) {
      for (int r = 0; r < NR; ++r) {
        __m256i v[NV];
        load_block<BITS>(p + (b * NR + r) * BY, v);
        float* wr = w + ((t - t0) * NR + r) * wstride + b * B;
        static_for<S>([&](auto sc) __attribute__((always_inline)) {
          constexpr int s = decltype(sc)::value;
          const int64_t g = (b * B + 8 * s) / L.geff;
          const __m256 scale = _mm256_broadcast_ss(st + g * 2 * NR + r);
          const __m256 zb = _mm256_broadcast_ss(st + g * 2 * NR + NR + r);
          _mm256_storeu_ps(wr + 8 * s, _mm256_fmadd_ps(decode_plain<BITS, s>(v), scale, zb));
        });
      }
    }
  }
}

void dequant_range(const Layout& L, const at::Tensor& qw, const at::Tensor& sb, int64_t t0, int64_t t1,
                   float* w, int64_t wstride) {
  const uint8_t* q = qw.data_ptr<uint8_t>();
  const float* s = sb.data_ptr<float>();
  at::parallel_for(t0, t1, 1, [&](int64_t a, int64_t b) {
    float* wa = w + (a - t0) * NR * wstride;
    switch (L.f.bits) {
      case 8: dequant_tiles<8>(L, q, s, a, b, wa, wstride); break;
      case 4: dequant_tiles<4>(L, q, s, a, b, wa, wstride); break;
      case 3: dequant_tiles<3>(L, q, s, a, b, wa, wstride); break;
      case 2: dequant_tiles<2>(L, q, s, a, b, wa, wstride); break;
      case 1: dequant_tiles<1>(L, q, s, a, b, wa, wstride); break;
    }
  });
}

at::Tensor dequant(at::Tensor qw, at::Tensor sb, int64_t bits, int64_t group_size, int64_t n, int64_t k) {
  const Layout L = layout_of(n, k, bits, group_size);
  check_packed(L, qw, sb);
  auto w = at::empty({L.np, L.kp}, at::TensorOptions().dtype(at::kFloat));
  dequant_range(L, qw, sb, 0, L.ntile, w.data_ptr<float>(), L.kp);
  return w.narrow(0, 0, n).narrow(1, 0, k).contiguous();
}

// Rows of W dequantized per slab in the large-M path (about 4-16 MB of float32, L3-resident).
int64_t slab_tiles(const Layout& L) {
  int64_t rows = std::max<int64_t>(256, ((int64_t)4 << 20) / L.kp);
  rows = std::min<int64_t>(std::max<int64_t>(rows, 256), 1024);
  return std::max<int64_t>(1, rows / NR);
}

void dequant_mm(const Layout& L, const at::Tensor& x, const at::Tensor& qw, const at::Tensor& sb,
                const at::Tensor* bias, at::Tensor& y) {
  const int64_t st = std::min(slab_tiles(L), L.ntile);
  auto w = at::empty({st * NR, L.kp}, x.options());
  for (int64_t t0 = 0; t0 < L.ntile; t0 += st) {
    const int64_t t1 = std::min(L.ntile, t0 + st);
    dequant_range(L, qw, sb, t0, t1, w.data_ptr<float>(), L.kp);
    const int64_t r0 = t0 * NR, r1 = std::min(L.n, t1 * NR);
    auto wv = w.narrow(0, 0, r1 - r0).narrow(1, 0, L.k);
    auto yv = y.narrow(1, r0, r1 - r0);
    if (bias)
      yv.copy_(at::addmm(bias->narrow(0, r0, r1 - r0), x, wv.t()));
    else
      yv.copy_(at::mm(x, wv.t()));
  }
}

// Largest M that still takes the GEMV path (measured crossover, see benchmarks/kernel_gemv.py).
int64_t g_gemv_max_m = 8;

at::Tensor linear(at::Tensor x, at::Tensor qw, at::Tensor sb, int64_t bits, int64_t group_size, int64_t n,
                  int64_t k, c10::optional<at::Tensor> bias, int64_t path) {
  const Layout L = layout_of(n, k, bits, group_size);
  check_packed(L, qw, sb);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "lowbit: x must be [M, K]");
  x = x.to(at::kFloat).contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == n, "lowbit: bias must be [N]");
  }
  const int64_t M = x.size(0);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const bool use_gemv = path == 1 || (path == 0 && M <= g_gemv_max_m);
  if (use_gemv) {
    gemv(L, x, qw, sb, b.defined() ? b.data_ptr<float>() : nullptr, y);
  } else {
    dequant_mm(L, x, qw, sb, b.defined() ? &b : nullptr, y);
  }
  return y;
}

void set_gemv_max_m(int64_t m) { g_gemv_max_m = m; }
int64_t get_gemv_max_m() { return g_gemv_max_m; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit CPU kernels (AVX2/FMA): packed low-bit weight x float32 activation matmul";
  m.def("supports", &shape_ok, "whether (n, k, bits, group_size) has a packed layout");
  m.def("prepack", &prepack, "canonical codes/scale/zero -> [qweight, sb]");
  m.def("linear", &linear, "x [M,K] @ W^T (+bias); path 0=auto 1=gemv 2=dequant+mm",
        py::arg("x"), py::arg("qweight"), py::arg("sb"), py::arg("bits"), py::arg("group_size"),
        py::arg("n"), py::arg("k"), py::arg("bias") = py::none(), py::arg("path") = 0);
  m.def("dequant", &dequant, "packed -> float32 W [N, K]");
  m.def("set_gemv_max_m", &set_gemv_max_m);
  m.def("get_gemv_max_m", &get_gemv_max_m);
}
