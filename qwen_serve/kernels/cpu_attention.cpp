// A decode step's attention on the CPU in one call: RoPE on each sequence's new token's q and k heads (in place
// in the qkv projection's output), its k and v into their cache slot, and each query head's attention over the
// sequence's cached tokens. The torch path (layers/attention.py: `RotaryEmbedding.rotate_`, `write_kv_cache`,
// `TorchAttentionBackend`'s decode) runs ~15 operators a layer for this, and copies every cached key and value
// (to float32 for one sequence, padded to the longest for several) each time; that is its reference. Computed
// in float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float as_float(float v) { return v; }
inline float as_float(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float as_float(at::Half v) { return static_cast<float>(v); }

// exp(x) for x <= 0 (a softmax's shifted scores): 2^(x log2 e) as 2^floor * a degree-6 polynomial of the
// fraction (relative error under 1e-5 down to -87, where float32's x log2 e itself rounds; far below the
// output's bfloat16 rounding), without branches so that the loop over a head's scores vectorizes.
inline float exp_nonpositive(float x) {
  const float t = std::max(x, -87.f) * 1.44269504088896341f;
  const float whole = std::floor(t), f = t - whole;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(whole) + 127) << 23;
  float power;
  std::memcpy(&power, &bits, 4);
  return p * power;
}

// RoPE on one head in place, as `rotate_`: the first half x1 c - x2 s, the second x2 c + x1 s, with c and s
// the position's row of the rotary table (cos in its first half, sin in its second).
template <typename T> void rotate_head(T* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = as_float(x[i]), b = as_float(x[i + half]);
    x[i] = static_cast<T>(a * cos[i] - b * sin[i]);
    x[i + half] = static_cast<T>(b * cos[i] + a * sin[i]);
  }
}

struct Sequence {
  const int64_t* blocks;  // the sequence's block ids, as int64
  int64_t length, block_size, kv_heads;
};

// f(t, row) for each token t of the sequence, row: the offset of kv head h's row of D values in a cache
// [blocks, block_size, kv_heads, D], block by block (no division a token).
template <typename F> void for_each_token(const Sequence& s, int64_t h, int64_t d_len, F f) {
  for (int64_t first = 0, b = 0; first < s.length; first += s.block_size, ++b) {
    const int64_t base = s.blocks[b] * s.block_size, count = std::min(s.block_size, s.length - first);
    for (int64_t j = 0; j < count; ++j) f(first + j, ((base + j) * s.kv_heads + h) * d_len);
  }
}

// The G query heads of kv head h: softmax(q k^T * scale) v over the sequence's tokens, into out [G, D]. D: the
// head size where it is one the loops are unrolled for (64, 128), else 0 and `head_dim` at run time.
template <typename T, int D>
void attend(const T* q, const T* k_cache, const T* v_cache, const Sequence& s, int64_t head_dim, int64_t h,
            int64_t group, float scale, T* out) {
  const int64_t d_len = D ? D : head_dim, n = s.length;
  std::vector<float> qf(group * d_len), row(d_len), scores(group * n), acc(group * d_len, 0.f);
  for (int64_t i = 0; i < group * d_len; ++i) qf[i] = as_float(q[i]) * scale;
  for_each_token(s, h, d_len, [&](int64_t t, int64_t offset) {
    const T* k = k_cache + offset;
    for (int64_t d = 0; d < d_len; ++d) row[d] = as_float(k[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * d_len;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < d_len; ++d) dot += qg[d] * row[d];
      scores[g * n + t] = dot;
    }
  });
  std::vector<float> total(group);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores.data() + g * n;
    const float top = *std::max_element(sg, sg + n);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      sg[t] = exp_nonpositive(sg[t] - top);
      sum += sg[t];
    }
    total[g] = sum;
  }
  for_each_token(s, h, d_len, [&](int64_t t, int64_t offset) {
    const T* v = v_cache + offset;
    for (int64_t d = 0; d < d_len; ++d) row[d] = as_float(v[d]);
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + t];
      float* a = acc.data() + g * d_len;
#pragma omp simd
      for (int64_t d = 0; d < d_len; ++d) a[d] += p * row[d];
    }
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < d_len; ++d) out[g * d_len + d] = static_cast<T>(acc[g * d_len + d] / total[g]);
}

