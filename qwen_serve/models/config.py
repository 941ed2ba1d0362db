"""A decoder's hyperparameters (Qwen2 and Llama-family configs), read from a config.json dict and validated once."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_serve.models.registry import qkv_bias_by_default, resolve_architecture

log = logging.getLogger(__name__)

# Qwen's own advice for inputs over 32K tokens (model card of Qwen2.5-7B-Instruct).
DEFAULT_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


# "freq_factors": a divisor per frequency, as llama.cpp stores Llama 3.1's scaling in a GGUF (rope_freqs).
ROPE_SCALING_TYPES = ("yarn", "llama3", "linear", "freq_factors")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary scaling: YaRN (Qwen2's long-context switch), Llama 3's frequency bands, or linear position
    interpolation; the fields past `original_max_position_embeddings` belong to one type each."""

    factor: float
    original_max_position_embeddings: int
    rope_type: str = "yarn"
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0
    freq_factors: tuple[float, ...] | None = None  # freq_factors


@dataclass(frozen=True, slots=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool = True
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # attention sees only this many past tokens (no longer context is served)
    rope_scaling: RopeScaling | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "Qwen2ForCausalLM"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_context(self) -> int:
        """Longest context served: what the positions support (YaRN stretches the original window by its
        factor), and no more than a sliding window, inside which full attention is exact."""
        longest = self.max_position_embeddings
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "yarn":
            longest = max(longest, int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor))
        return longest if self.sliding_window is None else min(longest, self.sliding_window)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        architecture = resolve_architecture(cfg, source)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope_params = cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            attention_bias = bool(cfg.get("attention_bias", False))
            out = cls(
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                rope_theta=float(theta),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias_by_default(architecture) or attention_bias,
                o_proj_bias=attention_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=_sliding_window(cfg, architecture),
                rope_scaling=_parse_rope_scaling(cfg, source),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                architecture=architecture,
                raw=dict(cfg),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid value: {e}") from None
        if out.num_attention_heads % out.num_key_value_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({out.num_key_value_heads})"
            )
        if out.sliding_window is not None and out.sliding_window < out.max_position_embeddings:
            log.info("%s: sliding window of %d tokens: contexts are served up to that length", source,
                     out.sliding_window)
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(cfg, source=str(path))

    def with_yarn(self, factor: float = 4.0, original_max_position_embeddings: int | None = None) -> "ModelConfig":
        """The same model with YaRN added (the `--rope-scaling yarn` switch)."""
        scaling = RopeScaling(float(factor), int(original_max_position_embeddings or self.max_position_embeddings))
        raw = dict(self.raw)
        raw["rope_scaling"] = {"rope_type": "yarn", "factor": scaling.factor,
                               "original_max_position_embeddings": scaling.original_max_position_embeddings}
        return _replace(self, rope_scaling=scaling, raw=raw)


def _replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    values = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    values.update(changes)
    return ModelConfig(**values)


def _sliding_window(cfg: dict[str, Any], architecture: str) -> int | None:
    """Mistral's `sliding_window` (null: none); Qwen2 configs carry one that applies only with
    `use_sliding_window`."""
    window = cfg.get("sliding_window")
    if window is None or (architecture == "Qwen2ForCausalLM" and not cfg.get("use_sliding_window", False)):
        return None
    return int(window)


def _parse_rope_scaling(cfg: dict[str, Any], source: str) -> RopeScaling | None:
    block = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not block:
        return None
    kind = block.get("rope_type", block.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported; supported: {ROPE_SCALING_TYPES}")
    if "factor" not in block:
        raise ValueError(f"{source}: rope_scaling of type {kind} needs a 'factor'")
    factor = float(block["factor"])
    if not math.isfinite(factor) or factor < 1:
        raise ValueError(f"{source}: rope_scaling factor must be a number >= 1, got {block['factor']!r}")
    if kind == "freq_factors" and not isinstance(block.get("freq_factors"), list):
        raise ValueError(f"{source}: rope_scaling of type freq_factors needs a list 'freq_factors'")
    out = RopeScaling(
        factor=factor,
        original_max_position_embeddings=int(
            block.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 32768)
        ),
        rope_type=kind,
        beta_fast=float(block.get("beta_fast") or 32.0),
        beta_slow=float(block.get("beta_slow") or 1.0),
        attention_factor=block.get("attention_factor"),
        truncate=bool(block.get("truncate", True)),
        low_freq_factor=float(block.get("low_freq_factor", 1.0)),
        high_freq_factor=float(block.get("high_freq_factor", 4.0)),
        freq_factors=tuple(float(f) for f in block["freq_factors"]) if kind == "freq_factors" else None,
    )
    if kind == "llama3" and not out.high_freq_factor > out.low_freq_factor > 0:
        raise ValueError(f"{source}: llama3 rope scaling needs high_freq_factor > low_freq_factor > 0")
    return out
