"""The Qwen2 architecture's hyperparameters, read from a config.json dict and validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_serve.models.registry import resolve_architecture

# Qwen's own advice for inputs over 32K tokens (model card of Qwen2.5-7B-Instruct).
DEFAULT_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """YaRN parameters (the only scaling Qwen2 checkpoints use)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True, slots=True)
class Qwen2Config:
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
    rope_scaling: RopeScaling | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    architecture: str = "Qwen2ForCausalLM"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_context(self) -> int:
        """Longest context the positions support: YaRN stretches the original window by its factor."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return max(
            self.max_position_embeddings,
            int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor),
        )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "Qwen2Config":
        architecture = resolve_architecture(cfg, source)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope_params = cfg.get("rope_parameters") or {}
            theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
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
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(cfg, source=str(path))

    def with_yarn(self, factor: float = 4.0, original_max_position_embeddings: int | None = None) -> "Qwen2Config":
        """The same model with YaRN added (the `--rope-scaling yarn` switch)."""
        scaling = RopeScaling(float(factor), int(original_max_position_embeddings or self.max_position_embeddings))
        raw = dict(self.raw)
        raw["rope_scaling"] = {"rope_type": "yarn", "factor": scaling.factor,
                               "original_max_position_embeddings": scaling.original_max_position_embeddings}
        return _replace(self, rope_scaling=scaling, raw=raw)


def _replace(cfg: Qwen2Config, **changes: Any) -> Qwen2Config:
    values = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    values.update(changes)
    return Qwen2Config(**values)


def _parse_rope_scaling(cfg: dict[str, Any], source: str) -> RopeScaling | None:
    block = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not block:
        return None
    kind = block.get("rope_type", block.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "yarn":
        raise ValueError(f"{source}: rope scaling type {kind!r} is not supported (only 'yarn')")
    if "factor" not in block:
        raise ValueError(f"{source}: rope_scaling of type yarn needs a 'factor'")
    return RopeScaling(
        factor=float(block["factor"]),
        original_max_position_embeddings=int(
            block.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 32768)
        ),
        beta_fast=float(block.get("beta_fast") or 32.0),
        beta_slow=float(block.get("beta_slow") or 1.0),
        attention_factor=block.get("attention_factor"),
        truncate=bool(block.get("truncate", True)),
    )
