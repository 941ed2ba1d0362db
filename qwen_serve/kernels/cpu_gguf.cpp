// GGUF linears on the CPU straight from the file's blocks (AVX2; VNNI where the CPU has it).
//
// The activations are rounded to int8 in blocks of 32 with one float scale each (kernels/cpu_gguf.py's
// `quantize_reference` is the same rounding in torch), so every block of weights is an integer dot product
// of its codes with the int8 activations, scaled once: w = code * scale - min per group gives
// sum(w * x) = scale * dx * sum(code * xq) - min * dx * sum(xq). Where the minimum is a fixed offset of the
// block's scale (Q4_0, Q5_0) the integer -offset * sum(xq) starts the dot product; Q4_K / Q5_K's own
// minimums are summed once a block from `Act::sum32`; Q8_0 and Q6_K take signed codes. The block layouts
// are ggml's (layers/quantization/gguf.py decodes them the same way in torch).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_kernels.h"

#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the GGUF CPU kernels need AVX2, FMA and F16C"
#endif

namespace {

// The block formats, in the order of kernels/cpu_gguf.py's TYPE_IDS.
enum Type : int64_t { Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K };

// One row of activations rounded to int8: `q` [K], `d` [K / 32] scales, `isum` [K / 32] = sum(q) and
// `sum32` = d * isum.
struct Act {
  const int8_t* q;
  const float* d;
  const int32_t* isum;
  const float* sum32;
};

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// `init` plus 32 unsigned codes times 32 int8 activations -> 8 int32 lanes, lane i the sum of products
// 4i..4i+3. Without VNNI, maddubs's int16 pair sums cannot saturate: codes are < 64 here (Q8_0 and Q6_K go
// through `sdot`, magnitudes <= 128) and activations within +-127.
inline __m256i udot(__m256i codes, __m256i x, __m256i init = _mm256_setzero_si256()) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(init, codes, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(init, codes, x);
#else
  return _mm256_add_epi32(init, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
#endif
}

// Signed codes (Q8_0, Q6_K less its offset): |w| times x with w's sign.
inline __m256i sdot(__m256i w, __m256i x) { return udot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }

// 16 bytes at p -> 32 codes: their low nibbles (values 0-15), then their high ones (16-31).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
#if defined(__AVX512BW__) && defined(__AVX512VL__)  // one variable shift of both halves
  return _mm256_and_si256(_mm256_srlv_epi16(_mm256_broadcastsi128_si256(b), _mm256_setr_epi64x(0, 0, 0x0004000400040004,
                                                                                                 0x0004000400040004)),
                          _mm256_set1_epi8(0x0F));
#else
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
#endif
}

// codes + 16 where bit j of `bits` is set (Q5_0's fifth bits).
inline __m256i add_fifth_bits(__m256i codes, uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return _mm256_mask_add_epi8(codes, bits, codes, _mm256_set1_epi8(0x10));
#else
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201);
  return _mm256_or_si256(codes, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select),
                                                 _mm256_set1_epi8(0x10)));
#endif
}

// The float16 at p in all 8 lanes.
inline __m256 half_lanes(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(h)));
}

// acc += float(dot lanes) * scale; the caller subtracts the minimums' sum once a row.
inline void add_scaled(__m256& acc, __m256i dot, float scale) {
  acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale), acc);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline const __m256i* xq(const Act& a, int64_t block32) {
  return reinterpret_cast<const __m256i*>(a.q + block32 * 32);
}

