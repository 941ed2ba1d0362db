// GGUF linears on the CPU straight from the file's blocks (AVX2; VNNI where the CPU has it).
//
// The activations are rounded to int8 in blocks of 32 with one float scale each (kernels/cpu_gguf.py's
// `quantize_reference` is the same rounding in torch), so every block of weights is an integer dot product
// of its codes with the int8 activations, scaled once: w = code * scale - min per group gives
// sum(w * x) = scale * dx * sum(code * xq) - min * dx * sum(xq). Where the minimum is a fixed offset of the
// block's scale (Q4_0, Q5_0) the integer -offset * sum(xq) starts the dot product; Q4_K / Q5_K's own
// minimums are summed once a block from `Act::sum32`; Q8_0 and Q6_K take signed codes. Calls of a row or two
// go weight row by weight row (`row_linear`); from TILES_FROM_ROWS rows, over repacked tiles (`tile_linear`).
// The block layouts are ggml's (layers/quantization/gguf.py decodes them the same way in torch).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_kernels.h"

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
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

// The six-bit scales and minimums of a Q4_K / Q5_K block's 12 bytes -> out[0..7] the scales, out[8..15] the
// minimums, one byte each. Bytes 0-3 hold scales 0-3 in their low six bits, 4-7 minimums 0-3; bytes 8-11 hold
// the low four bits of scale j + 4 (low nibble) and minimum j + 4 (high nibble), whose top two bits are the top
// bits of bytes j and j + 4. Four bytes at a time, as 32-bit words.
inline void k_scale_bytes(const uint8_t* s, uint8_t* out) {
  uint32_t w[3], v[4];
  std::memcpy(w, s, 12);
  constexpr uint32_t six = 0x3F3F3F3F, low4 = 0x0F0F0F0F, top2 = 0x03030303;
  v[0] = w[0] & six;
  v[1] = (w[2] & low4) | (((w[0] >> 6) & top2) << 4);
  v[2] = w[1] & six;
  v[3] = ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4);
  std::memcpy(out, v, 16);
}

// Lane j of the result = the sum of the 8 lanes of v[j].
inline __m256i sum_lanes8(const __m256i* v) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// Each format's `block` adds one block's products for R activation rows into two sets of accumulators (two
// chains of multiply-adds, so neither waits on the other's latency; Q4_K / Q5_K put their minimums' products
// into the second). Q6_K's codes are made signed (less their offset of 32); Q4_0's and
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
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*) {
    offset32<R>(nibbles(b + 2), 3, b, x, i, acc);
  }
};

template <> struct Format<Q5_0> {
  static constexpr int values = 32, bytes = 22;
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*) {
    uint32_t high;
    std::memcpy(&high, b + 2, 4);
    offset32<R>(add_fifth_bits(nibbles(b + 6), high), 4, b, x, i, acc);
  }
};

template <> struct Format<Q8_0> {
  static constexpr int values = 32, bytes = 34;
  template <int R> static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc, __m256*) {
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
// A row's 8 sub-blocks are summed into one vector (lane j: sub-block j), so the scales apply as one vector a
// block: acc0 takes the products, acc1 the minimums' (negated) sum.
template <bool FifthBit> struct KFormat {
  static constexpr int values = 256, bytes = FifthBit ? 176 : 144;
  template <int R>
  static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc0, __m256* acc1) {
    alignas(16) uint8_t sm[16];
    k_scale_bytes(b + 4, sm);
    const __m128i sm_bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(sm));
    const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(half_at(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm_bytes)));
    const __m256 min = _mm256_mul_ps(_mm256_set1_ps(half_at(b + 2)),
                                     _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm_bytes, 8))));
    __m256i codes[8];
    for (int c = 0; c < 4; ++c) k_chunk_codes<FifthBit>(b, c, codes[2 * c], codes[2 * c + 1]);
    for (int r = 0; r < R; ++r) {
      __m256i dots[8];
      for (int j = 0; j < 8; ++j) dots[j] = udot(codes[j], _mm256_loadu_si256(xq(x[r], 8 * i + j)));
      const __m256 x_scale = _mm256_loadu_ps(x[r].d + 8 * i);
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum_lanes8(dots)), _mm256_mul_ps(scale, x_scale), acc0[r]);
      acc1[r] = _mm256_fnmadd_ps(min, _mm256_loadu_ps(x[r].sum32 + 8 * i), acc1[r]);
    }
  }
};
template <> struct Format<Q4_K> : KFormat<false> {};
template <> struct Format<Q5_K> : KFormat<true> {};

