"""Fine-grained E4M3 quantisation (RECIPE.md section 4), the reference every kernel is tested
against and the path used off the GPU.

Activations: 1x128 tiles, one scale per token per 128 channels. Weights: 128x128 blocks. A scale
is amax / 448 (amax clamped at 1e-4, as DeepSeek's kernels do), optionally rounded up to a power
of two; values are divided by it and rounded to E4M3. The quantised tensor is zero-padded to whole
tiles, the shape the GEMMs take; `dequantize_*` undo it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128
MIN_AMAX = 1e-4


def padded(n: int) -> int:
    return math.ceil(n / TILE) * TILE


def scale_of(amax: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    scale = amax.float().clamp_min(MIN_AMAX) / E4M3_MAX
    return torch.exp2(torch.ceil(torch.log2(scale))) if power_of_two else scale


def quantize_tiles(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> E4M3 (..., K padded to 128) and fp32 scales (..., K/128)."""
    k = x.shape[-1]
    x = F.pad(x.float(), (0, padded(k) - k))
    tiles = x.unflatten(-1, (-1, TILE))
    scale = scale_of(tiles.abs().amax(dim=-1), power_of_two)
    q = (tiles / scale.unsqueeze(-1)).to(E4M3).flatten(-2)
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    return (q.float().unflatten(-1, (-1, TILE)) * scale.unsqueeze(-1)).flatten(-2)[..., :k]


def quantize_blocks(w: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> E4M3 (N, K padded to 128 each) and fp32 scales (N/128, K/128)."""
    n, k = w.shape
    w = F.pad(w.float(), (0, padded(k) - k, 0, padded(n) - n))
    blocks = w.unflatten(1, (-1, TILE)).unflatten(0, (-1, TILE))  # (N/128, 128, K/128, 128)
    scale = scale_of(blocks.abs().amax(dim=(1, 3)), power_of_two)
    q = (blocks / scale[:, None, :, None]).to(E4M3).flatten(2).flatten(0, 1)
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    blocks = q.float().unflatten(1, (-1, TILE)).unflatten(0, (-1, TILE)) * scale[:, None, :, None]
    return blocks.flatten(2).flatten(0, 1)[:shape[0], :shape[1]]
