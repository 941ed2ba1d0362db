"""Rotary position embedding, plain or scaled (YaRN, Llama 3's, linear), as a cos/sin table looked up by position."""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen_serve.models.config import RopeScaling


def plain_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))


def yarn_inv_freq(head_dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, ramp between.

    Returns the inverse frequencies and the attention temperature factor (0.1 ln(s) + 1), which
    scales cos and sin, so that q·k grows by its square, as the paper prescribes.
    """
    extrapolation = plain_inv_freq(head_dim, base)
    interpolation = extrapolation / s.factor

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the dimension rotates fast enough to extrapolate
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if s.attention_factor is not None:
        mscale = float(s.attention_factor)
    else:
        mscale = 1.0 if s.factor <= 1 else 0.1 * math.log(s.factor) + 1.0
    return inv_freq, mscale


def llama3_inv_freq(head_dim: int, base: float, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths longer than original / low_freq_factor are stretched by the factor,
    shorter than original / high_freq_factor kept, and those between blended by where they fall."""
    inv_freq = plain_inv_freq(head_dim, base)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq


def scaled_inv_freq(head_dim: int, base: float, s: RopeScaling | None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies of `s`'s scaling type and the factor on cos and sin (YaRN's temperature)."""
    if s is None:
        return plain_inv_freq(head_dim, base), 1.0
    if s.rope_type == "yarn":
        return yarn_inv_freq(head_dim, base, s)
    if s.rope_type == "llama3":
        return llama3_inv_freq(head_dim, base, s), 1.0
    if s.rope_type == "freq_factors":
        factors = torch.tensor(s.freq_factors, dtype=torch.float32)
        if factors.shape != (head_dim // 2,) or not bool((factors > 0).all()):
            raise ValueError(f"rope freq_factors must be {head_dim // 2} positive numbers")
        return plain_inv_freq(head_dim, base) / factors, 1.0
    return plain_inv_freq(head_dim, base) / s.factor, 1.0  # linear: positions divided by the factor


class RotaryEmbedding(nn.Module):
    """Applies RoPE in the rotate-half layout (Qwen2/HF), from a float32 cos|sin table.

    The table is derived, never loaded, and must stay float32 whatever the model's dtype, so it is
    a plain attribute built on first use on each device rather than a buffer that `.to()` converts.
    """

    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.inv_freq, self.mscale = scaled_inv_freq(head_dim, base, scaling)
        self.head_dim, self.max_positions = head_dim, max_positions
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        """[max_positions, head_dim] float32: cos in the first half, sin in the second."""
        if device not in self._tables:
            pos = torch.arange(self.max_positions, dtype=torch.float32, device="cpu")
            freqs = torch.outer(pos, self.inv_freq)  # [max_pos, head_dim/2]
            cos_sin = torch.cat([freqs.cos() * self.mscale, freqs.sin() * self.mscale], dim=-1)
            self._tables[device] = cos_sin.to(device)
        return self._tables[device]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; q: [num_tokens, heads * head_dim]; k: [num_tokens, kv_heads * head_dim]
        cos, sin = self.table(q.device)[positions].chunk(2, dim=-1)  # [num_tokens, head_dim/2] each
        return _rotate(q, cos, sin, self.head_dim), _rotate(k, cos, sin, self.head_dim)

    def cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step factors for `rotate_`, looked up once per forward pass and shared by every layer:
        float32 [num_tokens, 1, head_dim] each, cos|cos and -sin|sin."""
        cos, sin = self.table(device)[positions].chunk(2, dim=-1)  # [num_tokens, head_dim/2] each
        return torch.cat([cos, cos], dim=-1)[:, None, :], torch.cat([-sin, sin], dim=-1)[:, None, :]

    def rotate_(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
        """RoPE on x: [num_tokens, n * head_dim] in place (q and k side by side, e.g. as columns of the
        qkv projection, may go in one call), with the factors of `cos_sin`. Writing back into x (one
        copy that also rounds) spares the caller a split per layer. x*cos|cos + swap_halves(x)*(-sin|sin)
        equals `forward` bit for bit: a - b and a + (-b) round alike."""
        cos, sin = cos_sin
        heads = x.view(x.shape[0], -1, self.head_dim)
        h = heads.float()
        half = self.head_dim // 2
        out = h * cos
        out.add_(torch.cat([h[..., half:], h[..., :half]], dim=-1).mul_(sin))
        heads.copy_(out)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    shape, dtype = x.shape, x.dtype
    x = x.view(shape[0], -1, head_dim).float()
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(dtype).view(shape)
