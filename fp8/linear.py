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

Under torch.compile no FP8 layer breaks a block's graph. The Linear is traced: the quantisation of
its input and of the output gradient is the reference's torch ops, which Inductor fuses with the
ops around them, its GEMMs call the `scaled_mm` operator, and the weight gradient (with its
transposing quantisation) is an operator, `linear_wgrad`. The experts' forward and backward are
custom operators (`torch.library`) that a compiled graph calls as they run eagerly: traced into a
graph, their Triton kernels and TMA descriptors gave wrong gradients (the global norm overflowed at
the first step on an H200).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.library import custom_op

from dsv3.model.moe import RoutedExperts, compute_dtype

from . import quant
from .gemm import gemm
from .grouped import grouped_gemm, grouped_wgrad
from .groups import Groups
from .quant import E4M3, TILE, padded


def _ops(device: torch.device):
    """The quantisation functions for this device: the Triton kernels on CUDA, the reference
    elsewhere (same names, same results) and inside a compiled graph, where the reference's torch
    ops are fused by Inductor into the kernel that produces the tensor (the RMSNorm before a
    projection, the gradient's producer), with the padding and layout the GEMM needs."""
    if device.type == "cuda" and not torch.compiler.is_compiling():
        from . import kernels
        return kernels
    return quant


