"""Qwen2ForCausalLM as a plain module over a flat batch of tokens (no padding, no batch axis).

`forward(input_ids, positions)` returns hidden states [num_tokens, hidden]; `compute_logits`
turns the rows the caller wants (usually the last token of each sequence) into vocabulary logits.
Given `output_rows`, forward returns only those rows, and the last layer computes nothing else past
writing the keys and values of every token (most of one of a 7B's 28 layers saved on a prefill).
Which tokens belong to which sequence is told to attention by `layers.attention.forward_context`.
Parameter names follow the Hugging Face checkpoints, except that q/k/v and gate/up are fused;
`packed_modules_mapping` says how checkpoint tensors map onto the fused ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen_serve.layers import kernel_dispatch
from qwen_serve.layers.attention import Attention, OutputRows
from qwen_serve.layers.rotary import RotaryEmbedding
from qwen_serve.models.config import Qwen2Config


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"expected shape {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class MergedLinear(nn.Module):
    """One matmul for several projections of the same input (q|k|v or gate|up), each a named shard."""

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__()
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(offset), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        """The weight loader of a fused parameter: copies one checkpoint tensor into its rows."""
        start, size = self.shard_offsets[shard]
        if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard!r}: expected shape {(size, *param.shape[1:])}, checkpoint has {tuple(loaded.shape)}"
            )
        param.data[start : start + size].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernel_dispatch.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds `residual` first when given; returns (normed, new residual) as the fused kernel does."""
        if kernel_dispatch.use_kernels(x):
            return kernel_dispatch.ops().rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        residual = x
        h = x.float()
        # In place on the float32 copy (never on x itself, which is returned as the residual).
        scale = h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        h = h.mul_(scale) if h is not x else h * scale
        return self.weight * h.to(x.dtype), residual


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, rotary: RotaryEmbedding) -> None:
        super().__init__()
        d = cfg.head_dim
        self.q_size, self.kv_size = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.o_proj.weight.requires_grad_(False)
        self.rotary = rotary
        self.attn = Attention(cfg.num_attention_heads, cfg.num_key_value_heads, d, d**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, cos_sin=None,
                rows: OutputRows | None = None) -> torch.Tensor:
        """[num_tokens, hidden] -> [num_tokens, hidden], or [rows.count, hidden] for the given rows."""
        qkv = self.qkv_proj(x)
        if kernel_dispatch.use_kernels(x):  # one kernel: RoPE, and k/v into the paged cache
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k, written = kernel_dispatch.rotary_and_cache(positions, q, k, v, self.rotary, self.attn)
        else:
            if cos_sin is None:
                cos_sin = self.rotary.cos_sin(positions, x.device)
            # q and k sit side by side in qkv: rotate both in one call, in place.
            self.rotary.rotate_(qkv[:, : self.q_size + self.kv_size], cos_sin)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            written = False
        out = self.attn(q, k, v, kv_written=written, rows=rows)
        if out.shape[0] == 0:  # no row wanted: the keys and values were all this layer had to make
            return x[:0]
        return kernel_dispatch.linear(out, self.o_proj.weight)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": cfg.intermediate_size, "up": cfg.intermediate_size}, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.down_proj.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate]
        if kernel_dispatch.use_kernels(gate_up):
            return kernel_dispatch.linear(kernel_dispatch.ops().silu_and_mul(gate_up), self.down_proj.weight)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, rotary)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, cos_sin=None,
        rows: OutputRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, cos_sin, rows)
        if rows is not None:
            if h.shape[0] == 0:
                return h, h
            residual = residual[rows.index]
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        # One table shared by every layer; sized for the longest context the config allows.
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_context, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                output_rows: OutputRows | None = None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        # Torch path: the RoPE factors of this step's positions, looked up once for all layers.
        cos_sin = None if kernel_dispatch.use_kernels(x) else self.rotary.cos_sin(positions, x.device)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, cos_sin, output_rows if i == last else None)
        return self.norm(x, residual)[0]


class Qwen2ForCausalLM(nn.Module):
    # checkpoint name fragment -> (fused parameter fragment, shard)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: Qwen2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                output_rows: OutputRows | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size] (with output_rows:
        [output_rows.count, hidden_size], those rows only; needs the KV cache bound)."""
        return self.model(input_ids, positions, output_rows)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden_size] -> float32 logits [n, vocab_size] (written into `out` when given)."""
        logits = kernel_dispatch.linear(hidden, self.lm_head.weight)
        return logits.float() if out is None else out.copy_(logits)
