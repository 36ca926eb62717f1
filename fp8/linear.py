"""FP8 training layers (RECIPE.md section 4): a Linear and the routed experts with all three GEMMs
in E4M3 with fine-grained scales.

    forward  y  = x @ W^T     x in 1x128 tiles, W in 128x128 blocks; y in the compute dtype
    dgrad    dx = dy @ W      dy in 1x128 tiles (never 128x128: RECIPE.md App. B.2), W's blocks
    wgrad    dW = dy^T @ x    both in 1x128 tiles along the token dimension (128x1 tiles of dy, x)

The forward saves x already quantised (activation caching in FP8); the weight gradient takes it
back through dequantise -> transpose -> requantise, as DeepSeek-V3 does. Master weights and their
gradients stay FP32. Quantisation runs the Triton kernels on CUDA and the torch reference
elsewhere; the GEMMs run cuBLASLt on Hopper and the exact emulation elsewhere (`gemm.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.moe import RoutedExperts, compute_dtype

from . import quant
from .gemm import gemm


def _quantizers(device: torch.device):
    if device.type == "cuda":
        from . import kernels
        return kernels.quantize_tiles, kernels.quantize_blocks, kernels.quantize_tiles_transposed
    return quant.quantize_tiles, quant.quantize_blocks, lambda x, p=False: quant.quantize_tiles(x.t(), p)


class FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype, power_of_two: bool):
        tiles, blocks, _ = _quantizers(x.device)
        shape, k = x.shape, x.shape[-1]
        x_q, x_s = tiles(x.reshape(-1, k), power_of_two)
        w_q, w_s = blocks(weight, power_of_two)
        y = gemm(x_q, x_s, w_q, w_s, b_blocks=True, out_dtype=out_dtype)[:, :weight.shape[0]]
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.meta = (shape, weight.shape, x.dtype, power_of_two)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        shape, (n, k), x_dtype, power_of_two = ctx.meta
        tiles, _, tiles_t = _quantizers(grad.device)
        grad = grad.reshape(-1, n)
        g_q, g_s = tiles(grad, power_of_two)
        # dx = dy @ W: W's blocks transposed are the 128x128 blocks of W^T
        dx = gemm(g_q, g_s, w_q.t().contiguous(), w_s.t().contiguous(), b_blocks=True, out_dtype=torch.float32)
        # dW = dy^T @ x over tokens: 128x1 tiles of dy and of x (x from its cached FP8 copy)
        x = quant.dequantize_tiles(x_q, x_s, k)
        gt_q, gt_s = tiles_t(grad, power_of_two)
        xt_q, xt_s = tiles_t(x, power_of_two)
        dw = gemm(gt_q, gt_s, xt_q, xt_s, b_blocks=False, out_dtype=torch.float32)[:n, :k]
        return dx[:, :k].to(x_dtype).view(shape), dw, None, None


class FP8Linear(nn.Linear):
    """nn.Linear (same parameters and names) computing its three GEMMs in FP8."""
    power_of_two = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.bias is None, "the model's linears have no bias"
        return FP8LinearFunction.apply(x, self.weight, compute_dtype(x), self.power_of_two)


class FP8RoutedExperts(RoutedExperts):
    """Routed experts with FP8 GEMMs, one expert after another (PyTorch has no blockwise grouped
    GEMM on Hopper; this is the composition measured in benchmarks/RESULTS.md)."""
    power_of_two = False

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        outputs = []
        for e, tokens in enumerate(x.split(counts.tolist())):
            if tokens.shape[0] == 0:
                outputs.append(tokens.new_zeros((0, self.w2.shape[2]), dtype=dtype))
                continue
            gate = FP8LinearFunction.apply(tokens, self.w1[e].t(), dtype, self.power_of_two)
            up = FP8LinearFunction.apply(tokens, self.w3[e].t(), dtype, self.power_of_two)
            outputs.append(FP8LinearFunction.apply(F.silu(gate) * up, self.w2[e].t(), dtype, self.power_of_two))
        return torch.cat(outputs)
