"""Host time of one Linear's forward and backward, FP8 against BF16: what the CPU spends launching a
layer's work, which bounds a step once it exceeds the GPU's time (at `small`, 96 FP8 Linears left
the GPU idle for a quarter of the step: benchmarks/RESULTS.md, "FP8 training steps on an H200").
Prints one JSON line per (shape, mode): microseconds per call with N calls enqueued back to back
(host) and once the GPU has drained them (drained). Where the two are equal the layer is bound by
the host; where drained is larger, by the GPU.

    python benchmarks/fp8_host.py [--tokens 16384] [--calls 20]
    python benchmarks/fp8_host.py --parts [--calls 20]
    python benchmarks/fp8_host.py --smoke [--parts]   (tiny shapes on the CPU, seconds)

Modes: `bf16` (nn.Linear under BF16 autocast), `fp8 eager` (FP8Linear, the Triton quantisation
kernels), `fp8 compiled` (FP8Linear under torch.compile, as in a compiled block: Inductor's fused
quantisation and the FP8 operators). Shapes: `small`'s and V2-Lite's Linears (K -> N). The smoke
run computes in FP32 (no autocast on the CPU) and compiles with aot_eager (Inductor would spend a
minute on the C++ build).

--parts times, in the same way, what a compiled FP8 step calls outside Inductor's own kernels, at
`small`'s widths (16,384 tokens; the experts' 98,304 token copies over 64 experts): the operators
through `torch.ops` as a compiled graph calls them (the experts' forward and backward, a Linear's
weight gradient), the functions inside them (each quantisation, the grouped GEMMs, cuBLASLt), and
BF16's `_grouped_mm` beside them. One JSON line per part.
"""
import argparse
import json
import time
from contextlib import nullcontext

import torch
from torch import nn

from dsv3.fp8.linear import FP8Linear

SHAPES = [(1024, 384), (384, 3072), (2048, 1024), (2048, 3072), (10944, 2048)]  # small's, then V2-Lite's
SMOKE_SHAPES = [(160, 96)]


def per_call_us(step, calls: int, cuda: bool) -> tuple[float, float]:
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host = time.perf_counter() - start
    if cuda:
        torch.cuda.synchronize()
    drained = time.perf_counter() - start
    return host / calls * 1e6, drained / calls * 1e6


def parts(device: torch.device, calls: int, smoke: bool) -> None:
    """Host time of the FP8 path's operators and of the functions they call (module docstring)."""
    from dsv3.fp8 import gemm, grouped
    from dsv3.fp8.groups import Groups
    from dsv3.fp8.linear import _ops

    cuda = device.type == "cuda"
    ops = _ops(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens, dim, inter, experts, rows, n = (16384, 1024, 384, 64, 98304, 384) if not smoke else (256, 256, 128, 4, 512, 128)
    counts = torch.full((experts,), rows // experts, device=device)
    groups = Groups.of(counts, rows)
    x, dy = (torch.randn(rows, dim, device=device, dtype=dtype) for _ in range(2))
    w1, w3 = (torch.randn(experts, dim, inter, device=device) * 0.02 for _ in range(2))
    w2 = torch.randn(experts, inter, dim, device=device) * 0.02
    tok, grad = torch.randn(tokens, dim, device=device, dtype=dtype), torch.randn(tokens, n, device=device, dtype=dtype)
    tok_q, tok_s = ops.quantize_tiles(tok)
    x_q, x_s = ops.quantize_tiles(x)
    w13 = ops.quantize_expert_blocks([w1, w3])
    wgrad_operands = ops.quantize_wgrad_operands(grad, tok_q, False, b_scale=tok_s)
    expert_operands = ops.quantize_wgrad_operands(x_q, dy, False, groups, a_scale=x_s)
    y, *saved = torch.ops.dsv3.fp8_experts_forward.default(x, w1, w3, w2, groups.tensors(), dtype, False)
    w1_bf16, offsets = w1.to(dtype), counts.cumsum(0).to(torch.int32)  # BF16's operands, made before timing
    timed = {
        "torch.cuda.get_device_capability": (lambda: torch.cuda.get_device_capability(device)) if cuda else None,
        "Groups.of (eager; fused by Inductor when compiled)": lambda: Groups.of(counts, rows),
        f"quantize_tiles {tokens}x{dim}": lambda: ops.quantize_tiles(tok),
        f"quantize_wgrad_operands, Linear {dim} -> {n}": lambda: ops.quantize_wgrad_operands(grad, tok_q, False,
                                                                                               b_scale=tok_s),
        "gemm, a Linear's weight gradient": lambda: gemm.gemm(*wgrad_operands, b_blocks=False, operator=False),
        "op dsv3::fp8_linear_wgrad": lambda: torch.ops.dsv3.fp8_linear_wgrad.default(grad, tok_q, tok_s, False),
        "quantize_expert_blocks [W1 | W3]": lambda: ops.quantize_expert_blocks([w1, w3]),
        "grouped_gemm, up": lambda: grouped.grouped_gemm(x_q, x_s, w13[2], w13[3], groups, dtype),
        "quantize_wgrad_operands, experts (x_q, dy)": lambda: ops.quantize_wgrad_operands(x_q, dy, False, groups,
                                                                                           a_scale=x_s),
        "grouped_wgrad": lambda: grouped.grouped_wgrad(*expert_operands, groups, dim, (dim,)),
        "op dsv3::fp8_experts_forward": lambda: torch.ops.dsv3.fp8_experts_forward.default(
            x, w1, w3, w2, groups.tensors(), dtype, False),
        "op dsv3::fp8_experts_backward": lambda: torch.ops.dsv3.fp8_experts_backward.default(
            dy, *saved, groups.tensors(), inter, dtype, False),
        "bf16 _grouped_mm, up": (lambda: torch._grouped_mm(x, w1_bf16, offs=offsets)) if cuda else None,
    }
    for name, fn in timed.items():
        if fn is None:
            continue
        host, drained = per_call_us(fn, calls, cuda)
        print(json.dumps({"part": name, "host_us": round(host, 1), "drained_us": round(drained, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--parts", action="store_true", help="the FP8 path's operators and their parts")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.parts:
        return parts(device, args.calls, args.smoke)
    cuda = device.type == "cuda"
    tokens, shapes = (64, SMOKE_SHAPES) if args.smoke else (args.tokens, SHAPES)
    backend = "inductor" if cuda else "aot_eager"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    for k, n in shapes:
        x = torch.randn(tokens, k, device=device, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
        for mode in ("bf16", "fp8 eager", "fp8 compiled"):
            torch._dynamo.reset()
            layer = nn.Linear(k, n, bias=False, device=device)
            if mode != "bf16":
                layer.__class__ = FP8Linear
            forward = torch.compile(layer, backend=backend) if mode == "fp8 compiled" else layer

            def step():
                layer.weight.grad = x.grad = None
                with autocast:
                    y = forward(x)
                y.backward(dy)

            host, drained = per_call_us(step, args.calls, cuda)
            print(json.dumps({"shape": f"{k}->{n}", "tokens": tokens, "mode": mode, "host_us": round(host, 1),
                              "drained_us": round(drained, 1)}), flush=True)


if __name__ == "__main__":
    main()
