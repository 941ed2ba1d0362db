"""GGUF tensors kept as their blocks' integers: each block format decoded exactly into codes, scales and minimums.

A GGUF weight row is a run of blocks (ggml's layouts, `ggml-quants.c`): Q4_0 / Q5_0 / Q8_0 hold 32 values and
one float16 scale; Q4_K / Q5_K hold 256 values in 8 groups of 32 with 6-bit scales and minimums under two
float16 factors; Q6_K 256 values in 16 groups of 16 with int8 scales. Every one of them is
w = code * scale - minimum per group, with small integer codes and float32 scale and minimum exact (a float16
times a small integer), so `decode` returns (codes, scales, minimums) that reproduce the gguf package's own
dequantization bit for bit (tests/test_gguf.py checks every format against it).

On the CPU, in bfloat16 / float16 models, block layers that multiply (the lm_head among them, a tied one too)
keep the file's blocks and compute from them (`GGUFBlocksMethod`, kernels/cpu_gguf.py). Otherwise linears
whose shards are all 4-bit go to torch's int4 matmul where it runs (kernels/int4pack.py: bfloat16 on a GPU,
bfloat16 / float16 on the CPU), and on a GPU the other layers' decoded codes are packed (4 bits for Q4_0 / Q4_K,
8 for the others) for the kernels of kernels/quant_linear.py in their "min form"; the shards of a merged layer
(q|k|v, gate|up) of different formats share the wider code and the smaller group, which is exact too. On the CPU
where those kernels cannot be built, an lm_head of wider codes in groups the int4 matmul takes (Q5_0, Q5_K,
Q8_0) runs through it as two 4-bit planes (layers/quantization/packed.py) and the other layers are dequantized
once at load into the compute dtype and served as unquantized; so are all of a float32 model's (whose users
want the exact weights: the kernels round the activations to int8). An input table that is not also the lm_head
keeps its codes (its lookups dequantize the rows they take). F32 / F16 / BF16 tensors, and the formats the
gguf package dequantizes but this file does not decode (Q4_1, Q5_1, Q2_K, Q3_K, the IQ types), are served
plain on every device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qwen_serve.kernels import cpu_extension, cpu_gguf, int4pack
from qwen_serve.layers.quantization.base import LinearMethod, QuantizationConfig, new_param
from qwen_serve.layers.quantization.packed import PackedIntMethod, repack
from qwen_serve.layers.quantization.unquantized import UnquantizedLinearMethod

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 at byte `offset` of every block, as float32: [rows, blocks]."""
    return blocks[..., offset : offset + 2].contiguous().view(torch.float16)[..., 0].float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[.., n] bytes -> [.., 2n]: the low nibbles of all bytes, then the high ones (ggml's order)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def _k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and minimums of a Q4_K / Q5_K block's 12 bytes (ggml's get_scale_min_k4)."""
    q = raw.to(torch.int32)
    sc = torch.cat([q[..., 0:4] & 63, (q[..., 8:12] & 0xF) | ((q[..., 0:4] >> 6) << 4)], dim=-1)
    mn = torch.cat([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], dim=-1)
    return sc, mn


def _decode_q4_0(b: torch.Tensor):
    d = _f16(b, 0)
    return _nibbles(b[..., 2:18]), d, 8 * d


def _decode_q5_0(b: torch.Tensor):
    d = _f16(b, 0)
    qh = b[..., 2:6].to(torch.int64)
    high = (qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24)[..., None]
    bits = (high >> torch.arange(32, device=b.device)) & 1  # [.., 32]: bit j is value j's fifth bit
    return _nibbles(b[..., 6:22]) | (bits << 4).to(torch.uint8), d, 16 * d


def _decode_q8_0(b: torch.Tensor):
    d = _f16(b, 0)
    return b[..., 2:34] ^ 0x80, d, 128 * d  # an int8's byte with its sign bit flipped is the int8 + 128


def _decode_q4_k(b: torch.Tensor):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[..., 4:16])
    qs = b[..., 16:144].reshape(*b.shape[:-1], 4, 32)  # 4 chunks of 64 values: low nibbles, then high
    codes = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(*b.shape[:-1], 256)
    return codes, d[..., None] * sc, dmin[..., None] * mn


def _decode_q5_k(b: torch.Tensor):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[..., 4:16])
    qh = b[..., 16:48].to(torch.int32)  # [.., 32]: bit 2i of byte l is chunk i's value l, bit 2i+1 value l+32
    qs = b[..., 48:176].reshape(*b.shape[:-1], 4, 32).to(torch.int32)
    chunk = torch.arange(4, device=b.device)[:, None]
    low = (qs & 0xF) | (((qh[..., None, :] >> (2 * chunk)) & 1) << 4)
    high = (qs >> 4) | (((qh[..., None, :] >> (2 * chunk + 1)) & 1) << 4)
    codes = torch.cat([low, high], dim=-1).reshape(*b.shape[:-1], 256)
    return codes, d[..., None] * sc, dmin[..., None] * mn