// Q6_K: 256 six-bit codes (w = d * scale * (code - 32)) with an int8 scale per 16 (`q6_k_half_codes`).
template <> struct Format<Q6_K> {
  static constexpr int values = 256, bytes = 210;
  template <int R>
  static void block(const uint8_t* b, int64_t i, const Act* x, __m256* acc0, __m256* acc1) {
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
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  constexpr int bytes = Format<T>::bytes;
  int64_t i = 0;
  if constexpr (Format<T>::values == 32) {
    for (; i + 1 < blocks; i += 2) {
      Format<T>::template block<R>(row + i * bytes, i, x, acc0, acc1);
      Format<T>::template block<R>(row + (i + 1) * bytes, i + 1, x, acc1, acc0);
    }
  }
  for (; i < blocks; ++i) Format<T>::template block<R>(row + i * bytes, i, x, acc0, acc1);
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r]));
}

template <Type T> void dots(const uint8_t* row, int64_t blocks, const Act* x, int rows, float* out) {
  switch (rows) {
    case 4: return row_dots<T, 4>(row, blocks, x, out);
    case 3: return row_dots<T, 3>(row, blocks, x, out);
    case 2: return row_dots<T, 2>(row, blocks, x, out);
    default: return row_dots<T, 1>(row, blocks, x, out);
  }
}

// ---- Calls of many rows (prefill, wide decode batches): an int8 GEMM over repacked tiles of TILE outputs ----
//
// The row kernels above unpack a weight row again for every ROWS activation rows and scale each 32-value dot
// product apart, which from a few rows on costs more than the products. From TILES_FROM_ROWS rows a task instead
// unpacks TILE outputs once into bytes laid out [K / 4][TILE][4] (each output's 4 consecutive codes side by
// side) with a float scale and minimum per group of values (w = scale * code - min; a fixed offset is a minimum
// of offset * scale), so that a vector's lanes are outputs: one dot-product instruction takes 4 inputs of each
// for one broadcast activation row, and a group's scale and minimum apply once for all of them, the minimum to
// the row's sum over the group. The activations come in chunks of TILE_ROWS rows (`RowChunk`), each quad and
// group number of the rows side by side, so one pointer reaches all of them.

constexpr int TILE = 16;

template <Type T> struct TileFormat {
  static constexpr int group = T == Q6_K ? 16 : 32;  // values a scale covers
  static constexpr bool is_signed = T == Q8_0;
  static constexpr bool has_min = T != Q8_0;
};

// One row of T's blocks -> its codes [K] (unsigned; Q8_0's signed) and each group's scale (and minimum), written
// at scale[g * TILE] and min[g * TILE]: one lane of the tile's [groups][TILE].
template <Type T> void unpack_row(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min);

template <> void unpack_row<Q4_0>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = row + i * Format<Q4_0>::bytes;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * i), nibbles(b + 2));
    scale[i * TILE] = half_at(b), min[i * TILE] = 8 * half_at(b);
  }
}

template <> void unpack_row<Q5_0>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = row + i * Format<Q5_0>::bytes;
    uint32_t high;
    std::memcpy(&high, b + 2, 4);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * i), add_fifth_bits(nibbles(b + 6), high));
    scale[i * TILE] = half_at(b), min[i * TILE] = 16 * half_at(b);
  }
}

