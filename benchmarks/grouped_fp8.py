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

Then the experts' whole backward quantisation (dy, the SwiGLU backward and its d[gate | up], the
128x1 tiles of h, dy, x and d[gate | up]; ragged counts) and an FP8 Linear's weight-gradient
quantisation at `small`'s projections, each with the bytes it moves and its bandwidth.

--sweep also times tile/pipelining variants of the FP8 kernels on a few shapes, and the programs of
the quantisation kernels (columns and warps of the transposing one, rows and warps of the 1x128
one) on the backward quantisation's shapes; --before DIR times another checkout's fp8 kernels
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
import re
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
SWEEP_ON = ("v3 up, 8 experts", "v2-lite up", "v2-lite down", "small up", "small down")
EXPERTS = {  # the experts' whole backward quantisation: (experts, rows, dim, inter)
    "v3, 8 experts": (8, 32768, 7168, 2048),
    "v2-lite": (64, 98304, 2048, 1408),
    "small": (64, 98304, 1024, 384),
}
SMOKE_EXPERTS = {"smoke": (4, 300, 256, 128)}
LINEARS = {  # an FP8 Linear's weight-gradient quantisation: (tokens, out, in) of `small`'s projections, 4 x 4096
    "small wq_a": (16384, 384, 1024),
    "small wq_b": (16384, 3072, 384),
    "small wkv_b": (16384, 4096, 256),
    "small wo": (16384, 1024, 2048),
}
SMOKE_LINEARS = {"smoke linear": (300, 200, 160)}
# programs of the two quantisation kernels, the defaults first (benchmarks/RESULTS.md, "FP8's
# quantisation by reciprocal and its programs, ..."). One warp holding 16 rows x 8 columns per thread
# transposes in registers (no shared-memory round trip, per the PTX Triton emits)
TRANSPOSED_VARIANTS = ({"cols": 64, "warps": 2}, {"cols": 32, "warps": 4}, {"cols": 32, "warps": 1},
                       {"cols": 16, "warps": 1}, {"cols": 32, "warps": 2}, {"cols": 64, "warps": 4},
                       {"cols": 128, "warps": 8})
TILES_VARIANTS = ({"rows_per_program": 64, "warps": 4}, {"rows_per_program": 16, "warps": 4},
                  {"rows_per_program": 32, "warps": 4}, {"rows_per_program": 16, "warps": 1},
                  {"rows_per_program": 32, "warps": 2})


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


def fp8_gemms(o, groups, k, n, kernels=None, gemm_config=None, wgrad_config=None):
    """Our grouped FP8 GEMMs on pre-quantised operands; `kernels` is another checkout's module, the
    configs (GemmConfig for Fprop and Dgrad, WgradConfig) a sweep's variant."""
    if kernels is not None and not hasattr(kernels, "GemmConfig"):  # the kernels before TMA
        return {"fprop": lambda: kernels.launch_grouped_gemm(o["x_q"], o["x_s"], o["w_qt"], o["w_st"], groups,
                                                             torch.bfloat16),
                "dgrad": lambda: kernels.launch_grouped_gemm(o["dy_q"], o["dy_s"], o["w_q"], o["w_s"], groups,
                                                             torch.bfloat16),
                "wgrad": lambda: kernels.launch_grouped_wgrad(*o["x_t"], *o["dy_t"], groups)}
    gemm_extra = {} if gemm_config is None else {"config": gemm_config}
    wgrad_extra = {} if wgrad_config is None else {"config": wgrad_config}
    if kernels is None and gemm_config is None and wgrad_config is None:
        gemm, wgrad = grouped.grouped_gemm, grouped.grouped_wgrad
    else:
        if kernels is None:
            from dsv3.fp8 import kernels
        gemm, wgrad = kernels.launch_grouped_gemm, kernels.launch_grouped_wgrad
    return {"fprop": lambda: gemm(o["x_q"], o["x_s"], o["w_qt"], o["w_st"], groups, torch.bfloat16, n, **gemm_extra),
            "dgrad": lambda: gemm(o["dy_q"], o["dy_s"], o["w_q"], o["w_s"], groups, torch.bfloat16, k, **gemm_extra),
            "wgrad": lambda: wgrad(*o["x_t"], *o["dy_t"], groups, k, (n,), **wgrad_extra)}


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
        for gemm, configs in sweep_configs(kernels).items():
            for config in configs[:2] if device.type == "cpu" else configs:  # the smoke run: two, interpreted
                key = "wgrad_config" if gemm == "wgrad" else "gemm_config"
                variant = fp8_gemms(o, groups, k, n, **{key: config})[gemm]
                try:
                    t = seconds(variant, iters, cuda)
                except Exception as error:  # noqa: BLE001 (a variant that does not compile is a result too)
                    t, failure, differs = None, str(error).splitlines()[0][:120], None
                else:
                    failure = None
                    got, want = first(variant()).float(), first(ours[gemm]()).float()
                    differs = float((got - want).abs().max() / want.abs().max())  # a variant must not change results
                print(json.dumps({"sweep": name, "counts": layout, "gemm": gemm, **dataclasses.asdict(config),
                                  "fp8_tflops": tflops(flop, t), "max_rel_vs_default": differs, "failure": failure}),
                      flush=True)


