"""FP8 GEMMs with fine-grained scales, all E4M3 in and FP32 accumulation of scaled partial sums.

    tiles x blocks  a (M, K) in 1x128 tiles  @ b (N, K) in 128x128 blocks, transposed  -> (M, N)
                    Fprop (x @ W^T) and Dgrad (dy @ W)
    tiles x tiles   a (M, K) in 1x128 tiles  @ b (N, K) in 1x128 tiles, transposed    -> (M, N)
                    Wgrad (dy^T @ x, K = tokens)

On Hopper (compute capability 9.0+) both run on cuBLASLt through `torch._scaled_mm`, which picks
BlockWise1x128 / BlockWise128x128 from the scales' shapes, laid out as it requires: 1x128 scales
outer-dim-major with M padded to a multiple of 4, 128x128 scales K-major, and K zero-padded to a
multiple of 4 blocks (512). cuBLASLt gives these modes a BF16 output only, so its results are BF16
before any cast to `out_dtype`. The cuBLASLt call is a custom operator (`scaled_mm`); the padding and
layouts around it are torch ops, which a compiled graph fuses into the quantisation before it.
Elsewhere `emulate` computes the same thing exactly as defined: E4M3 products summed in FP32 over each
128-wide K group, multiplied by the two scales of that group, and summed in FP32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import custom_op

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


def _pad_k(t: torch.Tensor, scale: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pads E4M3 rows to k columns and their 1x128 scales with ones."""
    if t.shape[1] == k:
        return t, scale
    wide = torch.zeros((t.shape[0], k), dtype=t.dtype, device=t.device)
    wide[:, :t.shape[1]] = t
    return wide, F.pad(scale, (0, k // TILE - scale.shape[1]), value=1.0)


def cublas_operands(a, a_scale, b, b_scale, b_blocks: bool):
    """The operands padded and laid out as cuBLASLt's blockwise modes require (module docstring).
    Plain torch ops: in a compiled graph Inductor fuses them into the quantisation that produced
    the operands, so they take no pass of their own."""
    k = -(-a.shape[1] // (4 * TILE)) * 4 * TILE  # cuBLASLt wants the K blocks in fours
    a, a_scale = _pad_k(_pad_rows(a, 4), _pad_rows(a_scale, 4), k)
    a_scale = a_scale.t().contiguous().t()  # outer-dim-major
    if b_blocks:
        b, _ = _pad_k(b, b_scale, k)
        b_scale = F.pad(b_scale, (0, k // TILE - b_scale.shape[1]), value=1.0).t()  # (K/128, N/128), K-major
    else:
        b, b_scale = _pad_k(_pad_rows(b, 4), _pad_rows(b_scale, 4), k)
        b_scale = b_scale.t().contiguous()  # (K/128, N)
    return a, a_scale, b, b_scale


@custom_op("dsv3::fp8_scaled_mm", mutates_args=())
def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              b_blocks: bool) -> torch.Tensor:
    """a @ b^T in BF16 on cuBLASLt, for operands from `cublas_operands`. An operator, so that a
    compiled graph cannot hand cuBLASLt other layouts: each is put in the one required (a no-op
    when it already is)."""
    a_scale = a_scale.t().contiguous().t()
    b_scale = b_scale.t().contiguous().t() if b_blocks else b_scale.contiguous()
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), a_scale, b_scale, out_dtype=torch.bfloat16)


@scaled_mm.register_fake
def _(a, a_scale, b, b_scale, b_blocks):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)


def gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b^T for E4M3 a (M, K) with 1x128 scales and b (N, K) with 128x128 (b_blocks) or 1x128
    scales; K a multiple of 128. Returns (M, N) in out_dtype."""
    if cublas_supported(a):
        m, n = a.shape[0], b.shape[0]
        return scaled_mm(*cublas_operands(a, a_scale, b, b_scale, b_blocks), b_blocks)[:m, :n].to(out_dtype)
    return emulate(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
