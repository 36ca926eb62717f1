"""FP8 GEMMs with fine-grained scales, all E4M3 in and FP32 accumulation of scaled partial sums.

    tiles x blocks  a (M, K) in 1x128 tiles  @ b (N, K) in 128x128 blocks, transposed  -> (M, N)
                    Fprop (x @ W^T) and Dgrad (dy @ W)
    tiles x tiles   a (M, K) in 1x128 tiles  @ b (N, K) in 1x128 tiles, transposed    -> (M, N)
                    Wgrad (dy^T @ x, K = tokens)

On Hopper (compute capability 9.0+) both run on cuBLASLt through `torch._scaled_mm`, which picks
BlockWise1x128 / BlockWise128x128 from the scales' shapes, laid out as it requires: 1x128 scales
outer-dim-major, M padded to a multiple of 4 and the K blocks to a multiple of 4. cuBLASLt gives
these modes a BF16 output only, so its results are BF16 before any cast to `out_dtype`. Elsewhere
`emulate` computes the same thing exactly as defined: E4M3 products summed in FP32 over each
128-wide K group, multiplied by the two scales of that group, and summed in FP32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import TILE


def cublas_supported(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)


def emulate(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
            b_blocks: bool) -> torch.Tensor:
    """Reference: sum over K groups g of (a_g @ b_g^T) * a_scale[:, g] * b_scale[., g], in FP32."""
    groups = a.shape[1] // TILE
    a32 = a.float().unflatten(1, (groups, TILE)).transpose(0, 1)  # (G, M, 128)
    b32 = b.float().unflatten(1, (groups, TILE)).transpose(0, 1)  # (G, N, 128)
    partial = a32 @ b32.transpose(1, 2)  # (G, M, N), each an exact-product FP32 sum of 128 terms
    b_s = b_scale.repeat_interleave(TILE, dim=0)[:b.shape[0]] if b_blocks else b_scale  # (N, G)
    return (partial * a_scale.t().unsqueeze(2) * b_s.t().unsqueeze(1)).sum(0)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


def _cublas(a, a_scale, b, b_scale, b_blocks: bool, out_dtype: torch.dtype) -> torch.Tensor:
    m = a.shape[0]
    a, a_scale = _pad_rows(a, 4), _pad_rows(a_scale, 4)
    a_scale = a_scale.t().contiguous().t()  # outer-dim-major
    n = b.shape[0]
    if b_blocks:
        groups = b_scale.shape[1]
        b_scale = F.pad(b_scale, (0, -groups % 4)).t()  # (K/128, N/128), K blocks padded to 4
    else:
        b, b_scale = _pad_rows(b, 4), _pad_rows(b_scale, 4)
        b_scale = b_scale.t().contiguous().t().t()  # (K/128, N), outer-dim-major
    out = torch._scaled_mm(a, b.t(), a_scale, b_scale, out_dtype=torch.bfloat16)
    return out[:m, :n].to(out_dtype)


def gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b^T for E4M3 a (M, K) with 1x128 scales and b (N, K) with 128x128 (b_blocks) or 1x128
    scales; K a multiple of 128. Returns (M, N) in out_dtype."""
    if cublas_supported(a):
        return _cublas(a, a_scale, b, b_scale, b_blocks, out_dtype)
    return emulate(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