def _decode_q6_k(b: torch.Tensor):
    ql = b[..., 0:128].reshape(*b.shape[:-1], 2, 64).to(torch.int32)  # two halves of 128 values
    qh = b[..., 128:192].reshape(*b.shape[:-1], 2, 32).to(torch.int32)
    scales = b[..., 192:208].contiguous().view(torch.int8).float()  # [.., 16]: one per 16 values
    d = _f16(b, 208)
    parts = [(ql[..., :32] & 0xF) | ((qh & 3) << 4), (ql[..., 32:] & 0xF) | (((qh >> 2) & 3) << 4),
             (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)]
    codes = torch.cat(parts, dim=-1).reshape(*b.shape[:-1], 256)  # q + 32, in 0..63
    s = d[..., None] * scales
    return codes, s, 32 * s


@dataclass(frozen=True, slots=True)
class BlockFormat:
    block: int  # values a block
    size: int  # bytes a block
    group: int  # values a scale
    bits: int  # packed code width
    decode: Any


BLOCK_FORMATS = {
    "Q4_0": BlockFormat(32, 18, 32, 4, _decode_q4_0),
    "Q5_0": BlockFormat(32, 22, 32, 8, _decode_q5_0),
    "Q8_0": BlockFormat(32, 34, 32, 8, _decode_q8_0),
    "Q4_K": BlockFormat(256, 144, 32, 4, _decode_q4_k),
    "Q5_K": BlockFormat(256, 176, 32, 8, _decode_q5_k),
    "Q6_K": BlockFormat(256, 210, 16, 8, _decode_q6_k),
}


