"""Rotary position embedding on the decoupled 64-d query/key part, with YaRN (report section 4.3).

Channel pairs are adjacent (the "interleaved" convention of DeepSeek-V3's reference): pair j is
(x[2j], x[2j+1]), rotated by angle position * freq_j.
"""
import math

import torch
from torch import nn

from .config import ModelConfig


def yarn_correction_range(cfg: ModelConfig) -> tuple[int, int]:
    """Pair indices where YaRN's ramp starts (beta_fast) and ends (beta_slow)."""

    def pair_index(num_rotations: float) -> float:
        # The pair whose wavelength fits num_rotations times into the original context.
        return (cfg.qk_rope_head_dim * math.log(cfg.original_seq_len / (num_rotations * 2 * math.pi))
                / (2 * math.log(cfg.rope_theta)))

    low = math.floor(pair_index(cfg.beta_fast))
    high = math.ceil(pair_index(cfg.beta_slow))
    return max(low, 0), min(high, cfg.qk_rope_head_dim - 1)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """One frequency per channel pair; blended with freq / rope_factor when YaRN is active."""
    dim = cfg.qk_rope_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if cfg.yarn:
        low, high = yarn_correction_range(cfg)
        span = max(high - low, 1e-3)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
        # Pairs below `low` (high frequency) keep theirs; pairs above `high` are divided by the factor.
        freqs = freqs / cfg.rope_factor * ramp + freqs * (1 - ramp)
    return freqs.float()


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables (not learned, not saved) and rotates the last dimension of x."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | None = None) -> None:
        device = device or self.cos.device
        if device.type == "meta":
            shape = (self.cfg.max_seq_len, self.cfg.qk_rope_head_dim // 2)
            self.cos, self.sin = torch.empty(shape, device=device), torch.empty(shape, device=device)
            return
        positions = torch.arange(self.cfg.max_seq_len, dtype=torch.float32)
        angles = torch.outer(positions, rope_frequencies(self.cfg))
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, heads, rope_dim) at positions 0..seq-1."""
        seq = x.shape[1]
        if seq > self.cos.shape[0]:
            raise ValueError(f"Sequence length {seq} exceeds model.max_seq_len={self.cos.shape[0]}.")
        cos = self.cos[:seq].view(1, seq, 1, -1)
        sin = self.sin[:seq].view(1, seq, 1, -1)
        pairs = x.float().unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
        return rotated.flatten(-2).type_as(x)