template <typename T>
void attend_head(const T* q, const T* k_cache, const T* v_cache, const Sequence& s, int64_t head_dim, int64_t h,
                 int64_t group, float scale, T* out) {
  switch (head_dim) {
    case 64: return attend<T, 64>(q, k_cache, v_cache, s, head_dim, h, group, scale, out);
    case 128: return attend<T, 128>(q, k_cache, v_cache, s, head_dim, h, group, scale, out);
    default: return attend<T, 0>(q, k_cache, v_cache, s, head_dim, h, group, scale, out);
  }
}

}  // namespace

namespace qwen_serve_cpu {

// qkv [n, (heads + 2 kv_heads) head_dim]: one token of each of n sequences (q and k RoPE'd in place); rotary
// [positions, head_dim] float32; caches [blocks, block_size, kv_heads, head_dim] of qkv's dtype; positions,
// slots: int64 [n] (a negative slot writes nothing, as `write_kv_cache`); block_tables [n, max_blocks] (int32 or
// int64), row i covering seq_lens[i] tokens, the new one included.
// Returns the attention output [n, heads * head_dim].
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& rotary, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& slots,
                            const at::Tensor& block_tables, const std::vector<int64_t>& seq_lens, int64_t heads,
                            int64_t kv_heads, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous() && qkv.dim() == 2, "qkv must be contiguous CPU rows");
  const int64_t n = qkv.size(0);
  TORCH_CHECK(k_cache.dtype() == qkv.dtype() && v_cache.dtype() == qkv.dtype() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 4,
              "the caches must be contiguous [blocks, block_size, kv_heads, head_dim] in qkv's dtype");
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), head_dim = k_cache.size(3);
  TORCH_CHECK(k_cache.size(2) == kv_heads && heads % kv_heads == 0 && head_dim % 2 == 0 &&
                  qkv.size(1) == (heads + 2 * kv_heads) * head_dim,
              "qkv's width must be (heads + 2 kv_heads) head_dim");
  TORCH_CHECK(rotary.scalar_type() == at::kFloat && rotary.is_contiguous() && rotary.size(1) == head_dim,
              "the rotary table must be float32 [positions, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong &&
                  positions.is_contiguous() && slots.is_contiguous() && positions.numel() == n && slots.numel() == n,
              "positions and slots must be int64, one a sequence");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == n && static_cast<int64_t>(seq_lens.size()) == n,
              "one block table and one length a sequence");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* where = slots.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  std::vector<int64_t> ids(n * max_blocks);
  AT_DISPATCH_INDEX_TYPES(block_tables.scalar_type(), "block_tables", [&] {
    const at::Tensor t = block_tables.contiguous();
    std::copy_n(t.data_ptr<index_t>(), ids.size(), ids.begin());
  });
  std::vector<Sequence> seqs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t length = seq_lens[i];
    TORCH_CHECK(pos[i] >= 0 && pos[i] < rotary.size(0), "position ", pos[i], " is outside the rotary table");
    TORCH_CHECK(where[i] < num_blocks * block_size, "slot ", where[i], " is outside the cache");  // < 0: no write
    TORCH_CHECK(length >= 1 && length <= max_blocks * block_size, "the block table covers fewer than ", length,
                " tokens");
    const int64_t* blocks = ids.data() + i * max_blocks;
    TORCH_CHECK(std::all_of(blocks, blocks + (length + block_size - 1) / block_size,
                            [&](int64_t b) { return b >= 0 && b < num_blocks; }),
                "a block id is outside the cache");
    seqs.push_back({blocks, length, block_size, kv_heads});
  }
  const int64_t group = heads / kv_heads, half = head_dim / 2, width = kv_heads * head_dim;
  const int64_t row = qkv.size(1);
  at::Tensor out = at::empty({n, heads * head_dim}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "decode_attention", [&] {
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {  // every token's keys are in the cache before any attention reads it
      scalar_t* x = qkv.data_ptr<scalar_t>() + i * row;
      const float* cs = rotary.data_ptr<float>() + pos[i] * head_dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rotate_head(x + h * head_dim, cs, cs + half, half);
      if (where[i] >= 0) {
        std::memcpy(kc + where[i] * width, x + heads * head_dim, width * sizeof(scalar_t));
        std::memcpy(vc + where[i] * width, x + (heads + kv_heads) * head_dim, width * sizeof(scalar_t));
      }
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t i = j / kv_heads, h = j % kv_heads;
        attend_head(qkv.data_ptr<scalar_t>() + i * row + h * group * head_dim, kc, vc, seqs[i], head_dim, h, group,
                    static_cast<float>(scale), o + i * heads * head_dim + h * group * head_dim);
      }
    });
  });
  return out;
}

}  // namespace qwen_serve_cpu
