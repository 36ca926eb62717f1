"""The routed experts' three grouped GEMMs in blockwise FP8 against `torch._grouped_mm` in BF16,
one projection at a time, side by side in one process; prints one JSON line per measurement.

For each projection (x (rows, K) -> (rows, N) per expert; `up` is [W1 | W3], `down` is W2):
    fprop  y = x @ W_e                      BF16: _grouped_mm(x, W)        FP8: grouped_gemm
    dgrad  dx = dy @ W_e^T                  BF16: _grouped_mm(dy, W^T)     FP8: grouped_gemm
    wgrad  dW_e = x_e^T @ dy_e (FP32 out)   BF16: _grouped_mm(x^T, dy)     FP8: grouped_wgrad
FP8 GEMMs take pre-quantised operands; the quantisation each needs is timed on its own
(fprop: x in 1x128 tiles and the weights' blocks in both orientations, once per step; dgrad: dy;
wgrad: x^T from x's FP8 copy and dy^T, per expert) and in total. Shapes: DeepSeek-V3's experts
(K=7168 -> N=2x2048, K=2048 -> N=7168; 8 and 32 experts, 32768 rows), V2-Lite's and `small`'s
widths (64 experts, the 98304 token copies of 4 x 4096 tokens at top-6); rows per expert balanced,
balanced but not multiples of 128, and Zipf-skewed (some experts get none).

    python benchmarks/grouped_fp8.py [--iters 20] [--sweep] [--before DIR]

--sweep also times tile/pipelining variants of the FP8 kernels, and the columns per program of the
transposing quantisation, on a few shapes; --before DIR times another checkout's fp8 kernels
(DIR/fp8/kernels.py) on the same operands, its quantisation too where it has the same functions:
the before/after table.
Times are medians of CUDA-event timings after warm-up.

    python benchmarks/grouped_fp8.py --smoke   (tiny shapes on the CPU, seconds)

The smoke run goes through the same functions with the reference quantisation and the exact
emulation (torch._grouped_mm in BF16 needs a Hopper GPU, so those figures are null); with --sweep
under TRITON_INTERPRET=1 it runs two of the variants' Triton kernels in the interpreter.
"""
import argparse
import dataclasses
import importlib
import json
import sys

import torch

from dsv3.fp8 import grouped
from dsv3.fp8.groups import Groups
from dsv3.fp8.linear import _ops
from dsv3.model.moe import grouped_mm_supported
from model_step import median_ms  # benchmarks/ is on sys.path when run as a script

PROJECTIONS = {  # name: (experts, rows, K, N)
    "v3 up, 8 experts": (8, 32768, 7168, 4096),
    "v3 down, 8 experts": (8, 32768, 2048, 7168),
    "v3 up, 32 experts": (32, 32768, 7168, 4096),
    "v3 down, 32 experts": (32, 32768, 2048, 7168),
    "v2-lite up": (64, 98304, 2048, 2816),
    "v2-lite down": (64, 98304, 1408, 2048),
    "small up": (64, 98304, 1024, 768),
    "small down": (64, 98304, 384, 1024),
}
SMOKE_PROJECTIONS = {"smoke up": (4, 300, 256, 256)}
SWEEP_ON = ("v3 up, 8 experts", "v2-lite up", "v2-lite down")