// The six-bit scales and minimums of a Q4_K / Q5_K block's 12 bytes (ggml's get_scale_min_k4).
inline void k_scales(const uint8_t* s, int* sc, int* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// Each format's `block` adds one block's products for R activation rows into two sets of accumulators (two
// chains of multiply-adds, so neither waits on the other's latency) and, where the format has minimums,
// what they take away into `mins`. Q6_K's codes are made signed (less their offset of 32); Q4_0's and
// Q5_0's offsets start the dot product instead (`offset32`).
template <Type T> struct Format;

// One block of 32 unsigned codes with w = d * (code - 2^shift), d the float16 at d_ptr: the offset's products
// start the dot product (-2^shift * sum(xq), an integer), so the block costs no more than a symmetric one.
template <int R>
inline void offset32(__m256i codes, int shift, const uint8_t* d_ptr, const Act* x, int64_t i, __m256* acc) {
  const __m256 d = half_lanes(d_ptr);
  for (int r = 0; r < R; ++r) {
    const __m256i init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-(x[r].isum[i] << shift)));
    const __m256i dot = udot(codes, _mm256_loadu_si256(xq(x[r], i)), init);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[i])), acc[r]);
  }
}

template <> struct Format<Q4_0> {
  static constexpr int values = 32, bytes = 18;
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*, float*) {
    offset32<R>(nibbles(b + 2), 3, b, x, i, acc);
  }
};

template <> struct Format<Q5_0> {
  static constexpr int values = 32, bytes = 22;
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*, float*) {
    uint32_t high;
    std::memcpy(&high, b + 2, 4);
    offset32<R>(add_fifth_bits(nibbles(b + 6), high), 4, b, x, i, acc);
  }
};

template <> struct Format<Q8_0> {
  static constexpr int values = 32, bytes = 34;
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*, float*) {
    const __m256 d = half_lanes(b);
    const __m256i w = load32(b + 2);
    for (int r = 0; r < R; ++r) {
      const __m256i dot = sdot(w, _mm256_loadu_si256(xq(x[r], i)));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[i])), acc[r]);
    }
  }
};

// Chunk c (of 4) of a Q4_K / Q5_K block: the codes of its sub-blocks 2c (`lo`) and 2c + 1 (`hi`).
template <bool FifthBit> inline void k_chunk_codes(const uint8_t* b, int c, __m256i& lo, __m256i& hi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), q = load32(b + (FifthBit ? 48 : 16) + 32 * c);
  lo = _mm256_and_si256(q, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
  if constexpr (FifthBit) {
    const __m256i qh = load32(b + 16), bit_lo = _mm256_set1_epi8(static_cast<char>(1 << (2 * c)));
    const __m256i bit_hi = _mm256_set1_epi8(static_cast<char>(2 << (2 * c))), five = _mm256_set1_epi8(0x10);
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_lo), bit_lo), five));
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_hi), bit_hi), five));
  }
}

// Half h (of 2) of a Q6_K block: the codes (0-63) of its 4 sub-blocks of 32. Each half of 128 values keeps its
// low nibbles in 64 bytes (bytes 0-31: values 0-31 low, 64-95 high; bytes 32-63: 32-63, 96-127) and its top
// two bits in 32 bytes (bit pairs 0, 2, 4, 6 for values 0-31, 32-63, 64-95, 96-127).
inline void q6_k_half_codes(const uint8_t* b, int h, __m256i* codes) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  const __m256i a = load32(b + 64 * h), c = load32(b + 64 * h + 32), qh = load32(b + 128 + 32 * h);
  codes[0] = _mm256_or_si256(_mm256_and_si256(a, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top2));
  codes[1] = _mm256_or_si256(_mm256_and_si256(c, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top2));
  codes[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low4), _mm256_and_si256(qh, top2));
  codes[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), low4),
                             _mm256_and_si256(_mm256_srli_epi16(qh, 2), top2));
}

