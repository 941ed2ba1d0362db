"""The model's projections as linear modules that own their parameters through a linear method.

`LinearBase` asks its method (unquantized, or one from `layers/quantization/` chosen by the checkpoint's
quantization config) to create its parameters, and calls `method.apply(self, x, bias)` in `forward`.
`MergedLinear` is several projections of the same input computed as one (q|k|v, gate|up): each
checkpoint tensor is a named shard, and `weight_loader` copies it into its rows of whichever parameter
it belongs to, using the parameter's `output_dim` (and `packed_dim` / `pack_factor` where several
outputs share one stored element, as in AWQ's int32 words). The model only calls these modules.

Under tensor parallelism (`opts.parallel`, size N > 1) each rank holds a slice: merged linears 1/N of
every shard's outputs (q and k/v by heads), row linears 1/N of the inputs, their partial sums added by
an all-reduce. The loaders cut each checkpoint tensor to the rank's slice along the parameter's
`output_dim` or `input_dim`, so quantized formats shard the same way, along their packed words and
groups. (After vLLM's `model_executor/layers/linear.py` and nano-vllm's `layers/linear.py`.)
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_serve.distributed.parallel import divide, kv_head_range
from qwen_serve.layers.options import LayerOptions
from qwen_serve.layers.quantization.base import LinearMethod, default_weight_loader
from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod


class LinearBase(nn.Module):
    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool, opts: LayerOptions,
                 prefix: str, params_dtype: torch.dtype = torch.float32,
                 checkpoint_offsets: dict[str, int] | None = None, splits_inputs: bool = False) -> None:
        """`in_features`, `output_sizes`: this rank's. `checkpoint_offsets`: where each shard's slice starts
        in its checkpoint tensor's outputs (0 without tensor parallelism); `splits_inputs`: checkpoint
        tensors are cut along their inputs instead (a row linear)."""
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(output_sizes.values())
        self.prefix = prefix
        self.params_dtype = params_dtype  # the compute dtype; quantized storage keeps its own
        self.fused = opts.fused
        self.parallel = opts.parallel
        self.splits_inputs = splits_inputs and opts.parallel.size > 1
        # name -> (first output row, rows); a plain linear has one shard named "". A merged linear's shards
        # are named after the checkpoint modules they come from (q_proj, gate_proj), siblings of this one.
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in output_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.checkpoint_offsets = checkpoint_offsets or {name: 0 for name in output_sizes}
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
        loaded = self._rank_slice(param, loaded, shard or "")
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
        start, size = self._packed(param, shard, *self.shard_offsets[shard])
        target = param.data.narrow(output_dim, start, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ValueError(f"shard {shard!r}: expected shape {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
        target.copy_(loaded)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (the whole tensor without tensor parallelism)."""
        if self.parallel.size == 1:
            return loaded
        if self.splits_inputs:
            dim = getattr(param, "input_dim", None)
            if dim is None:  # e.g. the bias of a row linear: added once, after the all-reduce
                return loaded
            n = divide(loaded.shape[dim], self.parallel.size, f"the inputs of {self.prefix} ({loaded.shape[dim]} along dim {dim})")
            return loaded.narrow(dim, self.parallel.rank * n, n)
        dim = getattr(param, "output_dim", None)
        if dim is None or shard not in self.shard_offsets:
            return loaded
        start, size = self._packed(param, shard, self.checkpoint_offsets[shard], self.shard_offsets[shard][1])
        return loaded.narrow(dim, start, size)

    @staticmethod
    def _packed(param: nn.Parameter, shard: str, start: int, size: int) -> tuple[int, int]:
        """(start, size) in outputs -> in the parameter's stored elements along its output dimension."""
        if getattr(param, "packed_dim", None) == getattr(param, "output_dim", None):
            factor = param.pack_factor
            if start % factor or size % factor:
                raise ValueError(f"shard {shard!r} of {size} outputs from {start} is not a whole number of "
                                 f"packed elements of {factor}")
            return start // factor, size // factor
        return start, size


class RowLinear(LinearBase):
    """A projection whose input is the concatenation of per-head or per-channel results (o_proj,
    down_proj): [.., in_features] -> [.., out_features]. Split by input rows under tensor parallelism:
    each rank's product is a partial sum, and the all-reduce adds them (the bias once, after it)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, opts: LayerOptions, prefix: str,
                 params_dtype: torch.dtype = torch.float32) -> None:
        local_in = divide(in_features, opts.parallel.size, f"the inputs of {prefix}")
        super().__init__(local_in, {"": out_features}, bias, opts, prefix, params_dtype, splits_inputs=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = self.parallel.all_reduce(self.quant_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class MergedLinear(LinearBase):
    """Several projections of the same input as one matmul, each a named shard of the output (gate|up).
    Split by output columns under tensor parallelism, each shard alike."""

    def __init__(self, in_features: int, output_sizes: dict[str, int], bias: bool, opts: LayerOptions,
                 prefix: str, params_dtype: torch.dtype = torch.float32) -> None:
        p = opts.parallel
        local = {name: divide(size, p.size, f"the {name or prefix} outputs") for name, size in output_sizes.items()}
        offsets = {name: p.rank * size for name, size in local.items()}
        super().__init__(in_features, local, bias, opts, prefix, params_dtype, offsets)


class QKVLinear(LinearBase):
    """q | k | v of an attention layer: heads * head_dim outputs for q, kv_heads * head_dim for k and v.
    Under tensor parallelism each rank computes its heads: `num_heads` / `num_kv_heads` are its own."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 opts: LayerOptions, prefix: str, params_dtype: torch.dtype = torch.float32) -> None:
        p = opts.parallel
        self_heads = divide(num_heads, p.size, "the attention heads")
        first_kv, kv_heads = kv_head_range(num_kv_heads, p.size, p.rank)
        q, kv = self_heads * head_dim, kv_heads * head_dim
        offsets = {"q_proj": p.rank * q, "k_proj": first_kv * head_dim, "v_proj": first_kv * head_dim}
        super().__init__(hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias, opts, prefix, params_dtype,
                         offsets)
        self.num_heads, self.num_kv_heads = self_heads, kv_heads
