"""Host time of one Linear's forward and backward, FP8 against BF16: what the CPU spends launching a
layer's work, which bounds a step once it exceeds the GPU's time (at `small`, 96 FP8 Linears left
the GPU idle for a quarter of the step: benchmarks/RESULTS.md, "FP8 training steps on an H200").
Prints one JSON line per (shape, mode): microseconds per call with N calls enqueued back to back
(host) and once the GPU has drained them (drained). Where the two are equal the layer is bound by
the host; where drained is larger, by the GPU.

    python benchmarks/fp8_host.py [--tokens 16384] [--calls 20]
    python benchmarks/fp8_host.py --smoke   (tiny shapes on the CPU, seconds)

Modes: `bf16` (nn.Linear under BF16 autocast), `fp8 eager` (FP8Linear, the Triton quantisation
kernels), `fp8 compiled` (FP8Linear under torch.compile, as in a compiled block: Inductor's fused
quantisation and the FP8 operators). Shapes: `small`'s and V2-Lite's Linears (K -> N). The smoke
run computes in FP32 (no autocast on the CPU) and compiles with aot_eager (Inductor would spend a
minute on the C++ build).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
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
