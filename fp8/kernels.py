"""Triton quantisation kernels: the GPU fast path of `quant.py`, with the same outputs.

- `quantize_tiles`: 1x128 tiles along the last dim (activations, and gradients of outputs).
- `quantize_tiles_transposed`: 1x128 tiles of x^T, i.e. 128x1 tiles of x, written transposed, in
  one pass: what the weight gradient needs of the saved input and of the output gradient.
- `quantize_blocks`: 128x128 blocks (weights).
Each program handles one tile or block; scales are amax/448 (clamped, optionally powers of two),
and values are divided with IEEE rounding (div_rn), as torch divides, so the GPU results equal the
reference bit for bit.
They run under TRITON_INTERPRET=1 on the CPU, where the float -> E4M3 cast rounds differently from
torch's for about 2% of elements (tests allow one E4M3 step there and demand equality on the GPU).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant import E4M3, TILE, padded


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    scale = tl.maximum(amax, 1e-4) / 448.0  # quant.MIN_AMAX, quant.E4M3_MAX
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    return scale


@triton.jit
def _tiles_kernel(x_ptr, q_ptr, s_ptr, rows, k, k_pad, POW2: tl.constexpr, TILE_K: tl.constexpr):
    row = tl.program_id(0)
    tile = tl.program_id(1)
    cols = tile * TILE_K + tl.arange(0, TILE_K)
    x = tl.load(x_ptr + row * k + cols, mask=cols < k, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.abs(x), axis=0), POW2)
    tl.store(q_ptr + row * k_pad + cols, tl.math.div_rn(x, scale).to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + row * (k_pad // TILE_K) + tile, scale)


@triton.jit
def _tiles_transposed_kernel(x_ptr, q_ptr, s_ptr, rows, k, rows_pad, POW2: tl.constexpr, TILE_R: tl.constexpr,
                             COLS: tl.constexpr):
    """x (rows, k) -> q (k, rows_pad): column c of x, rows [t*128, (t+1)*128), is one tile."""
    tile = tl.program_id(0)
    col_block = tl.program_id(1)
    r = tile * TILE_R + tl.arange(0, TILE_R)
    c = col_block * COLS + tl.arange(0, COLS)
    mask = (r[:, None] < rows) & (c[None, :] < k)
    x = tl.load(x_ptr + r[:, None] * k + c[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _scale(tl.max(tl.abs(x), axis=0), POW2)  # (COLS,)
    q = tl.math.div_rn(x, scale[None, :]).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + c[None, :] * rows_pad + r[:, None], q, mask=c[None, :] < k)
    tl.store(s_ptr + c * (rows_pad // TILE_R) + tile, scale, mask=c < k)


@triton.jit
def _blocks_kernel(w_ptr, q_ptr, s_ptr, n, k, k_pad, POW2: tl.constexpr, BLOCK: tl.constexpr):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    r = bn * BLOCK + tl.arange(0, BLOCK)
    c = bk * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + r[:, None] * k + c[None, :], mask=(r[:, None] < n) & (c[None, :] < k), other=0.0)
    w = w.to(tl.float32)
    scale = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    tl.store(q_ptr + r[:, None] * k_pad + c[None, :], tl.math.div_rn(w, scale).to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + bn * (k_pad // BLOCK) + bk, scale)


def quantize_tiles(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    shape, k = x.shape, x.shape[-1]
    x = x.reshape(-1, k).contiguous()
    rows, k_pad = x.shape[0], padded(k)
    q = torch.empty((rows, k_pad), dtype=E4M3, device=x.device)
    s = torch.empty((rows, k_pad // TILE), dtype=torch.float32, device=x.device)
    if rows:
        _tiles_kernel[(rows, k_pad // TILE)](x, q, s, rows, k, k_pad, POW2=power_of_two, TILE_K=TILE)
    return q.view(*shape[:-1], k_pad), s.view(*shape[:-1], k_pad // TILE)


def quantize_tiles_transposed(x: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, k) -> the 1x128-tile quantisation of x^T: q (k, rows padded), scales (k, rows/128)."""
    x = x.contiguous()
    rows, k = x.shape
    rows_pad = padded(rows)
    q = torch.empty((k, rows_pad), dtype=E4M3, device=x.device)
    s = torch.empty((k, rows_pad // TILE), dtype=torch.float32, device=x.device)
    cols = 32
    _tiles_transposed_kernel[(rows_pad // TILE, triton.cdiv(k, cols))](x, q, s, rows, k, rows_pad, POW2=power_of_two,
                                                                      TILE_R=TILE, COLS=cols)
    return q, s


def quantize_blocks(w: torch.Tensor, power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.contiguous()
    n, k = w.shape
    q = torch.empty((padded(n), padded(k)), dtype=E4M3, device=w.device)
    s = torch.empty((padded(n) // TILE, padded(k) // TILE), dtype=torch.float32, device=w.device)
    _blocks_kernel[(padded(n) // TILE, padded(k) // TILE)](w, q, s, n, k, padded(k), POW2=power_of_two, BLOCK=TILE)
    return q, s

