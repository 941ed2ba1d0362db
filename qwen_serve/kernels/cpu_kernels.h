// The CPU kernels' entry points (kernels/cpu_extension.py builds the files below into one module).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace qwen_serve_cpu {

// cpu_gguf.cpp
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& blocks,
                     const std::vector<int64_t>& types, const c10::optional<at::Tensor>& bias);

// cpu_attention.cpp
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& rotary, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& positions, const at::Tensor& slots,
                            const at::Tensor& block_tables, const std::vector<int64_t>& seq_lens, int64_t heads,
                            int64_t kv_heads, double scale);

// cpu_norm.cpp: (weight * norm(x + residual), x + residual); without a residual, (weight * norm(x), x).
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                 const at::Tensor& weight, double eps);

}  // namespace qwen_serve_cpu