template <> void unpack_row<Q8_0>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float*) {
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = row + i * Format<Q8_0>::bytes;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 32 * i), load32(b + 2));
    scale[i * TILE] = half_at(b);
  }
}

template <bool FifthBit>
void unpack_k_row(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = row + i * KFormat<FifthBit>::bytes;
    const float d = half_at(b), dmin = half_at(b + 2);
    uint8_t sm[16];
    k_scale_bytes(b + 4, sm);
    for (int c = 0; c < 4; ++c) {
      __m256i lo, hi;
      k_chunk_codes<FifthBit>(b, c, lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 256 * i + 64 * c), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 256 * i + 64 * c + 32), hi);
    }
    for (int j = 0; j < 8; ++j) scale[(8 * i + j) * TILE] = d * sm[j], min[(8 * i + j) * TILE] = dmin * sm[8 + j];
  }
}
template <> void unpack_row<Q4_K>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  unpack_k_row<false>(row, blocks, codes, scale, min);
}
template <> void unpack_row<Q5_K>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  unpack_k_row<true>(row, blocks, codes, scale, min);
}

template <> void unpack_row<Q6_K>(const uint8_t* row, int64_t blocks, uint8_t* codes, float* scale, float* min) {
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* b = row + i * Format<Q6_K>::bytes;
    const float d = half_at(b + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    for (int h = 0; h < 2; ++h) {
      __m256i c[4];
      q6_k_half_codes(b, h, c);
      for (int t = 0; t < 4; ++t)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + 256 * i + 128 * h + 32 * t), c[t]);
    }
    for (int j = 0; j < 16; ++j) {  // w = d * scale_j * (code - 32)
      scale[(16 * i + j) * TILE] = d * scales[j];
      min[(16 * i + j) * TILE] = 32 * d * scales[j];
    }
  }
}

// Rows [TILE][K] of codes -> [K / 4][TILE][4]: 8 x 8 transposes of 4-byte words, 8 rows at a time.
void interleave(const uint8_t* rows, int64_t k, uint8_t* out) {
  for (int64_t q0 = 0; q0 < k / 4; q0 += 8) {
    for (int half = 0; half < TILE / 8; ++half) {
      __m256i r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = load32(rows + (8 * half + i) * k + 4 * q0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      for (int i = 0; i < 4; ++i) {  // r[i]: word i of each 128-bit lane of rows 0-3 | 4-7 (r[i + 4])
        t[i] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x31);
      }
      for (int i = 0; i < 8; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((q0 + i) * TILE + 8 * half) * 4), t[i]);
    }
  }
}

// Activation rows a tile is multiplied with at a time: their accumulators and the tile's vectors fill the 32
// vector registers of AVX-512 CPUs, or the 16 of AVX2 ones at 2 rows.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int TILE_ROWS = 8;
#else
constexpr int TILE_ROWS = 2;
#endif

// TILE_ROWS rows of activations rounded to int8: `q` [K / 4][TILE_ROWS][4], `d` and `sum32` [K / 32][TILE_ROWS],
// `sum16` [K / 16][TILE_ROWS] (`quantize` with the `Chunked` layout).
struct RowChunk {
  const int8_t* q;
  const float* d;
  const float* sum32;
  const float* sum16;
};