// Q4_K and Q5_K: 256 values in 4 chunks of 64; a chunk's 32 bytes hold sub-block 2c in their low nibbles
// and 2c + 1 in their high ones; Q5_K's 32 bytes of fifth bits hold chunk c's in bits 2c and 2c + 1.
// w = d * scale_j * code - dmin * min_j with six-bit scale_j, min_j per sub-block j of 32.
template <bool FifthBit> struct KFormat {
  static constexpr int values = 256, bytes = FifthBit ? 176 : 144;
  template <int R>
  static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc0, __m256* acc1, float* mins) {
    const float d = half_at(b), dmin = half_at(b + 2);
    int sc[8], mn[8];
    k_scales(b + 4, sc, mn);
    for (int c = 0; c < 4; ++c) {
      __m256i lo, hi;
      k_chunk_codes<FifthBit>(b, c, lo, hi);
      for (int r = 0; r < R; ++r) {
        const int64_t j = 8 * i + 2 * c;
        add_scaled(acc0[r], udot(lo, _mm256_loadu_si256(xq(x[r], j))), d * sc[2 * c] * x[r].d[j]);
        add_scaled(acc1[r], udot(hi, _mm256_loadu_si256(xq(x[r], j + 1))), d * sc[2 * c + 1] * x[r].d[j + 1]);
      }
    }
    for (int r = 0; r < R; ++r) {  // the minimums' sum as a tree: one dependent add a block
      const float* s = x[r].sum32 + 8 * i;
      mins[r] += dmin * (((mn[0] * s[0] + mn[1] * s[1]) + (mn[2] * s[2] + mn[3] * s[3])) +
                         ((mn[4] * s[4] + mn[5] * s[5]) + (mn[6] * s[6] + mn[7] * s[7])));
    }
  }
};
template <> struct Format<Q4_K> : KFormat<false> {};
template <> struct Format<Q5_K> : KFormat<true> {};

// Q6_K: 256 six-bit codes (w = d * scale * (code - 32)) with an int8 scale per 16 (`q6_k_half_codes`).
template <> struct Format<Q6_K> {
  static constexpr int values = 256, bytes = 210;
  template <int R>
  static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc0, __m256* acc1, float*) {
    const float d = half_at(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const __m256i offset = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
      __m256i codes[4];
      q6_k_half_codes(b, h, codes);
      for (int t = 0; t < 4; ++t) {
        const int j = 4 * h + t;  // sub-block of 32 in the block; its two halves have their own scales
        const __m256i lane_scales = _mm256_set_m128i(_mm_set1_epi32(scales[2 * j + 1]), _mm_set1_epi32(scales[2 * j]));
        const __m256i w = _mm256_sub_epi8(codes[t], offset);
        const int64_t block32 = 8 * i + j;
        for (int r = 0; r < R; ++r) {
          const __m256i dot = sdot(w, _mm256_loadu_si256(xq(x[r], block32)));
          add_scaled((t & 1 ? acc1 : acc0)[r], _mm256_mullo_epi32(dot, lane_scales), d * x[r].d[block32]);
        }
      }
    }
  }
};

// out[r] = row . x[r] for R activation rows. Blocks of 32 alternate between the two accumulator sets.
template <Type T, int R> void row_dots(const uint8_t* row, int64_t blocks, const Act* x, float* out) {
  __m256 acc0[R], acc1[R];
  float mins[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps(), mins[r] = 0.f;
  constexpr int bytes = Format<T>::bytes;
  int64_t i = 0;
  if constexpr (Format<T>::values == 32) {
    for (; i + 1 < blocks; i += 2) {
      Format<T>::template block<R>(row + i * bytes, i, x, acc0, acc1, mins);
      Format<T>::template block<R>(row + (i + 1) * bytes, i + 1, x, acc1, acc0, mins);
    }
  }
  for (; i < blocks; ++i) Format<T>::template block<R>(row + i * bytes, i, x, acc0, acc1, mins);
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) - mins[r];
}

template <Type T> void dots(const uint8_t* row, int64_t blocks, const Act* x, int rows, float* out) {
  switch (rows) {
    case 4: return row_dots<T, 4>(row, blocks, x, out);
    case 3: return row_dots<T, 3>(row, blocks, x, out);
    case 2: return row_dots<T, 2>(row, blocks, x, out);
    default: return row_dots<T, 1>(row, blocks, x, out);
  }
}

using DotsFn = void (*)(const uint8_t*, int64_t, const Act*, int, float*);