def row_counts(rows: int, experts: int, layout: str, generator: torch.Generator) -> torch.Tensor:
    if layout == "balanced":
        counts = torch.full((experts,), rows // experts, dtype=torch.int64)
    elif layout == "ragged":  # balanced on average, no count a multiple of 128
        counts = torch.full((experts,), rows // experts, dtype=torch.int64)
        counts += torch.randint(-50, 50, (experts,), generator=generator) | 1
    else:  # zipf
        weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.1
        weights = weights[torch.randperm(experts, generator=generator)]
        counts = (weights / weights.sum() * rows).floor().long()
        counts[counts < rows / experts / 20] = 0
    counts[int(counts.argmax())] += rows - counts.sum()
    return counts


def seconds(fn, iters: int, cuda: bool) -> float:
    return median_ms(fn, warmup=min(3, iters), iters=iters, cuda=cuda) / 1e3


def tflops(flop: float, t: float | None):
    return None if t is None else round(flop / t / 1e12, 1 if flop / t > 1e13 else 5)


def bf16_gemms(x, dy, w, offsets):
    """The BF16 baseline's three GEMMs, as RoutedExperts' forward and its autograd run them."""
    return {"fprop": lambda: torch._grouped_mm(x, w, offs=offsets),
            "dgrad": lambda: torch._grouped_mm(dy, w.transpose(1, 2), offs=offsets),
            "wgrad": lambda: torch._grouped_mm(x.t(), dy, offs=offsets)}


def fp8_operands(ops, x, dy, w, groups, n):
    """Every FP8 operand the three GEMMs take, and the quantisations that make them."""
    quantise = {
        "fprop": lambda: (ops.quantize_tiles(x), ops.quantize_expert_blocks([w])),
        "dgrad": lambda: ops.quantize_tiles(dy),
        "wgrad": lambda: wgrad_operands(ops, x_q, x_s, dy, groups),
    }
    x_q, x_s = ops.quantize_tiles(x)
    w_q, w_s, w_qt, w_st = ops.quantize_expert_blocks([w])
    dy_q, dy_s = ops.quantize_tiles(dy)
    x_t, dy_t = wgrad_operands(ops, x_q, x_s, dy, groups)
    return dict(x_q=x_q, x_s=x_s, w_q=w_q, w_s=w_s, w_qt=w_qt, w_st=w_st, dy_q=dy_q, dy_s=dy_s, x_t=x_t,
                dy_t=dy_t), quantise


def wgrad_operands(ops, x_q, x_s, dy, groups):
    """x^T and dy^T in 1x128 tiles per expert, as the experts' backward makes them: in one launch, or
    in two in a checkout without quantize_wgrad_operands."""
    if hasattr(ops, "quantize_wgrad_operands"):
        xt_q, xt_s, dyt_q, dyt_s = ops.quantize_wgrad_operands(x_q, dy, False, groups, a_scale=x_s)
        return (xt_q, xt_s), (dyt_q, dyt_s)
    return ops.quantize_tiles_transposed(x_q, False, groups, x_scale=x_s), ops.quantize_tiles_transposed(dy, False, groups)


def fp8_gemms(o, groups, k, n, kernels=None, config=None):
    """Our grouped FP8 GEMMs on pre-quantised operands; `kernels` is another checkout's module."""
    if kernels is not None and not hasattr(kernels, "GemmConfig"):  # the kernels before TMA
        return {"fprop": lambda: kernels.launch_grouped_gemm(o["x_q"], o["x_s"], o["w_qt"], o["w_st"], groups,
                                                             torch.bfloat16),
                "dgrad": lambda: kernels.launch_grouped_gemm(o["dy_q"], o["dy_s"], o["w_q"], o["w_s"], groups,
                                                             torch.bfloat16),
                "wgrad": lambda: kernels.launch_grouped_wgrad(*o["x_t"], *o["dy_t"], groups)}
    extra = {} if config is None else {"config": config}
    if kernels is None and config is None:
        gemm, wgrad = grouped.grouped_gemm, grouped.grouped_wgrad
    else:
        if kernels is None:
            from dsv3.fp8 import kernels
        gemm, wgrad = kernels.launch_grouped_gemm, kernels.launch_grouped_wgrad
    return {"fprop": lambda: gemm(o["x_q"], o["x_s"], o["w_qt"], o["w_st"], groups, torch.bfloat16, n, **extra),
            "dgrad": lambda: gemm(o["dy_q"], o["dy_s"], o["w_q"], o["w_s"], groups, torch.bfloat16, k, **extra),
            "wgrad": lambda: wgrad(*o["x_t"], *o["dy_t"], groups, k, (n,), **extra)}


def first(result):
    return result[0] if isinstance(result, list) else result


def case(name, shape, layout, device, iters, before, sweep, generator):
    n_experts, rows, k, n = shape
    cuda = device.type == "cuda"
    counts = row_counts(rows, n_experts, layout, generator)
    x = torch.randn(rows, k, generator=generator).to(device, torch.bfloat16)
    dy = torch.randn(rows, n, generator=generator).to(device, torch.bfloat16)
    w = (torch.randn(n_experts, k, n, generator=generator) * 0.02).to(device)  # stored (expert, in, out)
    counts = counts.to(device)
    groups = Groups.of(counts, rows)
    ops = _ops(device)
    o, quantise = fp8_operands(ops, x, dy, w, groups, n)
    ours = fp8_gemms(o, groups, k, n)
    base = bf16_gemms(x, dy, w.bfloat16(), counts.cumsum(0).to(torch.int32)) if grouped_mm_supported(x) else {}
    flop = 2 * rows * k * n
    for gemm in ("fprop", "dgrad", "wgrad"):
        t_fp8, t_quant = seconds(ours[gemm], iters, cuda), seconds(quantise[gemm], iters, cuda)
        t_bf16 = None
        if gemm in base:
            try:
                t_bf16 = seconds(base[gemm], iters, cuda)
            except RuntimeError as error:  # say so, and go on with the FP8 figures
                print(f"# {name} {layout} {gemm}: BF16 _grouped_mm failed: {str(error).splitlines()[0]}", flush=True)
        row = {"case": name, "counts": layout, "gemm": gemm, "experts": n_experts, "rows": rows, "k": k, "n": n,
               "bf16_tflops": tflops(flop, t_bf16), "fp8_tflops": tflops(flop, t_fp8),
               "quant_ms": round(t_quant * 1e3, 3), "fp8_ms": round(t_fp8 * 1e3, 3),
               "bf16_ms": None if t_bf16 is None else round(t_bf16 * 1e3, 3),
               "fp8_vs_bf16": None if t_bf16 is None else round(t_bf16 / t_fp8, 3),
               "fp8_with_quant_vs_bf16": None if t_bf16 is None else round(t_bf16 / (t_fp8 + t_quant), 3)}
        if before is not None:
            old = fp8_gemms(o, groups, k, n, kernels=before)
            t_old = seconds(old[gemm], iters, cuda)
            if hasattr(before, "quantize_tiles_transposed"):  # the other checkout's quantisation kernels
                row["before_quant_ms"] = round(seconds(fp8_operands(before, x, dy, w, groups, n)[1][gemm], iters,
                                                       cuda) * 1e3, 3)
            new_out, old_out = first(ours[gemm]()).float(), first(old[gemm]()).float()
            old_out = old_out[:, :new_out.shape[1]] if gemm != "wgrad" else old_out[:, :k, :n]
            row.update(before_tflops=tflops(flop, t_old), before_vs_bf16=None if t_bf16 is None else round(t_bf16 / t_old, 3),
                       new_vs_before_max_rel=float((new_out - old_out).abs().max() / old_out.abs().max()))
        print(json.dumps(row), flush=True)
    if sweep:
        from dsv3.fp8 import kernels
        configs = list(sweep_configs(kernels))
        for config in configs[:2] if device.type == "cpu" else configs:  # the smoke run: two, interpreted
            variant = fp8_gemms(o, groups, k, n, config=config)
            for gemm in ("fprop", "dgrad", "wgrad"):
                try:
                    t = seconds(variant[gemm], iters, cuda)
                except Exception as error:  # noqa: BLE001 (a variant that does not compile is a result too)
                    t, failure = None, str(error).splitlines()[0][:120]
                else:
                    failure = None
                print(json.dumps({"sweep": name, "counts": layout, "gemm": gemm, **dataclasses.asdict(config),
                                  "fp8_tflops": tflops(flop, t), "failure": failure}), flush=True)
        for cols in (32, 64, 128)[:1 if device.type == "cpu" else 3]:  # the transposing quantisation's programs
            def transposed():
                kernels.quantize_wgrad_operands(o["x_q"], dy, False, groups, a_scale=o["x_s"], cols=cols)
            print(json.dumps({"sweep": name, "counts": layout, "gemm": "wgrad quantisation", "transposed_cols": cols,
                              "ms": round(seconds(transposed, iters, cuda) * 1e3, 3)}), flush=True)


def sweep_configs(kernels):
    base = kernels.GemmConfig()
    yield from (dataclasses.replace(base, **change) for change in (
        {}, {"stages": 3}, {"stages": 5}, {"warps": 4}, {"warps": 4, "stages": 3}, {"group_tiles": 1},
        {"group_tiles": 16}, {"block_n": 64, "stages": 6}, {"block_n": 64, "warps": 4, "stages": 4},
        {"block_n": 64, "warps": 4, "stages": 6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time tile/pipelining variants on a few shapes")
    parser.add_argument("--before", help="another checkout's root: time its fp8/kernels.py on the same operands")
    parser.add_argument("--cases", help="comma-separated names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    projections = SMOKE_PROJECTIONS if args.smoke else PROJECTIONS
    if args.cases:
        projections = {name: projections[name] for name in args.cases.split(",")}
    before = None
    if args.before:
        sys.path.insert(0, args.before)
        before = importlib.import_module("fp8.kernels")
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}",
          flush=True)
    generator = torch.Generator().manual_seed(0)
    for name, shape in projections.items():
        layouts = ("balanced", "ragged", "zipf") if name.startswith("v3") or args.smoke else ("ragged", "zipf")
        for layout in layouts:
            case(name, shape, layout, device, 1 if args.smoke else args.iters, before,
                 args.sweep and (args.smoke or name in SWEEP_ON) and layout == "zipf", generator)


if __name__ == "__main__":
    main()
