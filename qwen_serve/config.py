"""Engine configuration: slotted dataclasses validated once, and CLI flags generated from them.

Flag names follow `vllm serve` where one exists (`--max-model-len`, `--gpu-memory-utilization`, ...).
Each field's `metadata["help"]` is its flag's help text, so a field and its flag cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Self

from qwen_serve.engine.speculative import SpeculativeConfig


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


# --kv-cache-dtype names -> the cache's torch dtype names (auto: the model's dtype).
KV_CACHE_DTYPES = {"auto": None, "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}


@dataclass(slots=True)
class EngineConfig:
    model: str = _opt("demo", "model to serve: a HF folder, a .gguf file, a hub id, or 'demo' (Qwen2.5-Coder-0.5B-Instruct)")
    tokenizer: str | None = _opt(None, "tokenizer folder or hub id, when it differs from the model's")
    chat_template: str | None = _opt(
        None, "chat template (vLLM's flag): a Jinja file or the template itself, used instead of the model's own "
              "(e.g. to chat with a base model, which has none)")
    dtype: str = _opt("auto", "weights and activations: auto, float32, bfloat16, float16")
    quantization: str | None = _opt(
        None, "weight quantization: awq, gptq, gguf, fp8 (also applied to a bf16 checkpoint as it loads) or "
        "compressed-tensors (default: what the checkpoint says, if anything)"
    )
    device: str = _opt("auto", "auto (cuda when available), cuda, cuda:N or cpu")
    max_model_len: int | None = _opt(None, "longest prompt + output in tokens (default: the model's context length)")
    max_num_seqs: int = _opt(128, "most requests in one step")
    max_num_batched_tokens: int = _opt(2048, "token budget of one step; longer prompts are prefilled in chunks")
    block_size: int = _opt(16, "tokens per KV-cache block")
    gpu_memory_utilization: float = _opt(0.90, "fraction of GPU memory the engine may use (weights, activations, KV cache)")
    kv_cache_dtype: str = _opt(
        "auto", "KV-cache element type (vLLM's flag): auto (the model's dtype), fp8 (= fp8_e4m3) or fp8_e5m2, "
                "half a bfloat16 cache's bytes; stored unscaled and saturated at the format's range (GPU: compute capability 8.9+)"
    )
    kv_cache_gb: float = _opt(2.0, "KV-cache size in GiB on the CPU (the GPU sizes it from --gpu-memory-utilization)")
    num_kv_blocks: int | None = _opt(None, "force this many KV-cache blocks (tests, debugging)")
    enable_prefix_caching: bool = _opt(True, "reuse the KV cache of shared prompt prefixes")
    enforce_eager: bool = _opt(False, "no CUDA graphs")
    fused_kernels: bool = _opt(
        True, "fused kernels: Triton on CUDA, C++ ones on the CPU (decode attention, RMSNorm) (--no-fused-kernels: "
        "the torch code, for A/B runs)")
    overlap_steps: str = _opt(
        "auto", "schedule step N+1 while the device runs step N: auto (on with CUDA), on, off"
    )
    rope_scaling: str | None = _opt(
        None, "add YaRN to a model whose config lacks it: 'yarn' (factor 4 over 32768) or a JSON object"
    )
    speculative_config: str | None = _opt(
        None, "speculative decoding as a JSON object (vLLM's flag): "
              '\'{"method": "ngram", "num_speculative_tokens": 4}\' proposes drafts by prompt lookup; optional '
              "prompt_lookup_max (4), prompt_lookup_min (1), disable_by_batch_size (8)"
    )
    seed: int = _opt(0, "seed for requests that give none")
    tensor_parallel_size: int = _opt(1, "split the model over this many GPUs (or CPU processes), one process each")
    nnodes: int = _opt(1, "hosts the tensor-parallel ranks span (each runs tensor_parallel_size / nnodes of them)")
    node_rank: int = _opt(0, "this host's index among --nnodes; host 0 serves the API, the others only run ranks")
    master_addr: str | None = _opt(None, "address where the ranks meet: host 0's (default: $MASTER_ADDR, else 127.0.0.1)")
    master_port: int | None = _opt(None, "port where the ranks meet (default: $MASTER_PORT, else a free port on one host)")

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
            raise ValueError(f"--dtype {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len must be at least 1, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not supported; choose "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"--kv-cache-gb must be positive, got {self.kv_cache_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"--num-kv-blocks must be at least 1, got {self.num_kv_blocks}")
        if self.quantization is not None:
            from qwen_serve.layers.quantization import QUANTIZATION_METHODS

            if self.quantization not in QUANTIZATION_METHODS:
                raise ValueError(f"--quantization {self.quantization!r} is not supported; supported: "
                                 f"{', '.join(QUANTIZATION_METHODS)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be at least 1, got {self.tensor_parallel_size}")
        if self.nnodes < 1 or self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must be at least 1 and divide --tensor-parallel-size "
                             f"{self.tensor_parallel_size}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not (self.master_addr or os.environ.get("MASTER_ADDR")):
            raise ValueError("--nnodes > 1 needs --master-addr (or MASTER_ADDR): the address of host 0")
        if self.nnodes > 1 and not (self.master_port or os.environ.get("MASTER_PORT")):
            raise ValueError("--nnodes > 1 needs --master-port (or MASTER_PORT), the same on every host")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port must be in [1, 65535], got {self.master_port}")
        SpeculativeConfig.parse(self.speculative_config)  # refused here, before anything loads
        if self.chat_template is not None:
            from qwen_serve.tokenizer.chat_template import ChatTemplate, read_chat_template

            try:
                ChatTemplate(read_chat_template(self.chat_template))
            except ValueError as e:
                raise ValueError(f"--chat-template: {e}") from None
        if self.overlap_steps not in ("auto", "on", "off"):
            raise ValueError(f"--overlap-steps must be auto, on or off, got {self.overlap_steps!r}")
        if self.rope_scaling not in (None, "yarn"):
            try:
                block = json.loads(self.rope_scaling)
            except json.JSONDecodeError:
                raise ValueError(f"--rope-scaling must be 'yarn' or a JSON object, got {self.rope_scaling!r}") from None
            if not isinstance(block, dict):
                raise ValueError("--rope-scaling JSON must be an object")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        add_dataclass_args(parser, cls)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> Self:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--kebab-case` flag per field; booleans get `--x` / `--no-x`."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=f.default, help=f"{help_text} (default: {f.default})")