inline int32_t four_codes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// out[r * TILE + n] = activation row r . output n of the tile, for the chunk's first R rows.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// One vector holds the tile's 16 outputs; signed codes (Q8_0) go in as |w|, x negated where w < 0.
template <Type T, int R>
void tile_dots(const uint8_t* codes, const float* scale, const float* min, int64_t groups, const RowChunk& x,
               float* out) {
  using F = TileFormat<T>;
  constexpr int G = F::group;
  const float* sums = G == 16 ? x.sum16 : x.sum32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm512_setzero_si512();
    const uint8_t* w = codes + g * G * TILE;
    const int8_t* xq = x.q + g * G * TILE_ROWS;
    for (int q = 0; q < G / 4; ++q) {
      __m512i wv = _mm512_loadu_si512(w + 64 * q);
      __mmask64 negative = 0;
      if constexpr (F::is_signed) negative = _mm512_movepi8_mask(wv), wv = _mm512_abs_epi8(wv);
      for (int r = 0; r < R; ++r) {
        __m512i xb = _mm512_set1_epi32(four_codes(xq + (q * TILE_ROWS + r) * 4));
        if constexpr (F::is_signed) xb = _mm512_mask_sub_epi8(xb, negative, _mm512_setzero_si512(), xb);
        dot[r] = _mm512_dpbusd_epi32(dot[r], wv, xb);
      }
    }
    const __m512 sv = _mm512_loadu_ps(scale + g * TILE);
    const float* dx = x.d + g * G / 32 * TILE_ROWS;
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_mul_ps(sv, _mm512_set1_ps(dx[r])), acc[r]);
    if constexpr (F::has_min) {
      const __m512 mv = _mm512_loadu_ps(min + g * TILE);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fnmadd_ps(mv, _mm512_set1_ps(sums[g * TILE_ROWS + r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(out + r * TILE, acc[r]);
}
#else
// Two vectors of 8 outputs a tile.
template <Type T, int R>
void tile_dots(const uint8_t* codes, const float* scale, const float* min, int64_t groups, const RowChunk& x,
               float* out) {
  using F = TileFormat<T>;
  constexpr int G = F::group;
  const float* sums = G == 16 ? x.sum16 : x.sum32;
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    const uint8_t* w = codes + g * G * TILE;
    const int8_t* xq = x.q + g * G * TILE_ROWS;
    for (int q = 0; q < G / 4; ++q) {
      const __m256i w0 = load32(w + 64 * q), w1 = load32(w + 64 * q + 32);
      for (int r = 0; r < R; ++r) {
        const __m256i xb = _mm256_set1_epi32(four_codes(xq + (q * TILE_ROWS + r) * 4));
        if constexpr (F::is_signed) {  // |w| times x with w's sign, as `sdot`
          dot[r][0] = udot(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(xb, w0), dot[r][0]);
          dot[r][1] = udot(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(xb, w1), dot[r][1]);
        } else {
          dot[r][0] = udot(w0, xb, dot[r][0]);
          dot[r][1] = udot(w1, xb, dot[r][1]);
        }
      }
    }
    const float* dx = x.d + g * G / 32 * TILE_ROWS;
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = _mm256_loadu_ps(scale + g * TILE + 8 * h);
      for (int r = 0; r < R; ++r)
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h]), _mm256_mul_ps(sv, _mm256_set1_ps(dx[r])), acc[r][h]);
      if constexpr (F::has_min) {
        const __m256 mv = _mm256_loadu_ps(min + g * TILE + 8 * h);
        for (int r = 0; r < R; ++r)
          acc[r][h] = _mm256_fnmadd_ps(mv, _mm256_set1_ps(sums[g * TILE_ROWS + r]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(out + r * TILE, acc[r][0]);
    _mm256_storeu_ps(out + r * TILE + 8, acc[r][1]);
  }
}
#endif

template <Type T>
void tile_rows(const uint8_t* codes, const float* scale, const float* min, int64_t groups, const RowChunk& x,
               int rows, float* out) {
  switch (rows) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    case 8: return tile_dots<T, 8>(codes, scale, min, groups, x, out);
    case 7: return tile_dots<T, 7>(codes, scale, min, groups, x, out);
    case 6: return tile_dots<T, 6>(codes, scale, min, groups, x, out);
    case 5: return tile_dots<T, 5>(codes, scale, min, groups, x, out);
    case 4: return tile_dots<T, 4>(codes, scale, min, groups, x, out);
    case 3: return tile_dots<T, 3>(codes, scale, min, groups, x, out);
#endif
    case 2: return tile_dots<T, 2>(codes, scale, min, groups, x, out);
    default: return tile_dots<T, 1>(codes, scale, min, groups, x, out);
  }
}

using DotsFn = void (*)(const uint8_t*, int64_t, const Act*, int, float*);
using UnpackFn = void (*)(const uint8_t*, int64_t, uint8_t*, float*, float*);
using TileFn = void (*)(const uint8_t*, const float*, const float*, int64_t, const RowChunk&, int, float*);

struct Shard {
  DotsFn dots;
  UnpackFn unpack;
  TileFn tile;
  const uint8_t* data;
  int64_t row_bytes, blocks, groups, begin, end;  // begin, end: its outputs among the layer's
};

Shard make_shard(int64_t type, const at::Tensor& blocks, int64_t in_features, int64_t begin) {
  TORCH_CHECK(blocks.dtype() == at::kByte && blocks.dim() == 2 && blocks.is_contiguous(),
              "GGUF blocks must be a contiguous uint8 [rows, row bytes] tensor");
  Shard s{};
  int values = 0, bytes = 0, group = 0;
  switch (type) {
#define QS_CASE(T)                                                                                  \
    case T:                                                                                         \
      s.dots = dots<T>, s.unpack = unpack_row<T>, s.tile = tile_rows<T>;                            \
      values = Format<T>::values, bytes = Format<T>::bytes, group = TileFormat<T>::group;            \
      break;
    QS_CASE(Q4_0) QS_CASE(Q5_0) QS_CASE(Q8_0) QS_CASE(Q4_K) QS_CASE(Q5_K) QS_CASE(Q6_K)
#undef QS_CASE
    default: TORCH_CHECK(false, "unknown GGUF block type id ", type);
  }
  TORCH_CHECK(in_features % values == 0 && blocks.size(1) == in_features / values * bytes,
              "GGUF blocks of ", blocks.size(1), " bytes a row do not hold ", in_features, " values of type id ", type);
  s.data = blocks.data_ptr<uint8_t>();
  s.row_bytes = blocks.size(1);
  s.blocks = in_features / values;
  s.groups = in_features / group;
  s.begin = begin;
  s.end = begin + blocks.size(0);
  return s;
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

// Where `quantize` puts row m's values: `RowMajor` for the row kernels (Act), `Chunked` for the tiles (RowChunk:
// TILE_ROWS rows side by side, a 4-byte quad or a block's numbers of each row next to each other's).
struct RowMajor {
  int64_t k;
  int64_t quad(int64_t m, int64_t j) const { return m * k + 4 * j; }  // byte offset of quad j (4 values)
  int64_t group(int64_t m, int64_t g, int64_t size) const { return m * (k / size) + g; }  // g-th group of size
};
struct Chunked {
  int64_t k;
  int64_t quad(int64_t m, int64_t j) const { return ((m / TILE_ROWS * (k / 4) + j) * TILE_ROWS + m % TILE_ROWS) * 4; }
  int64_t group(int64_t m, int64_t g, int64_t size) const {
    return (m / TILE_ROWS * (k / size) + g) * TILE_ROWS + m % TILE_ROWS;
  }
};

// Rounds rows of x ([M, K]) to int8 in blocks of 32: d = max|x| / 127, q = round-half-even(x / d), taken as
// x * (1 / d) in float32, as `quantize_reference` does. Per block: d, isum = sum(q), sum32 = d * isum; per half
// block sum16 = d * sum(q) (Q6_K's groups of 16).
template <typename scalar_t, typename Layout>
void quantize(const scalar_t* x, int64_t rows, int64_t k, const Layout& at, int8_t* q, float* d, int32_t* isum,
              float* sum32, float* sum16) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < k / 32; ++b) {
        const scalar_t* v = x + m * k + b * 32;
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
        if constexpr (std::is_same_v<Layout, RowMajor>) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + at.quad(m, 8 * b)), packed);
        } else {
          alignas(32) int32_t quads[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(quads), packed);
          for (int j = 0; j < 8; ++j) std::memcpy(q + at.quad(m, 8 * b + j), quads + j, 4);
        }
        alignas(32) int32_t s[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(s), _mm256_add_epi32(i0, i1));
        _mm256_store_si256(reinterpret_cast<__m256i*>(s + 8), _mm256_add_epi32(i2, i3));
        const int32_t first = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
        const int32_t second = s[8] + s[9] + s[10] + s[11] + s[12] + s[13] + s[14] + s[15];
        d[at.group(m, b, 32)] = scale;
        isum[at.group(m, b, 32)] = first + second;
        sum32[at.group(m, b, 32)] = scale * static_cast<float>(first + second);
        sum16[at.group(m, 2 * b, 16)] = scale * static_cast<float>(first);
        sum16[at.group(m, 2 * b + 1, 16)] = scale * static_cast<float>(second);
      }
    }
  });
}

