"""The routed experts' SwiGLU through torch._grouped_mm, forward + backward, for two memory layouts
of the BF16 weight copy the forward makes from the FP32 masters (stored (expert, in, out)):

- `out-major`: w.to(bf16), the same layout as the master: the reduction dim K is strided.
- `K-major`: the copy written transposed, so each expert's (in, out) matrix has K contiguous, the
  layout torchtitan's (expert, out, in) storage hands to the same kernel.

Shapes: the token copies of 4 x 4096 tokens at top-6, the expert widths of `small` and of V2-Lite,
row counts balanced and skewed (Zipf-like, some experts with none). Timed with CUDA events, the
cast included, median of --iters after warm-up; prints one table and, with $OUT set, JSON.

    python benchmarks/expert_gemm.py [--iters 20]
    python benchmarks/expert_gemm.py --smoke   (tiny shapes on the CPU, seconds: checks both layouts agree)
"""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from model_step import median_ms  # benchmarks/ is on sys.path when run as a script

SHAPES = {"small": (1024, 384), "v2_lite": (2048, 1408)}  # (dim, moe_inter_dim)


def bf16_copy(w: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "K-major":
        return w.transpose(1, 2).to(torch.bfloat16).contiguous().transpose(1, 2)
    return w.to(torch.bfloat16)


def swiglu_experts(x, w1, w3, w2, offsets, layout):
    b1, b3, b2 = (bf16_copy(w, layout) for w in (w1, w3, w2))
    h = F.silu(torch._grouped_mm(x, b1, offs=offsets)) * torch._grouped_mm(x, b3, offs=offsets)
    return torch._grouped_mm(h, b2, offs=offsets)


def row_counts(rows: int, experts: int, skewed: bool, generator: torch.Generator) -> torch.Tensor:
    if not skewed:
        return torch.full((experts,), rows // experts, dtype=torch.int64)
    weights = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.1
    weights = weights[torch.randperm(experts, generator=generator)]
    counts = (weights / weights.sum() * rows).floor().long()
    counts[counts < rows / experts / 20] = 0  # some experts receive nothing
    counts[0] += rows - counts.sum()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    tokens, k, experts = (64, 2, 4) if args.smoke else (4 * 4096, 6, 64)
    shapes = {"tiny": (32, 16)} if args.smoke else SHAPES
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, (dim, inter) in shapes.items():
        masters = [torch.randn(experts, a, b, generator=generator).mul_(0.02).to(device).requires_grad_()
                   for a, b in ((dim, inter), (dim, inter), (inter, dim))]
        for skewed in (False, True):
            counts = row_counts(tokens * k, experts, skewed, generator)
            offsets = counts.cumsum(0).to(torch.int32).to(device)
            x = torch.randn(tokens * k, dim, generator=generator).to(device, torch.bfloat16).requires_grad_()
            grad = torch.randn(tokens * k, dim, generator=generator).to(device, torch.bfloat16)
            outputs = {}
            for layout in ("out-major", "K-major"):
                def step():
                    swiglu_experts(x, *masters, offsets, layout).backward(grad)
                outputs[layout] = swiglu_experts(x, *masters, offsets, layout).float()
                ms = median_ms(step, warmup=3, iters=args.iters, cuda=device.type == "cuda")
                flop = 3 * 2 * 3 * tokens * k * dim * inter  # three GEMMs, forward + two backward products each
                rows.append({"shape": name, "counts": "skewed" if skewed else "balanced", "layout": layout,
                             "ms": ms, "tflops": flop / ms / 1e9})
            difference = (outputs["K-major"] - outputs["out-major"]).abs().max().item()
            assert difference <= 1e-2 * outputs["out-major"].abs().max().item(), difference
    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}, "
          f"{tokens} tokens x top-{k}, {experts} experts, median of {args.iters}")
    print(f"| {'shape':<8} | {'counts':<8} | {'layout':<9} | {'fwd+bwd ms':>10} | {'TFLOPS':>7} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 12}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['shape']:<8} | {r['counts']:<8} | {r['layout']:<9} | {r['ms']:10.3f} | {r['tflops']:7.1f} |")
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "expert_gemm.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
