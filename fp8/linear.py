"""FP8 training layers (report section 3.3): a Linear and the routed experts with all three GEMMs
in E4M3 with fine-grained scales.

    forward  y  = x @ W^T     x in 1x128 tiles, W in 128x128 blocks; y in the compute dtype
    dgrad    dx = dy @ W      dy in 1x128 tiles (never 128x128: report App. B.2), W's blocks
    wgrad    dW = dy^T @ x    both in 1x128 tiles along the token dimension (128x1 tiles of dy, x)

The forward saves x already quantised (activation caching in FP8); the weight gradient takes it
back through dequantise -> transpose -> requantise, as DeepSeek-V3 does. Master weights and their
gradients stay FP32. Quantisation runs the Triton kernels on CUDA and the torch reference
elsewhere; the Linear's GEMMs run cuBLASLt on Hopper (`gemm.py`), the experts' run our grouped
Triton GEMMs (`grouped.py`), and both the exact emulation elsewhere.
"""
from __future__ import annotations

import torch
from torch import nn

from dsv3.model.moe import RoutedExperts, compute_dtype

from . import quant
from .gemm import gemm
from .grouped import grouped_gemm, grouped_wgrad
from .groups import Groups


def _ops(device: torch.device):
    """The quantisation functions for this device: the Triton kernels on CUDA, the reference
    elsewhere (same names, same results)."""
    if device.type == "cuda":
        from . import kernels
        return kernels
    return quant


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, power_of_two: bool):
        ops = _ops(x.device)
        shape, k = x.shape, x.shape[-1]
        x_q, x_s = ops.quantize_tiles(x.reshape(-1, k), power_of_two)
        w_q, w_s = ops.quantize_blocks(weight, power_of_two)
        y = gemm(x_q, x_s, w_q, w_s, b_blocks=True, out_dtype=out_dtype)[:, :weight.shape[0]]
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.meta = (shape, weight.shape, x.dtype, power_of_two)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        shape, (n, k), x_dtype, power_of_two = ctx.meta
        ops = _ops(grad.device)
        grad = grad.reshape(-1, n)
        g_q, g_s = ops.quantize_tiles(grad, power_of_two)
        # dx = dy @ W: W's blocks transposed are the 128x128 blocks of W^T
        dx = gemm(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), b_blocks=True, out_dtype=torch.float32)
        # dW = dy^T @ x over tokens: 128x1 tiles of dy and of x (x from its cached FP8 copy)
        gt_q, gt_s = ops.quantize_tiles_transposed(grad, power_of_two)
        xt_q, xt_s = ops.quantize_tiles_transposed(x_q, power_of_two, x_scale=x_s)
        dw = gemm(gt_q, gt_s, xt_q, xt_s, b_blocks=False, out_dtype=torch.float32)[:n, :k]
        return dx[:, :k].to(x_dtype).view(shape), dw, None, None


class FP8Linear(nn.Linear):
    """nn.Linear (same parameters and names) computing its three GEMMs in FP8."""
    power_of_two = False

    @torch.compiler.disable  # see FP8RoutedExperts.forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bias is None, "the model's linears have no bias"
        return FP8LinearFunction.apply(x, self.weight, compute_dtype(x), self.power_of_two)


class FP8ExpertsFunction(torch.autograd.Function):
    """All routed experts' SwiGLU MLPs, y_e = (silu(x_e W1_e) * x_e W3_e) W2_e, in grouped FP8 GEMMs.

    Gate and up run as one GEMM against [W1 | W3]. Forward saves x and [gate | up] in FP8 (1x128
    tiles); backward recomputes the SwiGLU output from that cache (report section 3.3.3) and runs Dgrad
    against the forward's FP8 weights and Wgrad over each expert's own 128-token tiles.
    """

    @staticmethod
    def forward(ctx, x, counts, w1, w3, w2, out_dtype: torch.dtype, power_of_two: bool):
        ops = _ops(x.device)
        dim, inter = w1.shape[1], w1.shape[2]
        groups = Groups.of(counts, x.shape[0])
        x_q, x_s = ops.quantize_tiles(x, power_of_two)
        w13_q, w13_s, w13_qt, w13_st = ops.quantize_expert_blocks([w1, w3], power_of_two)  # (E, dim, 2 * inter)
        w2_q, w2_s, w2_qt, w2_st = ops.quantize_expert_blocks([w2], power_of_two)  # (E, inter, dim), padded
        gu = grouped_gemm(x_q, x_s, w13_qt, w13_st, groups, out_dtype)
        h_q, h_s, gu_q, gu_s = ops.swiglu_quantize(gu, power_of_two)
        y = grouped_gemm(h_q, h_s, w2_qt, w2_st, groups, out_dtype, n_out=dim)
        ctx.save_for_backward(x_q, x_s, gu_q, gu_s, w13_q, w13_s, w2_q, w2_s)
        ctx.groups, ctx.meta = groups, (dim, inter, x.dtype, out_dtype, power_of_two)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_q, x_s, gu_q, gu_s, w13_q, w13_s, w2_q, w2_s = ctx.saved_tensors
        groups, (dim, inter, x_dtype, out_dtype, power_of_two) = ctx.groups, ctx.meta
        ops = _ops(dy.device)
        dy_q, dy_s = ops.quantize_tiles(dy, power_of_two)
        dh = grouped_gemm(dy_q, dy_s, w2_q, w2_s, groups, out_dtype)
        h, dgu = ops.swiglu_backward(gu_q, gu_s, dh, out_dtype)
        dgu_q, dgu_s = ops.quantize_tiles(dgu, power_of_two)
        dx = grouped_gemm(dgu_q, dgu_s, w13_q, w13_s, groups, x_dtype, n_out=dim)
        dw2, = grouped_wgrad(*ops.quantize_tiles_transposed(h, power_of_two, groups),
                             *ops.quantize_tiles_transposed(dy, power_of_two, groups), groups, inter, (dim,))
        dw1, dw3 = grouped_wgrad(*ops.quantize_tiles_transposed(x_q, power_of_two, groups, x_scale=x_s),
                                 *ops.quantize_tiles_transposed(dgu, power_of_two, groups), groups, dim, (inter, inter))
        return dx, None, dw1, dw3, dw2, None, None


class FP8RoutedExperts(RoutedExperts):
    """Routed experts (same parameters and names) computing all their GEMMs in grouped FP8."""
    power_of_two = False

    # Kept out of a compiled block's graph: compiled, the FP8 layers' gradients came out wrong (the
    # global norm overflowed at the first step on an H200 while eager blocks trained), so the FP8
    # GEMMs and their quantisation run eagerly between the compiled parts of a block.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return FP8ExpertsFunction.apply(x, counts, self.w1, self.w3, self.w2, compute_dtype(x), self.power_of_two)