// Activation rows a weight row is multiplied with at a time (its blocks are unpacked once for them).
constexpr int ROWS = 4;
// Weight rows a task takes at a time: their bytes stay in cache over all the activation rows.
constexpr int64_t WEIGHT_TILE = 16;
// Rows from which a call takes the tiles (below, the row kernels). The demo model's layers, 2 threads, ms, rows
// kernels / tiles (2026-12-07, AVX-512 VNNI):
//   rows                  2            3            4
//   gate_up 9728x896  0.31 / 0.40  0.46 / 0.33  0.55 / 0.34
//   down 896x4864 Q6_K 0.16 / 0.27  0.22 / 0.20  0.26 / 0.19
//   qkv 1152x896      0.04 / 0.05  0.05 / 0.03  0.07 / 0.03
constexpr int64_t TILES_FROM_ROWS = 3;

// The activations of x, rounded (`quantize`): row by row for the row kernels (`row`), or in chunks of TILE_ROWS
// rows for the tiles (`chunk`; the rows past M zero).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> d, sum32, sum16;
  std::vector<int32_t> isum;
  int64_t k;

  template <typename scalar_t> Activations(const scalar_t* x, int64_t rows, int64_t k, bool chunked)
      : k(k) {
    const int64_t padded = chunked ? (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS : rows;
    q.assign(padded * k, 0);
    d.assign(padded * k / 32, 0.f);
    sum32.assign(padded * k / 32, 0.f);
    sum16.assign(padded * k / 16, 0.f);
    isum.assign(padded * k / 32, 0);
    if (chunked)
      quantize(x, rows, k, Chunked{k}, q.data(), d.data(), isum.data(), sum32.data(), sum16.data());
    else
      quantize(x, rows, k, RowMajor{k}, q.data(), d.data(), isum.data(), sum32.data(), sum16.data());
  }
  Act row(int64_t m) const {
    return {q.data() + m * k, d.data() + m * k / 32, isum.data() + m * k / 32, sum32.data() + m * k / 32};
  }
  RowChunk chunk(int64_t c) const {
    return {q.data() + c * TILE_ROWS * k, d.data() + c * TILE_ROWS * k / 32, sum32.data() + c * TILE_ROWS * k / 32,
            sum16.data() + c * TILE_ROWS * k / 16};
  }
};