def _fp8(like: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """Empty E4M3 (rows, cols) and its 1x128 scales (rows, cols/128): what the fake kernels return."""
    return like.new_empty((rows, cols), dtype=E4M3), like.new_empty((rows, cols // TILE), dtype=torch.float32)


def _rows(t: Tensor) -> Tensor:
    """t as a 2-d (rows, last dim) tensor; no operator call when it already is one."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _first_cols(t: Tensor, n: int) -> Tensor:
    """t's first n columns (the GEMM's output is as wide as its padded operand)."""
    return t if t.shape[1] == n else t[:, :n]


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out_dtype: torch.dtype, power_of_two: bool):
        ops = _ops(x.device)
        x_q, x_s = ops.quantize_tiles(_rows(x), power_of_two)
        w_q, w_s, wt_q, wt_s = ops.quantize_weight(weight, power_of_two)
        y = _first_cols(gemm(x_q, x_s, w_q, w_s, b_blocks=True, out_dtype=out_dtype), weight.shape[0])
        ctx.save_for_backward(x_q, x_s, wt_q, wt_s)
        ctx.meta = (x.shape, weight.shape, x.dtype, power_of_two)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_q, x_s, wt_q, wt_s = ctx.saved_tensors
        shape, (n, k), x_dtype, power_of_two = ctx.meta
        ops = _ops(grad.device)
        grad = _rows(grad)
        g_q, g_s = ops.quantize_tiles(grad, power_of_two)
        dx = _first_cols(gemm(g_q, g_s, wt_q, wt_s, b_blocks=True, out_dtype=x_dtype), k)  # dy @ W, from W^T's blocks
        dw = linear_wgrad(grad, x_q, x_s, power_of_two)
        if dw.shape != (n, k):
            dw = dw[:n, :k]
        return dx if len(shape) == 2 else dx.view(shape), dw, None, None


@custom_op("dsv3::fp8_linear_wgrad", mutates_args=())
def linear_wgrad(grad: Tensor, x_q: Tensor, x_s: Tensor, power_of_two: bool) -> Tensor:
    """dW = dy^T @ x over tokens, in FP32, (N, K padded): 128x1 tiles of dy and of x (x from its
    cached FP8 copy). An operator so that compiled graphs, too, run the transposing quantisation on
    our Triton kernel (one pass, tiles staged through shared memory) rather than as a reduction
    across rows; it calls cuBLASLt itself, not through a nested operator."""
    ops = _ops(grad.device)
    gt_q, gt_s, xt_q, xt_s = ops.quantize_wgrad_operands(grad, x_q, power_of_two, b_scale=x_s)
    return gemm(gt_q, gt_s, xt_q, xt_s, b_blocks=False, out_dtype=torch.float32, operator=False)


@linear_wgrad.register_fake
def _(grad, x_q, x_s, power_of_two):
    return grad.new_empty((grad.shape[1], x_q.shape[1]), dtype=torch.float32)


class FP8Linear(nn.Linear):
    """nn.Linear (same parameters and names) computing its three GEMMs in FP8."""
    power_of_two = False

    def forward(self, x: Tensor) -> Tensor:
        assert self.bias is None, "the model's linears have no bias"
        return FP8LinearFunction.apply(x, self.weight, compute_dtype(x), self.power_of_two)


@custom_op("dsv3::fp8_experts_forward", mutates_args=())
def experts_forward(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, groups: list[Tensor], out_dtype: torch.dtype,
                    power_of_two: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Expert-sorted rows x (rows, dim) -> y (rows, dim) in out_dtype, and the FP8 cache backward
    reads: x and [gate | up] in 1x128 tiles, [W1 | W3] and W2 in 128x128 blocks. `groups` is
    Groups.tensors()."""
    ops = _ops(x.device)
    groups = Groups(*groups)
    dim = w1.shape[1]
    x_q, x_s = ops.quantize_tiles(x, power_of_two)
    w13_q, w13_s, w13_qt, w13_st = ops.quantize_expert_blocks([w1, w3], power_of_two)  # (E, dim, 2 * inter)
    w2_q, w2_s, w2_qt, w2_st = ops.quantize_expert_blocks([w2], power_of_two)  # (E, inter, dim), padded
    gu = grouped_gemm(x_q, x_s, w13_qt, w13_st, groups, out_dtype)
    h_q, h_s, gu_q, gu_s = ops.swiglu_quantize(gu, power_of_two)
    y = grouped_gemm(h_q, h_s, w2_qt, w2_st, groups, out_dtype, n_out=dim)
    return y.contiguous(), x_q, x_s, gu_q, gu_s, w13_q, w13_s, w2_q, w2_s


@experts_forward.register_fake
def _(x, w1, w3, w2, groups, out_dtype, power_of_two):
    (rows, dim), (n_experts, inter) = x.shape, (w1.shape[0], padded(w1.shape[2]))

    def blocks(r: int, c: int):
        return (w1.new_empty((n_experts, r, c), dtype=E4M3),
                w1.new_empty((n_experts, r // TILE, c // TILE), dtype=torch.float32))
    return (x.new_empty((rows, dim), dtype=out_dtype), *_fp8(x, rows, padded(dim)), *_fp8(x, rows, 2 * inter),
            *blocks(padded(dim), 2 * inter), *blocks(inter, padded(dim)))


@custom_op("dsv3::fp8_experts_backward", mutates_args=())
def experts_backward(dy: Tensor, x_q: Tensor, x_s: Tensor, gu_q: Tensor, gu_s: Tensor, w13_q: Tensor, w13_s: Tensor,
                     w2_q: Tensor, w2_s: Tensor, groups: list[Tensor], inter: int, x_dtype: torch.dtype,
                     power_of_two: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy (rows, dim) -> dx (rows, dim) in x_dtype, and dW1, dW3 (E, dim, inter), dW2 (E, inter, dim)
    in FP32. Recomputes the SwiGLU output from the FP8 cache of its input (report section 3.3.3);
    Dgrad runs against the forward's FP8 weights, Wgrad over each expert's own 128-token tiles."""
    ops = _ops(dy.device)
    groups = Groups(*groups)
    dim = dy.shape[1]
    dy_q, dy_s = ops.quantize_tiles(dy, power_of_two)
    dh = grouped_gemm(dy_q, dy_s, w2_q, w2_s, groups, dy.dtype)
    h, dgu = ops.swiglu_backward(gu_q, gu_s, dh, dy.dtype)
    dgu_q, dgu_s = ops.quantize_tiles(dgu, power_of_two)
    dx = grouped_gemm(dgu_q, dgu_s, w13_q, w13_s, groups, x_dtype, n_out=dim)
    dw2, = grouped_wgrad(*ops.quantize_wgrad_operands(h, dy, power_of_two, groups), groups, inter, (dim,))
    dw1, dw3 = grouped_wgrad(*ops.quantize_wgrad_operands(x_q, dgu, power_of_two, groups, a_scale=x_s), groups, dim,
                             (inter, inter))
    return dx.contiguous(), dw1.contiguous(), dw3.contiguous(), dw2.contiguous()


@experts_backward.register_fake
def _(dy, x_q, x_s, gu_q, gu_s, w13_q, w13_s, w2_q, w2_s, groups, inter, x_dtype, power_of_two):
    (rows, dim), n_experts = dy.shape, w13_q.shape[0]
    weight = lambda *shape: dy.new_empty((n_experts, *shape), dtype=torch.float32)  # noqa: E731
    return dy.new_empty((rows, dim), dtype=x_dtype), weight(dim, inter), weight(dim, inter), weight(inter, dim)


class FP8ExpertsFunction(torch.autograd.Function):
    """All routed experts' SwiGLU MLPs, y_e = (silu(x_e W1_e) * x_e W3_e) W2_e, in grouped FP8 GEMMs.
    Gate and up run as one GEMM against [W1 | W3]."""

    @staticmethod
    def forward(ctx, x, counts, w1, w3, w2, out_dtype: torch.dtype, power_of_two: bool):
        groups = Groups.of(counts, x.shape[0]).tensors()
        y, *saved = experts_forward(x, w1, w3, w2, groups, out_dtype, power_of_two)
        ctx.save_for_backward(*saved, *groups)
        ctx.meta = (w1.shape[2], x.dtype, power_of_two)
        return y

    @staticmethod
    def backward(ctx, dy):
        *saved, counts, expert, start, end, first_tile = ctx.saved_tensors
        inter, x_dtype, power_of_two = ctx.meta
        groups = [counts, expert, start, end, first_tile]
        dx, dw1, dw3, dw2 = experts_backward(dy, *saved, groups, inter, x_dtype, power_of_two)
        return dx, None, dw1, dw3, dw2, None, None


class FP8RoutedExperts(RoutedExperts):
    """Routed experts (same parameters and names) computing all their GEMMs in grouped FP8."""
    power_of_two = False

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        return FP8ExpertsFunction.apply(x, counts, self.w1, self.w3, self.w2, compute_dtype(x), self.power_of_two)
