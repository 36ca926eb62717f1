"""FP8 against BF16 on one GPU, side by side in one process; prints one JSON line per measurement.

    python benchmarks/fp8_gemm.py

1. GEMM TFLOPS at shapes of `small` and `v3_671b` (8192 tokens): BF16 `x @ W^T`; FP8 blockwise on
   pre-quantised operands (quantisation excluded); FP8 with the activation and weight quantised in
   the timed region (included).
2. FP8Linear forward + backward against nn.Linear in BF16 autocast, same shapes.
3. Routed experts at `small`'s and `v3_671b`'s shapes, rows spread evenly: the whole experts'
   forward + backward, grouped FP8 (all quantisation and the SwiGLU kernels included) against
   `torch._grouped_mm` in BF16 (benchmarks/grouped_fp8.py times each GEMM on its own).
Times are medians of CUDA-event timings after warm-up.

    python benchmarks/fp8_gemm.py --smoke   (tiny shapes on the CPU, seconds)

The smoke run goes through the same functions on the CPU: the torch reference quantisation
(`quant.py`, what `linear.py` uses off the GPU) and the exact GEMM emulation of `gemm.py` and
`grouped.py`, in FP32 compute as the trainer runs on the CPU (no autocast).
"""
import argparse
import json

import torch

from dsv3.fp8.gemm import gemm
from dsv3.fp8.linear import FP8LinearFunction, FP8RoutedExperts, _ops
from dsv3.model.moe import RoutedExperts
from model_step import autocast, median_ms  # benchmarks/ is on sys.path when run as a script



def timed(fn, repeat: int, device: torch.device) -> float:
    """Median seconds of fn() after warm-up, CUDA-event timed on a GPU (benchmarks/model_step.py's timer)."""
    return median_ms(fn, warmup=min(3, repeat), iters=repeat, cuda=device.type == "cuda") / 1e3


def tflops(flop: float, seconds: float | None) -> float | None:
    if seconds is None:
        return None
    value = flop / seconds / 1e12
    return round(value) if value >= 10 else round(value, 4)  # whole TFLOPS on a GPU; the CPU's are tiny


SHAPES = {  # name: (tokens, in, out)
    "small attn w_q (1024->16x192)": (8192, 1024, 3072),
    "small dense w1 (1024->2816)": (8192, 1024, 2816),
    "small dense w2 (2816->1024)": (8192, 2816, 1024),
    "v3 dense w1 (7168->18432)": (8192, 7168, 18432),
    "v3 dense w2 (18432->7168)": (8192, 18432, 7168),
    "v3 attn w_o (16384->7168)": (8192, 16384, 7168),
    "v3 expert w1 (7168->2048)": (8192, 7168, 2048),
}