// Calls of few rows: each weight row's blocks against ROWS activation rows at a time.
template <typename scalar_t>
void row_linear(const std::vector<Shard>& shards, const Activations& x, int64_t m_rows, int64_t n,
                const scalar_t* bias, scalar_t* o) {
  at::parallel_for(0, (n + WEIGHT_TILE - 1) / WEIGHT_TILE, 1, [&](int64_t tile_begin, int64_t tile_end) {
    Act act[ROWS];
    float result[ROWS];
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      for (int64_t m0 = 0; m0 < m_rows; m0 += ROWS) {
        const int rows = static_cast<int>(std::min<int64_t>(ROWS, m_rows - m0));
        for (int r = 0; r < rows; ++r) act[r] = x.row(m0 + r);
        for (int64_t j = tile * WEIGHT_TILE; j < std::min(n, (tile + 1) * WEIGHT_TILE); ++j) {
          const Shard* s = &shards[0];
          while (j >= s->end) ++s;
          s->dots(s->data + (j - s->begin) * s->row_bytes, s->blocks, act, rows, result);
          const float b = bias ? static_cast<float>(bias[j]) : 0.f;
          for (int r = 0; r < rows; ++r) o[(m0 + r) * n + j] = static_cast<scalar_t>(result[r] + b);
        }
      }
    }
  });
}

