"""From a resolved model folder to a model in memory: config (with the YaRN switch), dtype, weights.

`resolve.resolve_model` turns any model spec into an HF-style folder first, so this module only
ever reads config.json, generation_config.json and the weights: safetensors files, or for a GGUF the
file itself through the folder's tensor index (loader/gguf_convert.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

from qwen_serve.loader.hf import safetensors_files
from torch import nn

from qwen_serve.layers.options import LayerOptions
from qwen_serve.loader import gguf_convert
from qwen_serve.loader.weights import build_model, load_weights
from qwen_serve.models.config import DEFAULT_YARN, ModelConfig

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def load_model_config(folder: str | Path, rope_scaling: str | dict[str, Any] | None = None) -> ModelConfig:
    """config.json of `folder`; `rope_scaling` ('yarn' or a JSON object) adds or replaces its YaRN block."""
    cfg = ModelConfig.from_file(Path(folder) / "config.json")
    if rope_scaling is None:
        return cfg
    if rope_scaling == "yarn":
        block: Any = dict(DEFAULT_YARN)
    elif isinstance(rope_scaling, dict):
        block = dict(rope_scaling)
    else:
        try:
            block = json.loads(rope_scaling)
        except json.JSONDecodeError:
            raise ValueError(f"--rope-scaling must be 'yarn' or a JSON object, got {rope_scaling!r}") from None
        if not isinstance(block, dict):
            raise ValueError(f"--rope-scaling JSON must be an object, got {rope_scaling!r}")
    if "type" not in block and "rope_type" not in block:  # the switch exists to add YaRN
        block["rope_type"] = "yarn"
    raw = dict(cfg.raw)
    # Newer transformers keep rope_theta inside rope_parameters; the switch replaces that block,
    # so the theta moves to the top level first.
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = cfg.rope_theta
    raw["rope_scaling"] = block
    return ModelConfig.from_dict(raw, source=f"{folder}/config.json with --rope-scaling {json.dumps(block)}")


def _cpu_prefers_bf16() -> bool:
    """AVX512-BF16 or AMX (native bfloat16 matmuls), or AVX2: there bfloat16 matmuls are emulated, but a
    batch-1 decode step reads half the bytes (~3x faster than float32 on the demo model, measured) and
    matmuls of 8 rows or more run on float32 copies of the weights made at load (kernels/cpu_linear.py).
    From Linux's /proc/cpuinfo; float32 where it cannot be read."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "avx2"})


def resolve_dtype(name: str, device: torch.device | str, cfg: ModelConfig) -> torch.dtype:
    """The compute dtype for `--dtype name`: `auto` is the checkpoint's dtype on GPU, and on CPU
    bfloat16 where it is the faster choice (`_cpu_prefers_bf16`), else float32."""
    name = (name or "auto").lower()
    device = torch.device(device)
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"--dtype {name!r}: choose auto, float32, bfloat16 or float16")
        return _DTYPES[name]
    if device.type == "cuda":
        dtype = _DTYPES.get(str(cfg.torch_dtype or "bfloat16").removeprefix("torch."), torch.bfloat16)
        if dtype == torch.float32:  # as vLLM does: fp32 checkpoints (e.g. converted GGUF) serve in bf16
            dtype = torch.bfloat16
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
        return dtype
    return torch.bfloat16 if _cpu_prefers_bf16() else torch.float32


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields a folder's tensors one at a time, each read into its own buffer with plain file reads.

    Why not mmap (safetensors' `safe_open`): every page of a mapped file that a copy touches stays in
    the process's resident set until the file is closed, so loading a float32 checkpoint into a
    float32 model peaks at twice the weights (a bfloat16 model at three times). Here the peak is
    the model plus the largest single tensor; the OS page cache still makes repeated loads fast.
    """
    for path in safetensors_files(folder):
        size = path.stat().st_size
        with path.open("rb") as f:
            try:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise ValueError(f"header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
            except (struct.error, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise ValueError(f"{path}: not a safetensors file ({e})") from None
            header.pop("__metadata__", None)
            base = 8 + header_len
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                dtype = _ST_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                if base + end > size:
                    raise ValueError(f"{path}: truncated safetensors file (tensor {name} ends past the end)")
                buf = torch.empty(end - start, dtype=torch.uint8)  # [nbytes]
                f.seek(base + start)
                if f.readinto(memoryview(buf.numpy())) != end - start:
                    raise ValueError(f"{path}: short read for tensor {name}")
                yield name, buf.view(dtype).reshape(info["shape"])


def load_model(folder: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
               opts: LayerOptions | None = None) -> nn.Module:
    """Builds the model in `dtype` on `device` (quantized as `opts` says; without opts, as the checkpoint's
    quantization_config says) and streams the folder's weights into it, one tensor at a time."""
    if opts is None:
        from qwen_serve.layers.quantization import quantization_config

        opts = LayerOptions(quant_config=quantization_config(None, cfg.raw, f"{folder}/config.json"))
    model = build_model(cfg, dtype, device, opts)
    folder = Path(folder)
    gguf_index = folder / gguf_convert.GGUF_INDEX
    with torch.no_grad():
        load_weights(model, gguf_convert.iter_gguf_weights(folder) if gguf_index.is_file() else read_safetensors(folder))
    return model


def load_generation_config(folder: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict (sampling defaults, eos ids); empty when the folder has none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