struct Shard {
  DotsFn dots;
  const uint8_t* data;
  int64_t row_bytes, blocks, begin, end;  // begin, end: its outputs among the layer's
};

Shard make_shard(int64_t type, const at::Tensor& blocks, int64_t in_features, int64_t begin) {
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "GGUF blocks must be a contiguous uint8 [rows, row bytes] tensor");
  DotsFn fn;
  int values, bytes;
  switch (type) {
#define QS_CASE(T) \
    case T: fn = dots<T>, values = Format<T>::values, bytes = Format<T>::bytes; break;
    QS_CASE(Q4_0) QS_CASE(Q5_0) QS_CASE(Q8_0) QS_CASE(Q4_K) QS_CASE(Q5_K) QS_CASE(Q6_K)
#undef QS_CASE
    default: TORCH_CHECK(false, "unknown GGUF block type id ", type);
  }
  TORCH_CHECK(in_features % values == 0 && blocks.size(1) == in_features / values * bytes,
              "GGUF blocks of ", blocks.size(1), " bytes a row do not hold ", in_features, " values of type id ", type);
  return {fn, blocks.data_ptr<uint8_t>(), blocks.size(1), in_features / values, begin, begin + blocks.size(0)};
}

// 8 values of x as float32 (exact: every input dtype but float64, whose rounding is the activations' own).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const double* p) {
  return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(p + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Rounds rows of x ([M, K]) to int8 in blocks of 32: d = max|x| / 127, q = round-half-even(x / d), taken as
// x * (1 / d) in float32, as `quantize_reference` does.
template <typename scalar_t>
void quantize(const scalar_t* x, int64_t rows, int64_t k, int8_t* q, float* d, int32_t* isum, float* sum32) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = m * k / 32; b < (m + 1) * k / 32; ++b) {
        const scalar_t* v = x + b * 32;
        __m256 v0 = load8(v), v1 = load8(v + 8), v2 = load8(v + 16), v3 = load8(v + 24);
        __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float scale = _mm_cvtss_f32(m4) / 127.f, inverse = scale != 0.f ? 1.f / scale : 0.f;
        const __m256 inv = _mm256_set1_ps(inverse);
        const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)),
                      i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
        // packs interleave 128-bit lanes; the permute puts the 32 bytes back in order
        const __m256i packed = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * 32), packed);
        alignas(32) int32_t s[8];
        const __m256i sums = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        _mm256_store_si256(reinterpret_cast<__m256i*>(s), sums);
        d[b] = scale;
        isum[b] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
        sum32[b] = scale * static_cast<float>(isum[b]);
      }
    }
  });
}

// Activation rows a weight row is multiplied with at a time (its blocks are unpacked once for them).
constexpr int ROWS = 4;
// Weight rows a task takes at a time: their bytes stay in cache over all the activation rows.
constexpr int64_t WEIGHT_TILE = 16;

}  // namespace

