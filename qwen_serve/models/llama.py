"""The Llama-style decoder as a plain module over a flat batch of tokens (no padding, no batch axis).

Qwen2 and Llama (Llama 3 / 3.1 / 3.2, Yi-1.5, Mistral) are one architecture: pre-norm decoder layers of
grouped-query attention with rotary positions and a SwiGLU MLP. What differs between them is data in their
configs, read by models/config.py: Qwen2 puts biases on q, k and v, Llama's `attention_bias` on all four
attention projections and `mlp_bias` on the MLP's; the rotary scaling (YaRN, Llama 3's, linear); tied or
untied embeddings. So every architecture of the registry is this one class.

`forward(input_ids, positions)` returns hidden states [num_tokens, hidden]; `compute_logits`
turns the rows the caller wants (usually the last token of each sequence) into vocabulary logits.
Given `output_rows`, forward returns only those rows, and the last layer computes nothing else past
writing the keys and values of every token (most of one of a 7B's 28 layers saved on a prefill).
Which tokens belong to which sequence is told to attention by `layers.attention.forward_context`.

The model only builds and calls layers; how weights are stored (quantized or not) and which kernels
run is the layers' business, told by the `LayerOptions` it is built with. Parameter names follow the
Hugging Face checkpoints, except that q/k/v and gate/up are fused; `packed_modules_mapping` says how
checkpoint tensors map onto the fused ones.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.layers.activation import SiluAndMul
from qwen_serve.layers.attention import Attention, OutputRows
from qwen_serve.layers.linear import MergedLinear, QKVLinear, RowLinear
from qwen_serve.layers.norm import RMSNorm
from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.rotary import RotaryEmbedding
from qwen_serve.layers.vocab import VocabEmbedding
from qwen_serve.models.config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, opts: LayerOptions, prefix: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        d, heads, kv_heads = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.qkv_proj = QKVLinear(cfg.hidden_size, d, heads, kv_heads, cfg.qkv_bias, opts, f"{prefix}.qkv_proj",
                                  dtype)
        self.o_proj = RowLinear(heads * d, cfg.hidden_size, cfg.o_proj_bias, opts, f"{prefix}.o_proj", dtype)
        # This rank's heads (all of them without tensor parallelism).
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, d**-0.5, rotary, opts)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rows: OutputRows | None = None) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden], or [rows.count, hidden] for the given rows."""
        out = self.attn(positions, self.qkv_proj(x), rows)
        if out.shape[0] == 0:  # no row wanted: the keys and values were all this layer had to make
            return x[:0]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: LayerOptions, prefix: str, dtype: torch.dtype) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate_proj": inter, "up_proj": inter}, cfg.mlp_bias, opts,
                                         f"{prefix}.gate_up_proj", dtype)
        self.act = SiluAndMul(opts)
        self.down_proj = RowLinear(inter, cfg.hidden_size, cfg.mlp_bias, opts, f"{prefix}.down_proj", dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # gate_up: [num_tokens, 2 * intermediate]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, opts: LayerOptions, prefix: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary, opts, f"{prefix}.self_attn", dtype)
        self.mlp = LlamaMLP(cfg, opts, f"{prefix}.mlp", dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts, dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                rows: OutputRows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, rows)
        if rows is not None:
            if h.shape[0] == 0:
                return h, h
            residual = residual[rows.index]
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, opts: LayerOptions, dtype: torch.dtype, prefix: str = "model") -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, opts, f"{prefix}.embed_tokens", dtype)
        self.embed_tokens.used_for_lookup = True
        # One table shared by every layer; sized for the longest context the config allows.
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_context, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, rotary, opts, f"{prefix}.layers.{i}", dtype)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, opts, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                output_rows: OutputRows | None = None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, output_rows if i == last else None)
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard); a shard is named after its checkpoint module
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q_proj"),
        "k_proj": ("qkv_proj", "k_proj"),
        "v_proj": ("qkv_proj", "v_proj"),
        "gate_proj": ("gate_up_proj", "gate_proj"),
        "up_proj": ("gate_up_proj", "up_proj"),
    }

    def __init__(self, cfg: ModelConfig, opts: LayerOptions | None = None, dtype: torch.dtype = torch.float32) -> None:
        """`dtype`: the parameters' and activations' dtype (quantized weights keep their own storage)."""
        super().__init__()
        opts = opts or LayerOptions()
        self.config = cfg
        self.model = LlamaModel(cfg, opts, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, opts, "lm_head", dtype)
        self.lm_head.used_for_logits = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                output_rows: OutputRows | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size] (with output_rows:
        [output_rows.count, hidden_size], those rows only; needs the KV cache bound)."""
        return self.model(input_ids, positions, output_rows)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden_size] -> float32 logits [n, vocab_size] (written into `out` when given)."""
        logits = self.lm_head.logits(hidden)
        return logits.float() if out is None else out.copy_(logits)