EXPERT_CASES = {  # name: (experts, rows per expert, dim, inter)
    "small routed experts": (64, 768, 1024, 384),  # 8192 tokens x top-6 over 64 experts
    "v3 routed experts, 8 per GPU": (8, 8192, 7168, 2048),
}
SMOKE_SHAPES = {"smoke dense (256->384)": (256, 256, 384)}
SMOKE_EXPERT_CASES = {"smoke routed experts": (4, 64, 256, 128)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="dense,experts", help="comma-separated: dense (1 and 2), experts (3)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = parser.parse_args()
    parts = args.parts.split(",")
    torch.manual_seed(0)
    if args.smoke:
        print(f"# smoke: CPU, torch {torch.__version__}: reference quantisation, emulated FP8 GEMMs", flush=True)
        device, shapes, expert_cases, repeat = torch.device("cpu"), SMOKE_SHAPES, SMOKE_EXPERT_CASES, 2
    else:
        device, shapes, expert_cases, repeat = torch.device("cuda"), SHAPES, EXPERT_CASES, 20
    if "dense" in parts:
        dense_cases(device, shapes, repeat)
    if "experts" in parts:
        for case in expert_cases.items():
            experts_case(*case, device, repeat)


def dense_cases(device: torch.device, shapes: dict, repeat: int) -> None:
    ops = _ops(device)  # the Triton kernels on CUDA, the torch reference elsewhere
    repeat_linear = max(repeat // 2, 1)
    for name, (m, k, n) in shapes.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device) * 0.02
        w16 = w.bfloat16()
        x_q, x_s = ops.quantize_tiles(x)
        w_q, w_s = ops.quantize_weight(w)[:2]
        flop = 2 * m * n * k
        bf16 = timed(lambda: x @ w16.t(), repeat, device)
        fp8 = timed(lambda: gemm(x_q, x_s, w_q, w_s, True, torch.bfloat16), repeat, device)

        def fp8_with_quantisation():
            a = ops.quantize_tiles(x)
            b = ops.quantize_weight(w)[:2]  # as the Linear's forward: W's blocks and W^T's
            return gemm(*a, *b, True, torch.bfloat16)
        fp8_q = timed(fp8_with_quantisation, repeat, device)

        xr = x.float().requires_grad_()
        wr = w.clone().requires_grad_()
        dy = torch.randn(m, n, device=device, dtype=torch.bfloat16)

        def linear_bf16():
            with autocast(device):
                y = xr @ wr.t()
            y.backward(dy)

        def linear_fp8():
            y = FP8LinearFunction.apply(xr, wr, torch.bfloat16, False)
            y.backward(dy)
        lin_bf16, lin_fp8 = timed(linear_bf16, repeat_linear, device), timed(linear_fp8, repeat_linear, device)
        print(json.dumps({"shape": name, "m": m, "k": k, "n": n,
                          "bf16_tflops": tflops(flop, bf16), "fp8_tflops": tflops(flop, fp8),
                          "fp8_with_quant_tflops": tflops(flop, fp8_q),
                          "fp8_vs_bf16": round(bf16 / fp8, 2), "fp8_with_quant_vs_bf16": round(bf16 / fp8_q, 2),
                          "linear_fwd_bwd_bf16_ms": round(lin_bf16 * 1e3, 2),
                          "linear_fwd_bwd_fp8_ms": round(lin_fp8 * 1e3, 2)}), flush=True)


def experts_case(name: str, shape: tuple[int, int, int, int], device: torch.device, repeat: int) -> None:
    """The whole routed experts' forward + backward: grouped FP8 (every quantisation and the SwiGLU
    kernels included) against RoutedExperts' own BF16 path (torch._grouped_mm on Hopper, its loop
    over experts elsewhere). benchmarks/grouped_fp8.py times the GEMMs one by one."""
    n_experts, per_expert, dim, inter = shape
    rows = n_experts * per_expert
    counts = torch.full((n_experts,), per_expert, device=device)
    x = torch.randn(rows, dim, device=device, dtype=torch.bfloat16)
    module_bf16 = RoutedExperts(n_experts, dim, inter, 0.006).to(device)
    module_bf16.reset_parameters(seed=0)
    module_fp8 = RoutedExperts(n_experts, dim, inter, 0.006).to(device)
    module_fp8.load_state_dict(module_bf16.state_dict())
    module_fp8.__class__ = FP8RoutedExperts
    xr = x.float().requires_grad_()
    dy = torch.randn(rows, dim, device=device, dtype=torch.bfloat16)

    def run(module):
        def step():
            with autocast(device):
                out = module(xr, counts)
            out.backward(dy)
        return step
    repeat_module = max(repeat // 2, 1)
    flop = 3 * 2 * rows * dim * inter * 3  # three GEMMs, forward + two backward each
    t_bf16, t_fp8 = timed(run(module_bf16), repeat_module, device), timed(run(module_fp8), repeat_module, device)
    print(json.dumps({"experts": name, "n_experts": n_experts, "rows": rows, "dim": dim, "inter": inter,
                      "fwd_bwd_bf16_ms": round(t_bf16 * 1e3, 2), "fwd_bwd_fp8_ms": round(t_fp8 * 1e3, 2),
                      "fwd_bwd_bf16_tflops": tflops(flop, t_bf16),
                      "fwd_bwd_fp8_tflops": tflops(flop, t_fp8)}), flush=True)


if __name__ == "__main__":
    main()