namespace qwen_serve_cpu {

// x [M, K] (float32 / bfloat16 / float16) times the layer made of `blocks` (each a shard [rows, row bytes] of
// `types`, stacked along the outputs), plus `bias` -> [M, outputs] in x's dtype.
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& blocks,
                     const std::vector<int64_t>& types, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  TORCH_CHECK(blocks.size() == types.size() && !blocks.empty(), "one type for each shard of blocks");
  const int64_t m_rows = x.size(0), k = x.size(1);
  TORCH_CHECK(k % 32 == 0, "the inputs must be a whole number of blocks of 32");
  std::vector<Shard> shards;
  int64_t n = 0;
  for (size_t s = 0; s < blocks.size(); ++s) {
    shards.push_back(make_shard(types[s], blocks[s], k, n));
    n = shards.back().end;
  }
  // x and the bias are read in their own dtype (no converted copies: a decode step makes ~100 of these calls)
  const at::Tensor xc = x.contiguous();
  at::Tensor bias_x;
  if (bias.has_value()) {
    bias_x = bias->to(x.scalar_type()).contiguous();
    TORCH_CHECK(bias_x.numel() == n, "the bias has ", bias_x.numel(), " values for ", n, " outputs");
  }
  std::vector<int8_t> q(m_rows * k);
  std::vector<float> d(m_rows * k / 32), sum32(m_rows * k / 32);
  std::vector<int32_t> isum(m_rows * k / 32);
  at::Tensor out = at::empty({m_rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gguf_linear", [&] {
    quantize(xc.data_ptr<scalar_t>(), m_rows, k, q.data(), d.data(), isum.data(), sum32.data());
    const scalar_t* bias_ptr = bias_x.defined() ? bias_x.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, (n + WEIGHT_TILE - 1) / WEIGHT_TILE, 1, [&](int64_t tile_begin, int64_t tile_end) {
      Act act[ROWS];
      float result[ROWS];
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        for (int64_t m0 = 0; m0 < m_rows; m0 += ROWS) {
          const int rows = static_cast<int>(std::min<int64_t>(ROWS, m_rows - m0));
          for (int r = 0; r < rows; ++r)
            act[r] = {q.data() + (m0 + r) * k, d.data() + (m0 + r) * k / 32, isum.data() + (m0 + r) * k / 32,
                      sum32.data() + (m0 + r) * k / 32};
          for (int64_t j = tile * WEIGHT_TILE; j < std::min(n, (tile + 1) * WEIGHT_TILE); ++j) {
            const Shard* s = &shards[0];
            while (j >= s->end) ++s;
            s->dots(s->data + (j - s->begin) * s->row_bytes, s->blocks, act, rows, result);
            const float b = bias_ptr ? static_cast<float>(bias_ptr[j]) : 0.f;
            for (int r = 0; r < rows; ++r) o[(m0 + r) * n + j] = static_cast<scalar_t>(result[r] + b);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace qwen_serve_cpu

namespace {

// Dequantization into the compute dtype, for calls of many rows: there a bfloat16 matmul of the whole weight
// (oneDNN) beats the int8 dot products, which scale every block of every row apart. Each group of 32 codes is
// unpacked as the dot products unpack it, made signed, and written as w = scale * code - min in float32
// (exact: every format's scale times code fits float32's 24 bits, so the one rounding is the minimum's, as
// in layers/quantization/gguf.py), then rounded once to the compute dtype.

// 32 signed codes -> v[0..31] = scale * code - min, the first 16 with `scale_lo`, the others `scale_hi`.
inline void put32(__m256i codes, float scale_lo, float scale_hi, float min, float* v) {
  const __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
  const __m256 m = _mm256_set1_ps(min);
  for (int h = 0; h < 2; ++h) {
    const __m256 s = _mm256_set1_ps(h ? scale_hi : scale_lo);
    const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(halves[h]));
    const __m256 b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(halves[h], 8)));
    _mm256_storeu_ps(v + 16 * h, _mm256_fmsub_ps(s, a, m));
    _mm256_storeu_ps(v + 16 * h + 8, _mm256_fmsub_ps(s, b, m));
  }
}

template <Type T> void decode_block(const uint8_t* b, float* v);

template <> void decode_block<Q4_0>(const uint8_t* b, float* v) {
  const float d = half_at(b);
  put32(_mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8)), d, d, 0.f, v);
}

template <> void decode_block<Q5_0>(const uint8_t* b, float* v) {
  const float d = half_at(b);
  uint32_t high;
  std::memcpy(&high, b + 2, 4);
  put32(_mm256_sub_epi8(add_fifth_bits(nibbles(b + 6), high), _mm256_set1_epi8(16)), d, d, 0.f, v);
}

template <> void decode_block<Q8_0>(const uint8_t* b, float* v) {
  const float d = half_at(b);
  put32(load32(b + 2), d, d, 0.f, v);
}

template <bool FifthBit> void decode_k_block(const uint8_t* b, float* v) {
  const float d = half_at(b), dmin = half_at(b + 2);
  int sc[8], mn[8];
  k_scales(b + 4, sc, mn);
  for (int c = 0; c < 4; ++c) {
    __m256i lo, hi;
    k_chunk_codes<FifthBit>(b, c, lo, hi);
    put32(lo, d * sc[2 * c], d * sc[2 * c], dmin * mn[2 * c], v + 64 * c);
    put32(hi, d * sc[2 * c + 1], d * sc[2 * c + 1], dmin * mn[2 * c + 1], v + 64 * c + 32);
  }
}
template <> void decode_block<Q4_K>(const uint8_t* b, float* v) { decode_k_block<false>(b, v); }
template <> void decode_block<Q5_K>(const uint8_t* b, float* v) { decode_k_block<true>(b, v); }

template <> void decode_block<Q6_K>(const uint8_t* b, float* v) {
  const float d = half_at(b + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const __m256i offset = _mm256_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    __m256i codes[4];
    q6_k_half_codes(b, h, codes);
    for (int t = 0; t < 4; ++t) {
      const int j = 4 * h + t;
      put32(_mm256_sub_epi8(codes[t], offset), d * scales[2 * j], d * scales[2 * j + 1], 0.f, v + 32 * j);
    }
  }
}

// n floats -> the compute dtype, rounded to nearest even.
template <typename scalar_t> void convert(const float* v, scalar_t* out, int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<scalar_t>(v[k]);
}

template <> void convert<float>(const float* v, float* out, int64_t n) { std::memcpy(out, v, n * sizeof(float)); }

template <> void convert<at::BFloat16>(const float* v, at::BFloat16* out, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {  // the weights are finite: round the float's bits (what c10's conversion does)
    __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(v + k));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
  }
  for (; k < n; ++k) out[k] = static_cast<at::BFloat16>(v[k]);
}

template <> void convert<at::Half>(const float* v, at::Half* out, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + k), _MM_FROUND_TO_NEAREST_INT));
  for (; k < n; ++k) out[k] = static_cast<at::Half>(v[k]);
}

