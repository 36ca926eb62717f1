"""FP8 against BF16 on one GPU, side by side in one process; prints one JSON line per measurement.

    python benchmarks/fp8_gemm.py

1. GEMM TFLOPS at shapes of `small` and `v3_671b` (8192 tokens): BF16 `x @ W^T`; FP8 blockwise on
   pre-quantised operands (quantisation excluded); FP8 with the activation and weight quantised in
   the timed region (included).
2. FP8Linear forward + backward against nn.Linear in BF16 autocast, same shapes.
3. Routed experts at `small`'s and `v3_671b`'s shapes, rows spread evenly: our grouped FP8 GEMM
   (Triton) against `torch._grouped_mm` in BF16, the up-projection alone on pre-quantised operands,
   and the whole experts' forward + backward (FP8: all quantisation and the SwiGLU kernels included).
Times are medians of CUDA-event timings after warm-up.
"""
import argparse
import json

import torch

from dsv3.fp8 import kernels
from dsv3.fp8.gemm import gemm
from dsv3.fp8.grouped import Groups, grouped_gemm
from dsv3.fp8.linear import FP8LinearFunction, FP8RoutedExperts, quantize_expert_weights
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="dense,experts", help="comma-separated: dense (1 and 2), experts (3)")
    parts = parser.parse_args().parts.split(",")
    torch.manual_seed(0)
    if "dense" in parts:
        dense_cases()
    if "experts" in parts:
        for case in EXPERT_CASES.items():
            experts_case(*case)


def dense_cases() -> None:
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



EXPERT_CASES = {  # name: (experts, rows per expert, dim, inter)
    "small routed experts": (64, 768, 1024, 384),  # 8192 tokens x top-6 over 64 experts
    "v3 routed experts, 8 per GPU": (8, 8192, 7168, 2048),
}


def experts_case(name: str, shape: tuple[int, int, int, int]) -> None:
    """The grouped up-projection GEMM alone (x @ [W1 | W3], pre-quantised) and the whole experts'
    forward + backward: our grouped FP8 against torch._grouped_mm in BF16."""
    n_experts, per_expert, dim, inter = shape
    rows = n_experts * per_expert
    counts = torch.full((n_experts,), per_expert, device="cuda")
    offsets = counts.cumsum(0).to(torch.int32)
    x = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)
    w13 = torch.randn(n_experts, dim, 2 * inter, device="cuda") * 0.02
    w13_16 = w13.bfloat16()
    x_q, x_s = kernels.quantize_tiles(x)
    w_q, w_s = quantize_expert_weights(kernels, w13, False)
    b_q, b_s = w_q.transpose(1, 2).contiguous(), w_s.transpose(1, 2).contiguous()
    groups = Groups.of(counts, rows)
    gemm_bf16 = timed(lambda: torch._grouped_mm(x, w13_16, offs=offsets))
    gemm_fp8 = timed(lambda: grouped_gemm(x_q, x_s, b_q, b_s, groups, torch.bfloat16))
    gemm_flop = 2 * rows * dim * 2 * inter

    module_bf16 = RoutedExperts(n_experts, dim, inter, 0.006).cuda()
    module_bf16.reset_parameters(seed=0)
    module_fp8 = RoutedExperts(n_experts, dim, inter, 0.006).cuda()
    module_fp8.load_state_dict(module_bf16.state_dict())
    module_fp8.__class__ = FP8RoutedExperts
    xr = x.float().requires_grad_()
    dy = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16)

    def run(module):
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = module(xr, counts)
            out.backward(dy)
        return step
    flop = 3 * 2 * rows * dim * inter * 3  # three GEMMs, forward + two backward each
    t_bf16, t_fp8 = timed(run(module_bf16), 10), timed(run(module_fp8), 10)
    print(json.dumps({"experts": name, "n_experts": n_experts, "rows": rows, "dim": dim, "inter": inter,
                      "up_gemm_bf16_tflops": round(gemm_flop / gemm_bf16 / 1e12),
                      "up_gemm_fp8_tflops": round(gemm_flop / gemm_fp8 / 1e12),
                      "fwd_bwd_bf16_ms": round(t_bf16 * 1e3, 2), "fwd_bwd_fp8_ms": round(t_fp8 * 1e3, 2),
                      "fwd_bwd_bf16_tflops": round(flop / t_bf16 / 1e12),
                      "fwd_bwd_fp8_tflops": round(flop / t_fp8 / 1e12)}), flush=True)

if __name__ == "__main__":
    main()