def experts_backward_quantisation(ops, o, groups, transposed=None, tiles=None):
    """Every quantisation of the experts' backward as its operator runs them (fp8/linear.py): dy's
    and d[gate | up]'s 1x128 tiles, the SwiGLU backward, and the weight gradients' 128x1 tiles of h
    and dy, and of x (from its FP8 copy) and d[gate | up]. `transposed` and `tiles` are keyword
    arguments for the two quantisation kernels (the sweep's variants)."""
    transposed, tiles = transposed or {}, tiles or {}
    ops.quantize_tiles(o["dy"], False, **tiles)
    h, dgu = ops.swiglu_backward(o["gu_q"], o["gu_s"], o["dh"], o["dy"].dtype)
    ops.quantize_tiles(dgu, False, **tiles)
    ops.quantize_wgrad_operands(h, o["dy"], False, groups, **transposed)
    ops.quantize_wgrad_operands(o["x_q"], dgu, False, groups, a_scale=o["x_s"], **transposed)


def experts_case(name, shape, device, iters, before, sweep, generator):
    """The experts' backward quantisation (ragged counts) now and, with --before, in the other
    checkout; with the bytes it moves (scales not counted) and its bandwidth."""
    n_experts, rows, dim, inter = shape
    cuda = device.type == "cuda"
    groups = Groups.of(row_counts(rows, n_experts, "ragged", generator).to(device), rows)
    x_q, x_s = _ops(device).quantize_tiles(torch.randn(rows, dim, generator=generator).to(device))
    gu_q, gu_s = _ops(device).quantize_tiles(torch.randn(rows, 2 * inter, generator=generator).to(device))
    o = dict(x_q=x_q, x_s=x_s, gu_q=gu_q, gu_s=gu_s,
             dy=torch.randn(rows, dim, generator=generator).to(device, torch.bfloat16),
             dh=torch.randn(rows, inter, generator=generator).to(device, torch.bfloat16))
    rows_pad = 128 * groups.n_tiles
    read = (rows * dim * 2 + rows * 2 * inter * 2  # dy, d[gate | up] for their 1x128 tiles
            + rows * 2 * inter + rows * inter * 2  # the SwiGLU backward: the FP8 cache and dh
            + rows * inter * 2 + rows * dim * 2 + rows * dim + rows * 2 * inter * 2)  # h, dy, x_q, d[gate | up]
    written = (rows * dim + rows * 2 * inter  # dy's and d[gate | up]'s 1x128 tiles
               + rows * inter * 2 + rows * 2 * inter * 2  # h and d[gate | up] in BF16
               + rows_pad * (inter + dim + dim + 2 * inter))  # the four 128x1 tilings
    t = seconds(lambda: experts_backward_quantisation(_ops(device), o, groups), iters, cuda)
    row = {"experts_backward_quantisation": name, "experts": n_experts, "rows": rows, "dim": dim, "inter": inter,
           "ms": round(t * 1e3, 3), "gb": round((read + written) / 1e9, 6),
           "tb_per_s": round((read + written) / t / 1e12, 2)}
    if before is not None:
        row["before_ms"] = round(seconds(lambda: experts_backward_quantisation(before, o, groups), iters, cuda) * 1e3,
                                 3)
    print(json.dumps(row), flush=True)
    if sweep:
        from dsv3.fp8 import kernels
        cpu = device.type == "cpu"
        for variant in TRANSPOSED_VARIANTS[:1 if cpu else None]:
            t = seconds(lambda: kernels.quantize_wgrad_operands(o["x_q"], o["dy"], False, groups, a_scale=o["x_s"],
                                                                **variant), iters, cuda)
            moved = rows * dim * 3 + rows_pad * dim * 2
            print(json.dumps({"sweep": name, "kernel": "quantize_wgrad_operands(x_q, dy)", **variant,
                              "ms": round(t * 1e3, 3), "tb_per_s": round(moved / t / 1e12, 2)}), flush=True)
        for variant in TILES_VARIANTS[:1 if cpu else None]:
            t = seconds(lambda: kernels.quantize_tiles(o["dy"], False, **variant), iters, cuda)
            print(json.dumps({"sweep": name, "kernel": "quantize_tiles(dy)", **variant, "ms": round(t * 1e3, 3),
                              "tb_per_s": round(rows * dim * 3 / t / 1e12, 2)}), flush=True)


