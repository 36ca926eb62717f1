"""Fine-grained E4M3 quantisation (report section 3.3.2), the reference every kernel is tested
against and the path used off the GPU.

Activations: 1x128 tiles, one scale per token per 128 channels. Weights: 128x128 blocks. A scale
is amax / 448 (amax clamped at 1e-4, as DeepSeek's kernels do), optionally rounded up to a power
of two. Activations are multiplied by its reciprocal (one IEEE division per scale, not one per
value, as the GPU kernels do), which with power-of-two scales is
the division exactly and otherwise can differ from x / scale by one FP32 ulp before the rounding to
E4M3's 3 mantissa bits; weights are divided by it. Values are rounded to E4M3. The quantised tensor
is zero-padded to whole tiles, the shape the GEMMs take; `dequantize_*` undo it.
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
    q = (tiles * scale.reciprocal().unsqueeze(-1)).to(E4M3).flatten(-2)
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


def quantize_weight(w: torch.Tensor, power_of_two: bool = False):
    """A Linear's W (N, K) -> its 128x128 blocks and scales (quantize_blocks), and their transposes:
    the blocks of W^T, which the gradient of the input reads."""
    q, s = quantize_blocks(w, power_of_two)
    return q, s, q.t().contiguous(), s.t().contiguous()


def quantize_expert_blocks(weights: list[torch.Tensor], power_of_two: bool = False):
    """Expert weights (E, R, C_i) side by side along C -> E4M3 [w_1 | w_2 | ...] (E, R, sum C_i), each
    padded to whole blocks, with its 128x128 block scales (E, R/128, C/128), and the transposes of
    both: the forward's grouped GEMM reads the blocks of W^T, the backward's those of W."""
    qs, scales = [], []
    for w in weights:
        e, r, c = w.shape
        q, s = quantize_blocks(F.pad(w, (0, padded(c) - c, 0, padded(r) - r)).flatten(0, 1), power_of_two)
        qs.append(q.view(e, padded(r), padded(c)))
        scales.append(s.view(e, padded(r) // TILE, padded(c) // TILE))
    q, s = torch.cat(qs, 2), torch.cat(scales, 2)
    return q, s, q.transpose(1, 2).contiguous(), s.transpose(1, 2).contiguous()


def quantize_tiles_transposed(x: torch.Tensor, power_of_two: bool = False, groups=None,
                              x_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles of x^T (128x1 tiles of x), what weight gradients need. With `groups`
    (grouped.Groups) each expert's rows are tiled on their own. With `x_scale`, x is E4M3 with
    those 1x128 scales and is dequantised first."""
    if x_scale is not None:
        x = dequantize_tiles(x, x_scale, x.shape[1])
    parts = [x] if groups is None else x.split(groups.sizes())
    q, s = zip(*(quantize_tiles(part.t(), power_of_two) for part in parts))
    return torch.cat(q, 1), torch.cat(s, 1)


def quantize_wgrad_operands(a: torch.Tensor, b: torch.Tensor, power_of_two: bool = False, groups=None,
                            a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None):
    """quantize_tiles_transposed of a and of b: the two operands of a weight gradient, (a^T q, a^T
    scales, b^T q, b^T scales)."""
    return (*quantize_tiles_transposed(a, power_of_two, groups, a_scale),
            *quantize_tiles_transposed(b, power_of_two, groups, b_scale))


def swiglu_quantize(gu: torch.Tensor, power_of_two: bool = False):
    """gu = [gate | up] (rows, 2 * inter), inter a multiple of 128 -> h = silu(gate) * up in 1x128
    tiles (the down projection's input), and gate and up in 1x128 tiles (the FP8 cache that
    backward recomputes h from, report section 3.3.3)."""
    gate, up = gu.float().chunk(2, dim=1)
    return (*quantize_tiles(F.silu(gate) * up, power_of_two), *quantize_tiles(gu, power_of_two))


def swiglu_backward(cache: torch.Tensor, cache_scale: torch.Tensor, dh: torch.Tensor, dtype: torch.dtype):
    """From the FP8 cache of [gate | up] and dh (rows, inter): h = silu(gate) * up again, and
    d[gate | up], both in dtype."""
    gate, up = dequantize_tiles(cache, cache_scale, cache.shape[1]).chunk(2, dim=1)
    dh = dh.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dgu = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * silu], dim=1)
    return (silu * up).to(dtype), dgu.to(dtype)
