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

from .quant import E4M3, TILE

CUBLAS_K = 4 * TILE  # cuBLASLt's blockwise modes take K in multiples of four 128-wide blocks


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


def _pad_cols(t: torch.Tensor, k: int, value: float = 0.0) -> torch.Tensor:
    """t (rows, c) -> (rows, k), the new columns `value` (E4M3 has no pad kernel: a copy into zeros)."""
    if t.shape[1] == k:
        return t
    if t.dtype != E4M3:
        return F.pad(t, (0, k - t.shape[1]), value=value)
    wide = torch.zeros((t.shape[0], k), dtype=t.dtype, device=t.device)
    wide[:, :t.shape[1]] = t
    return wide


def _by_columns(t: torch.Tensor) -> torch.Tensor:
    """t laid out column-major (t.t() contiguous), copied only if it is not: the check reads the
    strides, so an operand already in place costs no operator call."""
    rows, cols = t.shape
    if (rows == 1 or t.stride(0) == 1) and (cols == 1 or t.stride(1) == rows):
        return t
    return t.t().contiguous().t()


def _by_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def cublas_operands(a, a_scale, b, b_scale, b_blocks: bool):
    """The operands padded and laid out as cuBLASLt's blockwise modes require (module docstring).
    Plain torch ops, each only where an operand is not yet so: in a compiled graph Inductor fuses
    them into the quantisation that produced the operands, so they take no pass of their own."""
    k = -(-a.shape[1] // CUBLAS_K) * CUBLAS_K
    a = _pad_cols(_pad_rows(a, 4), k)
    a_scale = _by_columns(_pad_cols(_pad_rows(a_scale, 4), k // TILE, value=1.0))  # outer-dim-major
    if b_blocks:
        b = _pad_cols(b, k)
        b_scale = _pad_cols(b_scale, k // TILE, value=1.0).t()  # (K/128, N/128), K-major
    else:
        b = _pad_cols(_pad_rows(b, 4), k)
        b_scale = _by_rows(_pad_cols(_pad_rows(b_scale, 4), k // TILE, value=1.0).t())  # (K/128, N)
    return a, a_scale, b, b_scale


def cublas_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              b_blocks: bool) -> torch.Tensor:
    """a @ b^T in BF16 on cuBLASLt, for operands from `cublas_operands`; each is put in the layout
    required (a no-op when it already is)."""
    b_scale = _by_columns(b_scale) if b_blocks else _by_rows(b_scale)
    return torch._scaled_mm(_by_rows(a), _by_rows(b).t(), _by_columns(a_scale), b_scale, out_dtype=torch.bfloat16)


# The cuBLASLt call as an operator, for traced code: a compiled graph cannot hand cuBLASLt other
# layouts. Code that runs eagerly anyway (inside another operator) calls cublas_mm itself.
scaled_mm = custom_op("dsv3::fp8_scaled_mm", cublas_mm, mutates_args=())


@scaled_mm.register_fake
def _(a, a_scale, b, b_scale, b_blocks):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16)


def gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_blocks: bool,
         out_dtype: torch.dtype = torch.float32, operator: bool = True) -> torch.Tensor:
    """a @ b^T for E4M3 a (M, K) with 1x128 scales and b (N, K) with 128x128 (b_blocks) or 1x128
    scales; K a multiple of 128. Returns (M, N) in out_dtype. operator=False calls cuBLASLt
    directly rather than through the operator (for callers that are operators themselves)."""
    if not cublas_supported(a):
        return emulate(a, a_scale, b, b_scale, b_blocks).to(out_dtype)
    m, n = a.shape[0], b.shape[0]
    out = (scaled_mm if operator else cublas_mm)(*cublas_operands(a, a_scale, b, b_scale, b_blocks), b_blocks)
    if out.shape != (m, n):
        out = out[:m, :n]
    return out if out.dtype == out_dtype else out.to(out_dtype)