# Where each block format keeps its float16 factors (d, and dmin for the K formats), by byte offset.
FP16_FIELDS = {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# The range of those factors that gives weights of ~0.01-0.1, as real models have (the K formats multiply
# them by 6- or 8-bit sub-block scales).
FACTOR_RANGE = {"Q4_K": (1e-5, 1e-4), "Q5_K": (1e-5, 5e-5), "Q6_K": (1e-6, 1e-5)}


def random_blocks(type_name: str, rows: int, columns: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [rows, row_bytes]: random bytes (every bit pattern of a block's integers is valid) with float16
    factors in the format's FACTOR_RANGE (benchmarks of a shape without a checkpoint)."""
    fmt = BLOCK_FORMATS[type_name]
    blocks = columns // fmt.block
    raw = torch.randint(0, 256, (rows, blocks, fmt.size), dtype=torch.uint8, generator=generator)
    low, high = FACTOR_RANGE.get(type_name, (1e-4, 2e-2))
    for offset in FP16_FIELDS[type_name]:
        factors = (torch.rand(rows, blocks, generator=generator) * (high - low) + low).half()
        raw[:, :, offset : offset + 2] = factors.view(torch.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * fmt.size)


def decode(raw: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """uint8 [rows, bytes] of one block format -> (codes uint8 [rows, K], scales and minimums float32
    [rows, K / group], group, bits) with w = codes * scale - minimum. (Bytes, not wider integers: an lm_head
    of 152K rows decoded whole holds 136 MB of codes, not 545.)"""
    fmt = BLOCK_FORMATS[type_name]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, fmt.size)
    codes, scales, mins = fmt.decode(blocks)
    return (codes.to(torch.uint8).reshape(rows, -1), scales.reshape(rows, -1), mins.reshape(rows, -1),
            fmt.group, fmt.bits)


# Rows decoded at a time: the decoder's int32 and float32 temporaries stay ~100 MB for any tensor.
DEQUANTIZE_ROWS = 4096


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Any supported tensor as `dtype` [rows, K] (written into `out` when given), computed in float32:
    decoded here (a few thousand rows at a time), or by the gguf package for the rest."""
    if out is None:
        out = torch.empty(raw.shape[0], shape[1], dtype=dtype, device=raw.device)
    if type_name in FLOAT_TYPES:
        return out.copy_(raw.reshape(out.shape))
    if type_name in BLOCK_FORMATS:
        for start in range(0, raw.shape[0], DEQUANTIZE_ROWS):
            codes, scales, mins, group, _ = decode(raw[start : start + DEQUANTIZE_ROWS], type_name)
            grouped = codes.view(codes.shape[0], -1, group).float()  # [rows, groups, group]
            out[start : start + DEQUANTIZE_ROWS] = (grouped * scales[..., None] - mins[..., None]).flatten(1)
        return out
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(raw.cpu().numpy(), GGMLQuantizationType[type_name])
    return out.copy_(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(out.shape))


@functools.lru_cache(maxsize=None)
def supported(type_name: str) -> bool:
    """Decoded here, a float type, or one the installed gguf package can dequantize (tried on one block)."""
    if type_name in BLOCK_FORMATS or type_name in FLOAT_TYPES:
        return True
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        qtype = GGMLQuantizationType[type_name]
        gguf_dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except (KeyError, NotImplementedError, ValueError):
        return False
    return True


def row_bytes(type_name: str, columns: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if columns % block:
        raise ValueError(f"{columns} columns are not a whole number of {type_name} blocks of {block}")
    return columns // block * size


def table_rows(layer: nn.Module, type_name: str, blocks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a table kept as its blocks, dequantized into the layer's compute dtype."""
    return dequantize(blocks[ids], type_name, (ids.numel(), layer.in_features), layer.compute_dtype)


@dataclass(frozen=True, slots=True)
class GGUFConfig(QuantizationConfig):
    tensor_types: dict[str, str] = field(hash=False)  # checkpoint tensor name -> GGML type name
    random_type: str | None = None  # random weights of a shape: the linears' block format (tables bfloat16)
    name = "gguf"

    @classmethod
    def from_config(cls, qc: dict[str, Any], source: str) -> "GGUFConfig":
        types = qc.get("tensor_types")
        if not isinstance(types, dict):
            raise ValueError(f"{source}: a gguf quantization_config needs its tensor_types")
        for tensor, type_name in types.items():
            if not supported(str(type_name)):
                raise ValueError(f"{source}: tensor {tensor} has GGML type {type_name}, which qwen-serve cannot read; "
                                 f"supported: {', '.join([*FLOAT_TYPES, *BLOCK_FORMATS])} and the types the installed "
                                 "gguf package dequantizes")
        random_type = qc.get("random_type")
        if random_type is not None and random_type not in BLOCK_FORMATS:
            raise ValueError(f"{source}: random weights can be made in {', '.join(BLOCK_FORMATS)}, not {random_type}")
        return cls(tensor_types=dict(types), random_type=random_type)

    def linear_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(self)

    def embedding_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod(self)


class GGUFLinearMethod(LinearMethod):
    """Collects each shard's GGUF tensor at load; once a layer has them all, `process_weights_after_loading`
    turns it into an unquantized one (CPU, float types) or a packed-integer one (GPU), replacing itself as
    the layer's method and dropping the layer's raw blocks (mapped from the file, loader/gguf_convert.py, so
    holding every layer's until then costs no heap); an input table that is only looked up keeps its blocks
    and this method, which looks rows up from them."""

    def __init__(self, config: GGUFConfig) -> None:
        self.config = config

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        # A placeholder the loader fills shard by shard: the format (so the size) is known per tensor only.
        layer.weight = new_param((0,), torch.uint8, functools.partial(self._collect, layer))
        layer.gguf_shards = {}  # shard -> (type name, tensor)
        layer.in_features, layer.compute_dtype = in_features, params_dtype

    @staticmethod
    def tensor_name(layer: nn.Module, shard: str) -> str:
        """The checkpoint name of one shard: a merged layer's shards are its sibling modules (q_proj, ...)."""
        return f"{layer.prefix.rsplit('.', 1)[0]}.{shard}.weight" if shard else f"{layer.prefix}.weight"

    def _shards(self, layer: nn.Module) -> dict[str, int]:
        offsets = getattr(layer, "shard_offsets", None)
        return {name: size for name, (_, size) in offsets.items()} if offsets else {"": layer.vocab_size}

    def _collect(self, layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        shard = shard or ""
        rows = self._shards(layer)[shard]
        type_name = self.config.tensor_types.get(self.tensor_name(layer, shard))
        if type_name is None:
            raise ValueError("not listed in the checkpoint's tensor types")
        if type_name in FLOAT_TYPES:
            expected = (rows, layer.in_features)
        else:
            expected = (rows, row_bytes(type_name, layer.in_features))
        if tuple(loaded.shape) != expected:
            raise ValueError(f"{type_name} tensor of shape {tuple(loaded.shape)}, expected {expected}")
        layer.gguf_shards[shard] = (type_name, loaded)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError(f"{layer.prefix}: the GGUF weights were not prepared (process_weights_after_loading)")

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of an input table kept as the file's blocks (`gguf_table`), dequantized."""
        return table_rows(layer, *layer.gguf_table, ids)

    def random_fill(self, layer: nn.Module, generator: torch.Generator) -> None:
        """Each shard as random blocks of the config's `random_type`; the input table and the lm_head in
        bfloat16 (as Qwen's own GGUF files of 7B keep them at higher precision, and the memory goal counts
        them so)."""
        if self.config.random_type is None:
            raise ValueError("random GGUF weights need a random_type (the block format of the linears)")
        device = layer.weight.device
        for shard, rows in self._shards(layer).items():
            if hasattr(layer, "vocab_size"):
                table = torch.randn(rows, layer.in_features, generator=generator) * 0.02
                layer.gguf_shards[shard] = ("BF16", table.to(device, torch.bfloat16))
            else:
                blocks = random_blocks(self.config.random_type, rows, layer.in_features, generator)
                layer.gguf_shards[shard] = (self.config.random_type, blocks.to(device))

    @staticmethod
    def keeps_codes(device: torch.device) -> bool:
        """Whether layers on `device` compute from the codes (the GPU kernels) rather than a plain weight."""
        return device.type == "cuda"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        device, shards = layer.weight.device, layer.gguf_shards
        names = list(self._shards(layer))
        types = [shards[s][0] for s in names]
        blocks = all(t in BLOCK_FORMATS for t in types)
        lookup, logits = getattr(layer, "used_for_lookup", False), getattr(layer, "used_for_logits", False)
        # On the CPU every block layer computes from the file's blocks where the kernels build, 4-bit ones included
        # (the demo model with its Q4_K downs there rather than in torch's int4 matmul, one process, 8 alternated
        # rounds: decode 1.00-1.14x, TTFT of fresh 46 / 512-token prompts 0.73-0.96x / 0.76-0.86x). float32
        # models keep exact weights (the kernels round the activations to int8).
        if (device.type == "cpu" and blocks and (not lookup or logits)
                and layer.compute_dtype in (torch.bfloat16, torch.float16) and cpu_extension.available()):
            layer.gguf_blocks = [(t, shards[s][1].contiguous()) for s, t in zip(names, types)]
            del layer.weight, layer.gguf_shards
            layer.quant_method = GGUFBlocksMethod()
            return
        int4_fits = blocks and int4pack.supported(min(BLOCK_FORMATS[t].group for t in types), layer.in_features,
                                                  sum(self._shards(layer).values()), layer.compute_dtype, device)
        four_bit = blocks and all(BLOCK_FORMATS[t].bits == 4 for t in types)
        # A linear (not a looked-up table) whose shards are all 4-bit goes to torch's int4 matmul where it runs;
        # on the CPU without the blocks' kernels the lm_head's wider codes too, as two 4-bit planes: it multiplies
        # only the sampled rows, where the planes beat a bfloat16 weight, while a prefill's many rows ran 2-3x
        # slower a plane.
        int4 = int4_fits and not lookup and (four_bit or (device.type == "cpu" and logits))
        # An input table that is only looked up stays the file's own blocks on every device (Q5_0: 5.5 bits a
        # value, where repacked codes take 8 and float32 factors 2 more): `embedding` dequantizes its rows.
        if lookup and not logits and blocks:
            type_name, table = shards[names[0]]  # one shard: a table is one tensor
            layer.gguf_table = (type_name, table.to(device))
            del layer.weight, layer.gguf_shards
            return
        if not blocks or not (self.keeps_codes(device) or int4):
            sizes = self._shards(layer)
            weight = torch.empty(sum(sizes.values()), layer.in_features, dtype=layer.compute_dtype, device=device)
            start = 0
            for s, t in zip(names, types):  # each shard straight into its rows: no second copy of the weight
                dequantize(shards[s][1].to(device), t, weight.shape, out=weight[start : start + sizes[s]])
                start += sizes[s]
            del layer.weight, layer.gguf_shards
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer.quant_method = UnquantizedLinearMethod()
            return
        decoded = [decode(shards[s][1].to(device), t) for s, t in zip(names, types)]
        group, bits = min(d[3] for d in decoded), max(d[4] for d in decoded)
        codes = torch.cat([d[0] for d in decoded])
        scales = torch.cat([d[1].repeat_interleave(d[3] // group, 1) for d in decoded])
        mins = torch.cat([d[2].repeat_interleave(d[3] // group, 1) for d in decoded])
        del layer.weight, layer.gguf_shards
        repack(layer, codes, mins, scales, bits, int4_dtype=layer.compute_dtype if int4 else None)
        layer.quant_method = PackedIntMethod(bits)


class GGUFBlocksMethod(LinearMethod):
    """A CPU layer that keeps the file's blocks (`gguf_blocks`: type name and uint8 [rows, row bytes] a shard)
    and computes from them for any number of rows (kernels/cpu_gguf.py)."""

    def create_weights(self, layer: nn.Module, in_features: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        raise NotImplementedError("made from a GGUF layer's blocks at load (GGUFLinearMethod)")

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        out = cpu_gguf.linear(x.reshape(-1, shape[-1]).contiguous(), layer.gguf_blocks, bias)
        return out.reshape(*shape[:-1], out.shape[-1])

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a table that is also the lm_head (one shard)."""
        (type_name, blocks), = layer.gguf_blocks
        return table_rows(layer, type_name, blocks, ids)