def linear_case(name, shape, device, iters, before, sweep, generator):
    """An FP8 Linear's weight-gradient quantisation: the output gradient's and the cached FP8 input's
    128x1 tiles, now and, with --before, in the other checkout."""
    tokens, n, k = shape
    cuda = device.type == "cuda"
    grad = torch.randn(tokens, n, generator=generator).to(device, torch.bfloat16)
    x_q, x_s = _ops(device).quantize_tiles(torch.randn(tokens, k, generator=generator).to(device))
    moved = tokens * (2 * n + k) + 128 * -(-tokens // 128) * (n + k)

    def quantise(ops, **variant):
        return lambda: ops.quantize_wgrad_operands(grad, x_q, False, b_scale=x_s, **variant)
    t = seconds(quantise(_ops(device)), iters, cuda)
    row = {"linear_wgrad_quantisation": name, "tokens": tokens, "n": n, "k": k, "ms": round(t * 1e3, 3),
           "gb": round(moved / 1e9, 6), "tb_per_s": round(moved / t / 1e12, 2)}
    if before is not None:
        row["before_ms"] = round(seconds(quantise(before), iters, cuda) * 1e3, 3)
    print(json.dumps(row), flush=True)
    if sweep:
        from dsv3.fp8 import kernels
        for variant in TRANSPOSED_VARIANTS[:1 if device.type == "cpu" else None]:
            t = seconds(quantise(kernels, **variant), iters, cuda)
            print(json.dumps({"sweep": name, "kernel": "quantize_wgrad_operands(grad, x_q)", **variant,
                              "ms": round(t * 1e3, 3), "tb_per_s": round(moved / t / 1e12, 2)}), flush=True)


def sweep_configs(kernels) -> dict:
    """Each GEMM's variants, its default first. Wgrad's smaller blocks with one warpgroup fit two or
    three programs per SM (`WgradConfig`), and so do Fprop's and Dgrad's with block_n 64."""
    gemm, wgrad = kernels.GemmConfig(), kernels.WgradConfig()
    gemms = [dataclasses.replace(gemm, **change) for change in (
        {}, {"stages": 3}, {"stages": 5}, {"warps": 4}, {"warps": 4, "stages": 3}, {"group_tiles": 1},
        {"group_tiles": 16}, {"block_n": 64, "stages": 6}, {"block_n": 64, "warps": 4, "stages": 3},
        {"block_n": 64, "warps": 4, "stages": 4}, {"block_n": 64, "warps": 4, "stages": 6})]
    wgrads = [dataclasses.replace(wgrad, **change) for change in (
        {}, {"block_n": 64, "warps": 4, "stages": 3}, {"block_k": 64, "warps": 4, "stages": 3},
        {"block_n": 64, "block_k": 64, "warps": 4, "stages": 3}, {"block_n": 64, "block_k": 64, "warps": 4, "stages": 4},
        {"block_n": 64, "warps": 4, "stages": 2}, {"stages": 3}, {"programs_per_sm": 1},
        {"programs_per_sm": 1, "stages": 3}, {"block_n": 64, "warps": 4, "stages": 3, "programs_per_sm": 2})]
    return {"fprop": gemms, "dgrad": gemms, "wgrad": wgrads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time tile/pipelining variants on a few shapes")
    parser.add_argument("--before", help="another checkout's root: time its fp8/kernels.py on the same operands")
    parser.add_argument("--cases", help="names separated by commas without a space after them, as in "
                        "'v3 up, 8 experts,v2-lite up' (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    projections = SMOKE_PROJECTIONS if args.smoke else PROJECTIONS
    experts, linears = (SMOKE_EXPERTS, SMOKE_LINEARS) if args.smoke else (EXPERTS, LINEARS)
    if args.cases:
        names = re.split(r",(?! )", args.cases)  # "v3 up, 8 experts" keeps its comma
        unknown = set(names) - set(projections) - set(experts) - set(linears)
        if unknown:
            parser.error(f"--cases: no case named {', '.join(sorted(unknown))}")
        projections, experts, linears = ({n: s for n, s in cases.items() if n in names}
                                         for cases in (projections, experts, linears))
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
    for name, shape in experts.items():
        experts_case(name, shape, device, 1 if args.smoke else args.iters, before, args.sweep, generator)
    for name, shape in linears.items():
        linear_case(name, shape, device, 1 if args.smoke else args.iters, before, args.sweep, generator)


if __name__ == "__main__":
    main()
