// The Python module of the CPU kernels.
#include <torch/extension.h>

#include "cpu_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &qwen_serve_cpu::linear, "x @ W.T + bias for W stored as GGUF blocks");
  m.def("decode_attention", &qwen_serve_cpu::decode_attention,
        "RoPE, the KV cache write and attention of a decode step");
  m.def("rms_norm", &qwen_serve_cpu::rms_norm, "RMSNorm with the residual add folded in");
}
