"""Grouped FP8 GEMMs for the routed experts: one launch for all experts, blockwise scales.

PyTorch has no blockwise-scaled grouped GEMM on Hopper (`torch._scaled_grouped_mm` takes rowwise
scales only), so these are Triton kernels written the way report section 3.3.2 describes the GEMM:
each 128-wide K step is one E4M3 tensor-core product, promoted to FP32 registers and multiplied by
that step's activation and weight scales before it is added to the FP32 accumulator.

Rows are token copies sorted by expert (`counts` per expert). `Groups` cuts them into 128-row
tiles that never straddle two experts; it is built on the device from `counts` without reading
them on the host, so the tile list has room for every layout (ceil(rows/128) + experts entries)
and the tiles past the real ones are empty.

    grouped_gemm   a (rows, K) 1x128 tiles @ b[e] (N, K) 128x128 blocks, transposed -> (rows, N)
                   Fprop and Dgrad of every expert at once
    grouped_wgrad  a^T (N, P) @ b^T (K, P) over each expert's own token tiles -> (E, N, K) FP32
                   Wgrad; P runs over the experts' tiles, each expert's rows padded to whole tiles;
                   the K columns may be two weights' ([W1 | W3]), returned as two tensors

Off the GPU (or before FP8 tensor cores, compute capability 8.9) both run the exact emulation of
`gemm.emulate`, expert by expert; tests compare the two.
"""
from __future__ import annotations

import torch

from .gemm import emulate
from .groups import Groups
from .quant import TILE, padded


def triton_supported(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 9)


def emulate_grouped_gemm(a, a_scale, b, b_scale, groups: Groups, out_dtype: torch.dtype) -> torch.Tensor:
    outputs = [emulate(a_e, s_e, b[e], b_scale[e], b_blocks=True)
               for e, (a_e, s_e) in enumerate(zip(a.split(groups.sizes()), a_scale.split(groups.sizes())))]
    return torch.cat(outputs).to(out_dtype)


def emulate_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, groups: Groups) -> torch.Tensor:
    tiles = groups.first_tile.tolist()
    outputs = []
    for e in range(groups.counts.numel()):
        cols, scale_cols = slice(tiles[e] * TILE, tiles[e + 1] * TILE), slice(tiles[e], tiles[e + 1])
        outputs.append(emulate(a_t[:, cols], a_t_scale[:, scale_cols], b_t[:, cols], b_t_scale[:, scale_cols],
                               b_blocks=False))
    return torch.stack(outputs)


def grouped_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, groups: Groups,
                 out_dtype: torch.dtype, n_out: int | None = None) -> torch.Tensor:
    """a (rows, K) E4M3 with scales (rows, K/128), sorted by expert; b (E, N, K) E4M3 with 128x128
    block scales (E, N/128, K/128); N and K multiples of 128. Row r of the result is a[r] @ b[e]^T
    for its expert e, its first n_out (default N) columns."""
    if not triton_supported(a):
        return emulate_grouped_gemm(a, a_scale, b, b_scale, groups, out_dtype)[:, :n_out]
    from .kernels import launch_grouped_gemm
    return launch_grouped_gemm(a, a_scale, b, b_scale, groups, out_dtype, n_out)


def grouped_wgrad(a_t: torch.Tensor, a_t_scale: torch.Tensor, b_t: torch.Tensor, b_t_scale: torch.Tensor,
                  groups: Groups, n_out: int, widths: tuple[int, ...]) -> list[torch.Tensor]:
    """For each expert e, a_e^T @ b_e in FP32: a_t (N, P) and b_t (K, P) are the 1x128-tile
    quantisations of a^T and b^T along each expert's own token tiles (`quantize_tiles_transposed`
    with `groups`). b's K rows are one or two weights' columns side by side, each padded to 128
    (`widths` gives their real widths): returns one (E, n_out, width) tensor per width."""
    if not triton_supported(a_t):
        out = emulate_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, groups)[:, :n_out]
        starts = [0, padded(widths[0])][:len(widths)]
        return [out[:, :, start:start + width] for start, width in zip(starts, widths)]
    from .kernels import launch_grouped_wgrad
    return launch_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, groups, n_out, widths)
