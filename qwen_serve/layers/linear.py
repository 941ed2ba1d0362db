"""The model's projections as linear modules that own their parameters through a linear method.

`LinearBase` asks its method (unquantized, or one from `layers/quantization/` chosen by the checkpoint's
quantization config) to create its parameters, and calls `method.apply(self, x, bias)` in `forward`.
`MergedLinear` is several projections of the same input computed as one (q|k|v, gate|up): each
checkpoint tensor is a named shard, and `weight_loader` copies it into its rows of whichever parameter
it belongs to, using the parameter's `output_dim` (and `packed_dim` / `pack_factor` where several
outputs share one stored element, as in AWQ's int32 words). The model only calls these modules.
(After vLLM's `model_executor/layers/linear.py` and nano-vllm's `layers/linear.py`.)
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.quantization.base import LinearMethod, default_weight_loader
from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod


class LinearBase(nn.Module):
    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool, opts: LayerOptions,
                 prefix: str, params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(output_sizes.values())
        self.prefix = prefix
        self.params_dtype = params_dtype  # the compute dtype; quantized storage keeps its own
        self.fused = opts.fused
        # name -> (first output row, rows); a plain linear has one shard named "". A merged linear's shards
        # are named after the checkpoint modules they come from (q_proj, gate_proj), siblings of this one.
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        quant = opts.quant_config
        self.quant_method: LinearMethod = quant.linear_method(prefix) if quant else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, in_features, list(output_sizes.values()), params_dtype)
        if bias:
            # Biases stay in the compute dtype whatever the method (AWQ and GPTQ store them so).
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=params_dtype), requires_grad=False)
            self.bias.weight_loader, self.bias.output_dim = self.weight_loader, 0
        else:
            self.register_parameter("bias", None)

    @property
    def shard_names(self) -> list[str]:
        """The checkpoint shards this layer takes (empty for a plain linear, which takes whole tensors)."""
        return [name for name in self.shard_offsets if name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        """Copies one checkpoint tensor into `param`: whole, or into the rows of `shard` along the
        parameter's output dimension. A parameter with no output dimension (GPTQ's g_idx) is the
        same for every shard: the first copy is kept and the others must equal it."""
        output_dim = getattr(param, "output_dim", None)
        if shard is None or output_dim is None:
            if shard is not None and getattr(param, "loaded_once", False):
                if tuple(loaded.shape) != tuple(param.shape) or not torch.equal(param.data.cpu(), loaded.to(param.dtype).cpu()):
                    raise ValueError(f"shard {shard!r} differs from the other shards of a tensor they must share")
                return
            default_weight_loader(param, loaded)
            param.loaded_once = True
            return
        if shard not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard!r} (this layer has {self.shard_names})")
        start, size = self.shard_offsets[shard]
        if getattr(param, "packed_dim", None) == output_dim:
            factor = param.pack_factor
            if start % factor or size % factor:
                raise ValueError(f"shard {shard!r} of {size} outputs is not a whole number of packed elements of {factor}")
            start, size = start // factor, size // factor
        target = param.data.narrow(output_dim, start, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"shard {shard!r}: expected shape {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
        target.copy_(loaded)


class RowLinear(LinearBase):
    """A plain projection whose input is the concatenation of per-head or per-channel results (o_proj,
    down_proj): [.., in_features] -> [.., out_features]. Tensor parallelism will split it by input rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool, opts: LayerOptions, prefix: str,
                 params_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, {"": out_features}, bias, opts, prefix, params_dtype)


class MergedLinear(LinearBase):
    """Several projections of the same input as one matmul, each a named shard of the output (gate|up).
    Tensor parallelism will split it by output columns, each shard alike."""


class QKVLinear(MergedLinear):
    """q | k | v of an attention layer: heads * head_dim outputs for q, kv_heads * head_dim for k and v."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 opts: LayerOptions, prefix: str, params_dtype: torch.dtype = torch.float32) -> None:
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias, opts, prefix, params_dtype)
