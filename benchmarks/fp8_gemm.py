"""FP8 against BF16 on one GPU, side by side in one process; prints one JSON line per measurement.

    python benchmarks/fp8_gemm.py

1. GEMM TFLOPS at shapes of `small` and `v3_671b` (8192 tokens): BF16 `x @ W^T`; FP8 blockwise on
   pre-quantised operands (quantisation excluded); FP8 with the activation and weight quantised in
   the timed region (included).
2. FP8Linear forward + backward against nn.Linear in BF16 autocast, same shapes.
3. Routed experts of `small` (64 experts, 8192 tokens x top-6 spread evenly): our FP8 experts
   (one blockwise GEMM per expert) against `torch._grouped_mm` in BF16, forward + backward.
Times are medians of CUDA-event timings after warm-up.
"""
import json

import torch

from dsv3.fp8 import kernels
from dsv3.fp8.gemm import gemm
from dsv3.fp8.linear import FP8LinearFunction, FP8RoutedExperts
from dsv3.model.moe import RoutedExperts
from model_step import cuda_time  # benchmarks/ is on sys.path when run as a script


def timed(fn, repeat=20) -> float:
    """Median seconds of fn(), CUDA-event timed (benchmarks/model_step.py's timer)."""
    return cuda_time(fn, iters=repeat) / 1e3


SHAPES = {  # name: (tokens, in, out)
    "small attn w_q (1024->16x192)": (8192, 1024, 3072),
    "small dense w1 (1024->2816)": (8192, 1024, 2816),
    "small dense w2 (2816->1024)": (8192, 2816, 1024),
    "v3 dense w1 (7168->18432)": (8192, 7168, 18432),
    "v3 dense w2 (18432->7168)": (8192, 18432, 7168),
    "v3 attn w_o (16384->7168)": (8192, 16384, 7168),
    "v3 expert w1 (7168->2048)": (8192, 7168, 2048),
}


def main() -> None:
    torch.manual_seed(0)
    for name, (m, k, n) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda") * 0.02
        w16 = w.bfloat16()
        x_q, x_s = kernels.quantize_tiles(x)
        w_q, w_s = kernels.quantize_blocks(w)
        flop = 2 * m * n * k
        bf16 = timed(lambda: x @ w16.t())
        fp8 = timed(lambda: gemm(x_q, x_s, w_q, w_s, True, torch.bfloat16))

        def fp8_with_quantisation():
            a = kernels.quantize_tiles(x)
            b = kernels.quantize_blocks(w)
            return gemm(*a, *b, True, torch.bfloat16)
        fp8_q = timed(fp8_with_quantisation)

        xr = x.float().requires_grad_()
        wr = w.clone().requires_grad_()
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

        def linear_bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = xr @ wr.t()
            y.backward(dy)

        def linear_fp8():
            y = FP8LinearFunction.apply(xr, wr, torch.bfloat16, False)
            y.backward(dy)
        lin_bf16, lin_fp8 = timed(linear_bf16, 10), timed(linear_fp8, 10)
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n,
                          "bf16_tflops": round(flop / bf16 / 1e12), "fp8_tflops": round(flop / fp8 / 1e12),
                          "fp8_with_quant_tflops": round(flop / fp8_q / 1e12),
                          "fp8_vs_bf16": round(bf16 / fp8, 2), "fp8_with_quant_vs_bf16": round(bf16 / fp8_q, 2),
                          "linear_fwd_bwd_bf16_ms": round(lin_bf16 * 1e3, 2),
                          "linear_fwd_bwd_fp8_ms": round(lin_fp8 * 1e3, 2)}), flush=True)

    experts, tokens, dim, inter = 64, 8192 * 6, 1024, 384
    bf16_experts = RoutedExperts(experts, dim, inter, 0.006).cuda()
    bf16_experts.reset_parameters(seed=0)
    fp8_experts = RoutedExperts(experts, dim, inter, 0.006).cuda()
    fp8_experts.load_state_dict(bf16_experts.state_dict())
    fp8_experts.__class__ = FP8RoutedExperts
    counts = torch.full((experts,), tokens // experts, device="cuda")
    x = torch.randn(tokens, dim, device="cuda", requires_grad=True)

    def run(module):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(x, counts)
            out.float().square().mean().backward()
        return step
    flop = 3 * 2 * tokens * dim * inter * 3  # three GEMMs, forward + two backward
    t_bf16, t_fp8 = timed(run(bf16_experts), 10), timed(run(fp8_experts), 10)
    print(json.dumps({"experts": experts, "rows": tokens, "dim": dim, "inter": inter,
                      "grouped_bf16_ms": round(t_bf16 * 1e3, 2), "fp8_per_expert_ms": round(t_fp8 * 1e3, 2),
                      "grouped_bf16_tflops": round(flop / t_bf16 / 1e12), "fp8_tflops": round(flop / t_fp8 / 1e12)}),
          flush=True)


if __name__ == "__main__":
    main()