// The next tile's blocks (its rows are one span of the shard) are asked into L2 while this one computes: read
// only when its unpacking begins, they stalled each tile on memory (gate_up at 46 rows in the engine took 1.5 ms
// where the same call repeated on warm weights took 1.1).
inline void prefetch_tile(const Shard& s, int64_t j0) {
  const uint8_t* begin = s.data + (j0 - s.begin) * s.row_bytes;
  const uint8_t* end = s.data + (std::min<int64_t>(j0 + TILE, s.end) - s.begin) * s.row_bytes;
  for (const uint8_t* p = begin; p < end; p += 64) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
}

// Calls of many rows: each task unpacks TILE outputs of one shard (rows past its end zero) and multiplies them
// with every activation row, TILE_ROWS at a time.
template <typename scalar_t>
void tile_linear(const std::vector<Shard>& shards, const Activations& x, int64_t m_rows, int64_t n,
                 const scalar_t* bias, scalar_t* o) {
  const int64_t k = x.k;
  std::vector<std::pair<const Shard*, int64_t>> tiles;  // shard, its first output
  for (const Shard& s : shards)
    for (int64_t j = s.begin; j < s.end; j += TILE) tiles.emplace_back(&s, j);
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> rows(TILE * k), codes(TILE * k);
    std::vector<float> scale(TILE * k / 16), min(TILE * k / 16), result(TILE_ROWS * TILE);
    for (int64_t t = begin; t < end; ++t) {
      const Shard& s = *tiles[t].first;
      const int64_t j0 = tiles[t].second, outputs = std::min<int64_t>(TILE, s.end - j0);
      for (int64_t i = 0; i < outputs; ++i)
        s.unpack(s.data + (j0 - s.begin + i) * s.row_bytes, s.blocks, rows.data() + i * k, scale.data() + i,
                 min.data() + i);
      if (outputs < TILE) {
        std::memset(rows.data() + outputs * k, 0, (TILE - outputs) * k);
        for (int64_t g = 0; g < s.groups; ++g)
          for (int64_t i = outputs; i < TILE; ++i) scale[g * TILE + i] = 0.f;
      }
      if (t + 1 < end) prefetch_tile(*tiles[t + 1].first, tiles[t + 1].second);
      interleave(rows.data(), k, codes.data());
      for (int64_t m0 = 0; m0 < m_rows; m0 += TILE_ROWS) {
        const int r_count = static_cast<int>(std::min<int64_t>(TILE_ROWS, m_rows - m0));
        s.tile(codes.data(), scale.data(), min.data(), s.groups, x.chunk(m0 / TILE_ROWS), r_count, result.data());
        for (int r = 0; r < r_count; ++r)
          for (int64_t i = 0; i < outputs; ++i)
            o[(m0 + r) * n + j0 + i] =
                static_cast<scalar_t>(result[r * TILE + i] + (bias ? static_cast<float>(bias[j0 + i]) : 0.f));
      }
    }
  });
}

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
  at::Tensor out = at::empty({m_rows, n}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gguf_linear", [&] {
    const bool tiles = m_rows >= TILES_FROM_ROWS;
    const Activations act(xc.data_ptr<scalar_t>(), m_rows, k, tiles);
    const scalar_t* bias_ptr = bias_x.defined() ? bias_x.data_ptr<scalar_t>() : nullptr;
    if (tiles)
      tile_linear(shards, act, m_rows, n, bias_ptr, out.data_ptr<scalar_t>());
    else
      row_linear(shards, act, m_rows, n, bias_ptr, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace qwen_serve_cpu