template <Type T> void decode_row(const uint8_t* row, int64_t blocks, float* v) {
  for (int64_t i = 0; i < blocks; ++i) decode_block<T>(row + i * Format<T>::bytes, v + i * Format<T>::values);
}

using DecodeFn = void (*)(const uint8_t*, int64_t, float*);

DecodeFn decoder(int64_t type) {
  switch (type) {
    case Q4_0: return decode_row<Q4_0>;
    case Q5_0: return decode_row<Q5_0>;
    case Q8_0: return decode_row<Q8_0>;
    case Q4_K: return decode_row<Q4_K>;
    case Q5_K: return decode_row<Q5_K>;
    case Q6_K: return decode_row<Q6_K>;
  }
  TORCH_CHECK(false, "unknown GGUF block type id ", type);
}

}  // namespace

namespace qwen_serve_cpu {

// The layer's weight [outputs, in_features] in `dtype`, its shards stacked.
at::Tensor dequantize(const std::vector<at::Tensor>& blocks, const std::vector<int64_t>& types,
                         int64_t in_features, at::ScalarType dtype) {
  TORCH_CHECK(blocks.size() == types.size() && !blocks.empty(), "one type for each shard of blocks");
  std::vector<Shard> shards;
  std::vector<DecodeFn> decoders;
  int64_t n = 0;
  for (size_t s = 0; s < blocks.size(); ++s) {
    shards.push_back(make_shard(types[s], blocks[s], in_features, n));
    decoders.push_back(decoder(types[s]));
    n = shards.back().end;
  }
  at::Tensor out = at::empty({n, in_features}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gguf_dequantize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> values(in_features);
      for (int64_t j = begin; j < end; ++j) {
        size_t s = 0;
        while (j >= shards[s].end) ++s;
        decoders[s](shards[s].data + (j - shards[s].begin) * shards[s].row_bytes, shards[s].blocks, values.data());
        convert(values.data(), o + j * in_features, in_features);
      }
    });
  });
  return out;
}

}  // namespace qwen_serve_cpu
