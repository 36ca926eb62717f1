"""Triton kernels: the GPU fast path of `quant.py` (same outputs) and the grouped expert GEMMs.

- `quantize_tiles`: 1x128 tiles along the last dim (activations, and gradients of outputs).
- `quantize_tiles_transposed`: 1x128 tiles of x^T, i.e. 128x1 tiles of x, written transposed, in
  one pass, per expert when given `Groups`, optionally dequantising an FP8 input on the way in:
  what the weight gradient needs of the saved input and of the output gradient;
  `quantize_wgrad_operands`: both of them in one launch.
- `quantize_weight`, `quantize_expert_blocks`: 128x128 blocks of W and of W^T (weights), in one pass.
- `swiglu_quantize`, `swiglu_backward`: the experts' SwiGLU fused with its quantisation, and its
  backward from the FP8 cache of its input.
- `launch_grouped_gemm`, `launch_grouped_wgrad`: the GEMMs behind `grouped.py`.
Scales are amax/448 (clamped, optionally powers of two); activations are multiplied by the scale's
reciprocal, computed with IEEE rounding (div_rn) as torch's `reciprocal` is, and weights are divided
by it (div_rn, as torch divides), so the GPU quantisation equals the reference bit for bit.
They run under TRITON_INTERPRET=1 on the CPU, where the float -> E4M3 cast rounds differently from
torch's for about 2% of elements (tests allow one E4M3 step there and demand equality on the GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .groups import Groups
from .quant import E4M3, TILE, padded


@triton.jit
def _scale(amax, POW2: tl.constexpr):
    """The scales of these amaxes and their reciprocals, what activations are multiplied by: one
    division per scale rather than per value (a third fewer instructions; on an H100 it took no
    measurable time off, benchmarks/RESULTS.md, "FP8's quantisation by reciprocal ...")."""
    scale = tl.maximum(amax, 1e-4) / 448.0  # quant.MIN_AMAX, quant.E4M3_MAX
    if POW2:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    return scale, tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)


@triton.jit
def _tiles_kernel(x_ptr, q_ptr, s_ptr, rows, k, k_pad, POW2: tl.constexpr, ROWS: tl.constexpr, TILE_K: tl.constexpr):
    """ROWS rows of one 128-column tile: one scale per row."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    cols = tile * TILE_K + tl.arange(0, TILE_K)
    r64 = r[:, None].to(tl.int64)
    x = tl.load(x_ptr + r64 * k + cols[None, :], mask=(r[:, None] < rows) & (cols[None, :] < k), other=0.0)
    x = x.to(tl.float32)
    scale, inverse = _scale(tl.max(tl.abs(x), axis=1), POW2)
    q = (x * inverse[:, None]).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + r64 * k_pad + cols[None, :], q, mask=r[:, None] < rows)
    tl.store(s_ptr + r * (k_pad // TILE_K) + tile, scale, mask=r < rows)


@triton.jit
def _transpose_tile(x_ptr, x_scale_ptr, q_ptr, s_ptr, start, end, tile, col_block, k, rows_pad,
                    DEQUANTIZE: tl.constexpr, POW2: tl.constexpr, TILE_R: tl.constexpr, COLS: tl.constexpr):
    """Rows [start, end) of x (rows, k), at most 128, and COLS of its columns -> column block `tile`
    of q = x^T tiles (k, rows_pad) and their scales. With DEQUANTIZE, x is E4M3 with 1x128 scales
    and is dequantised on the way in."""
    r = start + tl.arange(0, TILE_R)
    c = col_block * COLS + tl.arange(0, COLS)
    mask = (r[:, None] < end) & (c[None, :] < k)
    x = tl.load(x_ptr + r[:, None] * k + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if DEQUANTIZE:  # COLS divides 128: the block's columns share one scale per row
        x *= tl.load(x_scale_ptr + r * (k // TILE_R) + (col_block * COLS) // TILE_R, mask=r < end, other=0.0)[:, None]
    scale, inverse = _scale(tl.max(tl.abs(x), axis=0), POW2)  # (COLS,)
    q = (x * inverse[None, :]).to(q_ptr.dtype.element_ty)
    out = tile * TILE_R + tl.arange(0, TILE_R)
    tl.store(q_ptr + c[None, :].to(tl.int64) * rows_pad + out[:, None], q, mask=c[None, :] < k)
    tl.store(s_ptr + tile * k + c, scale, mask=c < k)


@triton.jit
def _tiles_transposed_kernel(a_ptr, a_scale_ptr, qa_ptr, sa_ptr, b_ptr, b_scale_ptr, qb_ptr, sb_ptr, start_ptr,
                             end_ptr, rows, k_a, k_b, a_blocks, rows_pad, GROUPED: tl.constexpr,
                             DEQUANTIZE_A: tl.constexpr, DEQUANTIZE_B: tl.constexpr, POW2: tl.constexpr,
                             TILE_R: tl.constexpr, COLS: tl.constexpr):
    """Row tile `tile` of a (and of b, which has the same rows): the grid's column blocks below
    a_blocks are a's, the rest b's, so a weight gradient's two operands take one launch.
    GROUPED: the tiles' rows come from start_ptr, end_ptr (per expert); otherwise tile i is rows
    [128 i, min(128 (i + 1), rows))."""
    tile = tl.program_id(0)
    col_block = tl.program_id(1)
    if GROUPED:
        start = tl.load(start_ptr + tile).to(tl.int64)
        end = tl.load(end_ptr + tile)
    else:
        start = tile.to(tl.int64) * TILE_R
        end = rows
    if col_block < a_blocks:
        _transpose_tile(a_ptr, a_scale_ptr, qa_ptr, sa_ptr, start, end, tile, col_block, k_a, rows_pad,
                        DEQUANTIZE_A, POW2, TILE_R, COLS)
    else:
        _transpose_tile(b_ptr, b_scale_ptr, qb_ptr, sb_ptr, start, end, tile, col_block - a_blocks, k_b, rows_pad,
                        DEQUANTIZE_B, POW2, TILE_R, COLS)


@triton.jit
def _expert_blocks_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, st_ptr, rows, cols, rows_pad, out_cols, col_offset,
                          POW2: tl.constexpr, BLOCK: tl.constexpr):
    """Block (i, j) of expert e's w (rows, cols) -> q[e] (rows_pad, out_cols) from column col_offset
    on, its transpose q_t[e] (out_cols, rows_pad) from row col_offset on, and its scale in s[e]
    (rows_pad/128, out_cols/128) and in s_t[e], transposed. A 2-d w is one expert's."""
    e = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + e * rows * cols + r[:, None] * cols + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols),
                other=0.0).to(tl.float32)
    scale, _ = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
    # divided, not multiplied by the reciprocal: with the multiply, this kernel built by Triton 3.6
    # for sm_90 wrote about a quarter of each transposed block wrong, differently from run to run (a
    # race in the generated layout conversion). Weights are small, so the division costs little here
    q = tl.math.div_rn(w, scale).to(q_ptr.dtype.element_ty)
    out_c = col_offset + c
    tl.store(q_ptr + e * rows_pad * out_cols + r[:, None] * out_cols + out_c[None, :], q)
    tl.store(qt_ptr + e * out_cols * rows_pad + out_c[None, :] * rows_pad + r[:, None], q)
    row_blocks, col_blocks = rows_pad // BLOCK, out_cols // BLOCK
    row_block, col_block = tl.program_id(0), col_offset // BLOCK + tl.program_id(1)
    tl.store(s_ptr + (e * row_blocks + row_block) * col_blocks + col_block, scale)
    tl.store(st_ptr + (e * col_blocks + col_block) * row_blocks + row_block, scale)


ELEMENTWISE_ROWS = 16  # rows per program of the SwiGLU kernels
TILES_ROWS, TILES_WARPS = 64, 4  # rows and warps per program of the 1x128 quantisation
TRANSPOSED_COLS, TRANSPOSED_WARPS = 64, 2  # columns (a power of two, at most 128) and warps of the transposing one


def quantize_expert_blocks(weights: list[torch.Tensor], power_of_two: bool = False):
    """See quant.quantize_expert_blocks (the reference): one pass over each weight writes its blocks
    in both orientations, the forward's and the backward's."""
    n_experts, rows = weights[0].shape[:2]
    rows_pad, out_cols = padded(rows), sum(padded(w.shape[2]) for w in weights)
    device = weights[0].device
    q = torch.empty((n_experts, rows_pad, out_cols), dtype=E4M3, device=device)
    q_t = torch.empty((n_experts, out_cols, rows_pad), dtype=E4M3, device=device)
    s = torch.empty((n_experts, rows_pad // TILE, out_cols // TILE), dtype=torch.float32, device=device)
    s_t = torch.empty((n_experts, out_cols // TILE, rows_pad // TILE), dtype=torch.float32, device=device)
    offset = 0
    for w in weights:
        cols = w.shape[2]
        _expert_blocks_kernel[(rows_pad // TILE, padded(cols) // TILE, n_experts)](
            w.contiguous(), q, q_t, s, s_t, rows, cols, rows_pad, out_cols, offset, POW2=power_of_two, BLOCK=TILE)
        offset += padded(cols)
    return q, s, q_t, s_t


def quantize_weight(w: torch.Tensor, power_of_two: bool = False):
    """See quant.quantize_weight (the reference): a Linear's W (N, K) as 128x128 blocks and W^T's,
    in one pass (the expert kernel, for one expert)."""
    n, k = w.shape
    q = torch.empty((padded(n), padded(k)), dtype=E4M3, device=w.device)
    q_t = torch.empty((padded(k), padded(n)), dtype=E4M3, device=w.device)
    s = torch.empty((padded(n) // TILE, padded(k) // TILE), dtype=torch.float32, device=w.device)
    s_t = torch.empty((padded(k) // TILE, padded(n) // TILE), dtype=torch.float32, device=w.device)
    _expert_blocks_kernel[(padded(n) // TILE, padded(k) // TILE, 1)](w.contiguous(), q, q_t, s, s_t, n, k, padded(n),
                                                                     padded(k), 0, POW2=power_of_two, BLOCK=TILE)
    return q, s, q_t, s_t


def quantize_tiles(x: torch.Tensor, power_of_two: bool = False, rows_per_program: int = TILES_ROWS,
                   warps: int = TILES_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    shape, k = x.shape, x.shape[-1]
    flat = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()  # no operator call for a 2-d x
    rows, k_pad = flat.shape[0], padded(k)
    q = torch.empty((rows, k_pad), dtype=E4M3, device=x.device)
    s = torch.empty((rows, k_pad // TILE), dtype=torch.float32, device=x.device)
    if rows:
        _tiles_kernel[(triton.cdiv(rows, rows_per_program), k_pad // TILE)](flat, q, s, rows, k, k_pad,
                                                                           POW2=power_of_two, ROWS=rows_per_program,
                                                                           TILE_K=TILE, num_warps=warps)
    if x.dim() == 2:
        return q, s
    return q.view(*shape[:-1], k_pad), s.view(*shape[:-1], k_pad // TILE)


def quantize_tiles_transposed(x: torch.Tensor, power_of_two: bool = False, groups: Groups | None = None,
                              x_scale: torch.Tensor | None = None, cols: int = TRANSPOSED_COLS,
                              warps: int = TRANSPOSED_WARPS) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, k) -> the 1x128-tile quantisation of x^T: q (k, P), scales (k, P/128), with the
    rows cut into tiles per expert when `groups` is given (P = 128 * groups.n_tiles) and in one
    run otherwise (P = rows padded). With `x_scale`, x is E4M3 with those 1x128 scales (k is then
    its padded width; the FP8 activation cache) and is dequantised first. Each program (`warps`
    warps) reads 128 rows x `cols` columns."""
    return _transposed([(x, x_scale)], power_of_two, groups, cols, warps)


def quantize_wgrad_operands(a: torch.Tensor, b: torch.Tensor, power_of_two: bool = False,
                            groups: Groups | None = None, a_scale: torch.Tensor | None = None,
                            b_scale: torch.Tensor | None = None, cols: int = TRANSPOSED_COLS,
                            warps: int = TRANSPOSED_WARPS):
    """quantize_tiles_transposed of a and of b (same rows), the two operands of a weight gradient,
    in one launch: (a^T q, a^T scales, b^T q, b^T scales)."""
    return _transposed([(a, a_scale), (b, b_scale)], power_of_two, groups, cols, warps)


def _transposed(operands: list[tuple[torch.Tensor, torch.Tensor | None]], power_of_two: bool, groups: Groups | None,
                cols: int, warps: int) -> tuple[torch.Tensor, ...]:
    """One launch for one or two (x, x_scale) operands of the same rows."""
    assert cols <= TILE and TILE % cols == 0, "a program's columns lie within one 128-wide scale tile"
    operands = [(x.contiguous(), x_scale) for x, x_scale in operands]
    rows = operands[0][0].shape[0]
    assert all(x.shape[0] == rows for x, _ in operands), "the operands of one launch share their rows"
    n_tiles = -(-rows // TILE) if groups is None else groups.n_tiles
    rows_pad = TILE * n_tiles
    outputs = [(torch.empty((x.shape[1], rows_pad), dtype=E4M3, device=x.device),
                torch.empty((n_tiles, x.shape[1]), dtype=torch.float32, device=x.device)) for x, _ in operands]
    if rows_pad:
        (a, a_scale), (b, b_scale) = operands[0], operands[-1]
        (qa, sa), (qb, sb) = outputs[0], outputs[-1]
        a_blocks = triton.cdiv(a.shape[1], cols)
        col_blocks = a_blocks + (triton.cdiv(b.shape[1], cols) if len(operands) == 2 else 0)
        start, end = (a, a) if groups is None else (groups.start, groups.end)  # read only when grouped
        _tiles_transposed_kernel[(n_tiles, col_blocks)](
            a, a if a_scale is None else a_scale, qa, sa, b, b if b_scale is None else b_scale, qb, sb, start, end,
            rows, a.shape[1], b.shape[1], a_blocks, rows_pad, GROUPED=groups is not None,
            DEQUANTIZE_A=a_scale is not None, DEQUANTIZE_B=b_scale is not None, POW2=power_of_two, TILE_R=TILE,
            COLS=cols, num_warps=warps)
    # scales (k, tiles) with the tiles outermost: the layout cuBLASLt and the Wgrad kernel read
    return tuple(t for q, s in outputs for t in (q, s.t()))


@triton.jit
def _quantize(x, POW2: tl.constexpr):
    """Rows of one 1x128 tile each (x: (ROWS, 128) fp32) -> E4M3-ready values and their scales."""
    scale, inverse = _scale(tl.max(tl.abs(x), axis=1), POW2)
    return x * inverse[:, None], scale


@triton.jit
def _swiglu_quantize_kernel(gu_ptr, h_ptr, h_scale_ptr, cache_ptr, cache_scale_ptr, rows, inter, POW2: tl.constexpr,
                            ROWS: tl.constexpr, TILE_K: tl.constexpr):
    """gu = [gate | up] (rows, 2 * inter): h = silu(gate) * up as 1x128 tiles for the down
    projection, and gate and up themselves as 1x128 tiles (the FP8 cache backward recomputes h from)."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    tiles = inter // TILE_K
    mask = r < rows
    row = r[:, None].to(tl.int64)
    cols = tile * TILE_K + tl.arange(0, TILE_K)[None, :]
    gate = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask[:, None]).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask[:, None]).to(tl.float32)
    h, h_scale = _quantize(gate * tl.sigmoid(gate) * up, POW2)
    tl.store(h_ptr + row * inter + cols, h.to(h_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(h_scale_ptr + r * tiles + tile, h_scale, mask=mask)
    gate_q, gate_scale = _quantize(gate, POW2)
    up_q, up_scale = _quantize(up, POW2)
    tl.store(cache_ptr + row * 2 * inter + cols, gate_q.to(cache_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(cache_ptr + row * 2 * inter + inter + cols, up_q.to(cache_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(cache_scale_ptr + r * 2 * tiles + tile, gate_scale, mask=mask)
    tl.store(cache_scale_ptr + r * 2 * tiles + tiles + tile, up_scale, mask=mask)


@triton.jit
def _swiglu_backward_kernel(cache_ptr, cache_scale_ptr, dh_ptr, h_ptr, dgu_ptr, rows, inter, ROWS: tl.constexpr,
                            TILE_K: tl.constexpr):
    """From the FP8 cache of [gate | up] and dh: h = silu(gate) * up again, and d[gate | up]."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    tile = tl.program_id(1)
    tiles = inter // TILE_K
    mask = r < rows
    row = r[:, None].to(tl.int64)
    cols = tile * TILE_K + tl.arange(0, TILE_K)[None, :]
    gate_scale = tl.load(cache_scale_ptr + r * 2 * tiles + tile, mask=mask)
    up_scale = tl.load(cache_scale_ptr + r * 2 * tiles + tiles + tile, mask=mask)
    gate = tl.load(cache_ptr + row * 2 * inter + cols, mask=mask[:, None]).to(tl.float32) * gate_scale[:, None]
    up = tl.load(cache_ptr + row * 2 * inter + inter + cols, mask=mask[:, None]).to(tl.float32) * up_scale[:, None]
    dh = tl.load(dh_ptr + row * inter + cols, mask=mask[:, None]).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(h_ptr + row * inter + cols, (silu * up).to(h_ptr.dtype.element_ty), mask=mask[:, None])
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    tl.store(dgu_ptr + row * 2 * inter + cols, dgate.to(dgu_ptr.dtype.element_ty), mask=mask[:, None])
    tl.store(dgu_ptr + row * 2 * inter + inter + cols, (dh * silu).to(dgu_ptr.dtype.element_ty), mask=mask[:, None])


def swiglu_quantize(gu: torch.Tensor, power_of_two: bool = False):
    """See quant.swiglu_quantize (the reference)."""
    rows, inter = gu.shape[0], gu.shape[1] // 2
    h = torch.empty((rows, inter), dtype=E4M3, device=gu.device)
    h_scale = torch.empty((rows, inter // TILE), dtype=torch.float32, device=gu.device)
    cache = torch.empty((rows, 2 * inter), dtype=E4M3, device=gu.device)
    cache_scale = torch.empty((rows, 2 * inter // TILE), dtype=torch.float32, device=gu.device)
    if rows:
        grid = (triton.cdiv(rows, ELEMENTWISE_ROWS), inter // TILE)
        _swiglu_quantize_kernel[grid](gu.contiguous(), h, h_scale, cache, cache_scale, rows, inter, POW2=power_of_two,
                                      ROWS=ELEMENTWISE_ROWS, TILE_K=TILE)
    return h, h_scale, cache, cache_scale


def swiglu_backward(cache: torch.Tensor, cache_scale: torch.Tensor, dh: torch.Tensor, dtype: torch.dtype):
    """See quant.swiglu_backward (the reference)."""
    rows, inter = dh.shape
    h = torch.empty((rows, inter), dtype=dtype, device=dh.device)
    dgu = torch.empty((rows, 2 * inter), dtype=dtype, device=dh.device)
    if rows:
        grid = (triton.cdiv(rows, ELEMENTWISE_ROWS), inter // TILE)
        _swiglu_backward_kernel[grid](cache, cache_scale, dh.contiguous(), h, dgu, rows, inter, ROWS=ELEMENTWISE_ROWS,
                                      TILE_K=TILE)
    return h, dgu


@triton.jit
def _grouped_gemm_kernel(a_desc, a_scale_ptr, b_desc, b_scale_ptr, c_ptr, expert_ptr, start_ptr, end_ptr, n_tiles,
                         n, n_out, k, BLOCK_N: tl.constexpr, TILE_K: tl.constexpr, GROUP_TILES: tl.constexpr):
    """One 128-row tile of one expert times BLOCK_N (at most 128) columns of that expert's weight,
    which lie in one 128x128 block per K step: one weight scale per step. Both operands arrive by
    TMA (rows past the tile's expert are loaded and never stored); programs go through GROUP_TILES
    row tiles for each column block so that the weight block they share stays in L2."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_TILES * n_blocks
    first = (pid // per_group) * GROUP_TILES
    group_size = tl.minimum(n_tiles - first, GROUP_TILES)
    tile = first + (pid % per_group) % group_size
    col_block = (pid % per_group) // group_size
    start = tl.load(start_ptr + tile)
    end = tl.load(end_ptr + tile)
    if start >= end:
        return
    expert = tl.load(expert_ptr + tile)
    k_tiles = k // TILE_K
    rows = start.to(tl.int64) + tl.arange(0, TILE_K)
    row_mask = rows < end
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    b_row = expert * n + col_block * BLOCK_N
    a_scale_ptrs = a_scale_ptr + rows * k_tiles
    b_scale_ptrs = b_scale_ptr + (expert.to(tl.int64) * (n // TILE_K) + col_block * BLOCK_N // TILE_K) * k_tiles
    acc = tl.zeros((TILE_K, BLOCK_N), dtype=tl.float32)
    for kt in range(k_tiles):
        a = a_desc.load([start, kt * TILE_K])
        b = b_desc.load([b_row, kt * TILE_K])
        # one K group: E4M3 products on the tensor cores, promoted to FP32 with both scales. The
        # promotion runs in the warps that issue the products, so it is kept to one FMA per element:
        # the row's scale times the block's, then product * scale + acc
        scale = tl.load(a_scale_ptrs + kt, mask=row_mask, other=0.0) * tl.load(b_scale_ptrs + kt)
        acc += tl.dot(a, b.T) * scale[:, None]
    out = c_ptr + rows[:, None] * n_out + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < n_out))


@triton.jit
def _grouped_wgrad_kernel(a_desc, a_scale_ptr, b_desc, b_scale_ptr, c1_desc, c2_desc, first_tile_ptr, n_experts, n,
                          k, split, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_T: tl.constexpr):
    """(BLOCK_N, BLOCK_K) blocks of each expert e's a_e^T @ b_e, summing over the expert's own token
    tiles; a program computes the blocks pid, pid + programs, ... (one when the grid has one program
    per block). Columns [0, split) of the product go to c1 (E, n_out, k1_out), the rest to c2: the
    gradients of two weights computed as one ([W1 | W3]) land in their own tensors, stored through
    TMA, which clips the blocks at the tensors' edges. Scales are token-tile-major (tile, channel), as quantize_tiles_transposed writes them."""
    n_blocks = tl.cdiv(n, BLOCK_N)
    k_blocks = tl.cdiv(k, BLOCK_K)
    for work in tl.range(tl.program_id(0), n_experts * n_blocks * k_blocks, tl.num_programs(0)):
        expert = work // (n_blocks * k_blocks)
        block = work % (n_blocks * k_blocks)
        n0 = (block // k_blocks) * BLOCK_N
        k0 = (block % k_blocks) * BLOCK_K
        rn = n0 + tl.arange(0, BLOCK_N)
        rk = k0 + tl.arange(0, BLOCK_K)
        first = tl.load(first_tile_ptr + expert)
        last = tl.load(first_tile_ptr + expert + 1)
        a_scale_ptrs = a_scale_ptr + first.to(tl.int64) * n + rn
        b_scale_ptrs = b_scale_ptr + first.to(tl.int64) * k + rk
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in range(first, last):
            a = a_desc.load([n0, t * TILE_T])
            b = b_desc.load([k0, t * TILE_T])
            a_scale = tl.load(a_scale_ptrs, mask=rn < n, other=0.0)
            b_scale = tl.load(b_scale_ptrs, mask=rk < k, other=0.0)
            acc += tl.dot(a, b.T) * a_scale[:, None] * b_scale[None, :]
            a_scale_ptrs += n
            b_scale_ptrs += k
        if k0 < split:
            c1_desc.store([expert, n0, k0], acc[None, :, :])
        else:
            c2_desc.store([expert, n0, k0 - split], acc[None, :, :])


@dataclass(frozen=True)
class GemmConfig:
    """Tiles and pipelining of the grouped Fprop/Dgrad GEMM: 128 rows (one scale tile) by block_n
    columns, 128-wide K steps, `stages` of them in flight."""
    block_n: int = 128
    warps: int = 8
    stages: int = 4
    group_tiles: int = 8


@dataclass(frozen=True)
class WgradConfig:
    """Tiles and pipelining of the grouped Wgrad GEMM: (block_n, block_k) output blocks summed over
    128-token steps. Each step's product is promoted with an outer product of two scale vectors
    before the next step's MMA starts (Triton leaves it no asynchronous MMA). Blocks of 64 x 128
    with one warpgroup fit two programs per SM, which could take turns on the tensor cores; on an
    H200 they gained no more than timing noise (benchmarks/RESULTS.md, "FP8's grouped Wgrad
    blocks ..."), so the default stays one 128 x 128 block per program."""
    block_n: int = 128
    block_k: int = 128
    warps: int = 8
    stages: int = 4
    programs_per_sm: int = 0  # 0, one program per output block; else a persistent grid


GEMM = GemmConfig()
WGRAD = WgradConfig()


def launch_grouped_gemm(a, a_scale, b, b_scale, groups: Groups, out_dtype: torch.dtype, n_out: int | None = None,
                        config: GemmConfig = GEMM) -> torch.Tensor:
    """a (rows, K) E4M3 with 1x128 scales; b (E, N, K) E4M3 with 128x128 block scales -> (rows, n_out)
    (n_out <= N: the padded columns are not written)."""
    rows, k = a.shape
    n_experts, n = b.shape[0], b.shape[1]
    n_out = n if n_out is None else n_out
    assert config.block_n <= TILE, "the kernel takes one weight scale per K step: block_n at most 128"
    out = torch.empty((rows, n_out), dtype=out_dtype, device=a.device)
    if rows:
        b = b.contiguous().view(n_experts * n, k)
        a_desc = TensorDescriptor.from_tensor(a, [TILE, TILE])
        b_desc = TensorDescriptor.from_tensor(b, [config.block_n, TILE])
        grid = (groups.n_tiles * triton.cdiv(n, config.block_n),)
        _grouped_gemm_kernel[grid](a_desc, a_scale, b_desc, b_scale.contiguous(), out, groups.expert, groups.start,
                                   groups.end, groups.n_tiles, n, n_out, k, BLOCK_N=config.block_n, TILE_K=TILE,
                                   GROUP_TILES=config.group_tiles, num_warps=config.warps, num_stages=config.stages)
    return out


def launch_grouped_wgrad(a_t, a_t_scale, b_t, b_t_scale, groups: Groups, n_out: int,
                         widths: tuple[int, ...], config: WgradConfig = WGRAD) -> list[torch.Tensor]:
    """Per expert, a_e^T @ b_e in FP32, cut along its columns into len(widths) (one or two) tensors
    (E, n_out, width): b_t's rows hold the widths one after the other, each padded to 128."""
    n, k = a_t.shape[0], b_t.shape[0]
    n_experts = groups.counts.numel()
    # TMA stores rows whose byte stride is a multiple of 16: widths padded to 4 floats (cut off below)
    outs = [torch.empty((n_experts, n_out, -(-w // 4) * 4), dtype=torch.float32, device=a_t.device) for w in widths]
    split = padded(widths[0]) if len(widths) == 2 else k
    a_desc = TensorDescriptor.from_tensor(a_t, [config.block_n, TILE])
    b_desc = TensorDescriptor.from_tensor(b_t, [config.block_k, TILE])
    c_descs = [TensorDescriptor.from_tensor(out, [1, config.block_n, config.block_k]) for out in outs]
    # the kernel reads scales token-tile-major: (tile, channel) contiguous, i.e. these (channel, tile) views
    a_t_scale, b_t_scale = a_t_scale.t().contiguous(), b_t_scale.t().contiguous()
    blocks = n_experts * triton.cdiv(n, config.block_n) * triton.cdiv(k, config.block_k)
    programs = blocks
    if config.programs_per_sm:
        sms = torch.cuda.get_device_properties(a_t.device).multi_processor_count if a_t.is_cuda else 4
        programs = min(blocks, sms * config.programs_per_sm)
    _grouped_wgrad_kernel[(programs,)](a_desc, a_t_scale, b_desc, b_t_scale, c_descs[0], c_descs[-1], groups.first_tile,
                                       n_experts, n, k, split, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                                       TILE_T=TILE, num_warps=config.warps, num_stages=config.stages)
    outs = [out if out.shape[2] == w else out[:, :, :w] for out, w in zip(outs, widths)]
    return outs
