"""What one Linear's forward and backward asks of the host on its CUDA path, FP8 against BF16: the
operators and kernel launches behind the host time `fp8_host.py` measures. Prints one JSON line per
(shape, mode): aten operators called from Python or from our operators (their own inner calls not
counted again), Triton kernel launches, GEMMs (cuBLAS / cuBLASLt calls) and `dsv3::` operators.

    python benchmarks/fp8_ops.py            on an NVIDIA GPU of compute capability 9.0+: the real path
    python benchmarks/fp8_ops.py --smoke    on the CPU, one shape, seconds

Without such a GPU the same code runs on the CPU: our Triton kernels under Triton's interpreter, and
`torch._scaled_mm` (the CPU has no blockwise-scaled GEMM) replaced by an empty result of its shape,
counted as the one operator it is. The counts do not depend on the number of tokens.
"""
import argparse
import collections
import json
import os

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

SHAPES = [(1024, 384), (384, 3072), (2048, 1024), (2048, 3072), (10944, 2048)]  # as fp8_host.py
SMOKE_SHAPES = [(160, 96)]
GEMMS = ("aten::mm", "aten::addmm", "aten::_scaled_mm")


def native() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def cuda_path_on_the_cpu() -> None:
    """Points the FP8 layers at their CUDA path on the CPU (module docstring)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton
    import dsv3.fp8.gemm as gemm
    import dsv3.fp8.kernels as kernels
    import dsv3.fp8.linear as linear
    import dsv3.fp8.quant as quant

    linear._ops = lambda device: quant if torch.compiler.is_compiling() else kernels
    gemm.cublas_supported = lambda t: True

    def scaled_mm(a, b, a_scale, b_scale, out_dtype):
        with record_function("aten::_scaled_mm"):
            return torch.empty((a.shape[0], b.shape[1]), dtype=out_dtype)
    torch._scaled_mm = scaled_mm


def count_launches() -> None:
    """Marks each Triton kernel launch in the profile (and hides what it runs inside)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction as Launcher
    else:
        from triton.runtime.jit import JITFunction as Launcher
    run = Launcher.run

    def marked(self, *args, **kwargs):
        with record_function("triton launch"):
            return run(self, *args, **kwargs)
    Launcher.run = marked


def gemm_calls(events) -> int:
    """cuBLAS(Lt) GEMMs, however deep (a Linear's forward reaches aten::mm through aten::linear)."""
    return sum(1 for event in events if event.name in GEMMS)


def issued(events) -> collections.Counter:
    """Operators and launches with no aten operator or launch above them."""
    counts = collections.Counter()
    for event in events:
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested = parent.name.startswith("aten::") or parent.name == "triton launch"
            parent = parent.cpu_parent
        if not nested and (event.name.startswith(("aten::", "dsv3::")) or event.name == "triton launch"):
            counts[event.name] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="one small shape on the CPU")
    args = parser.parse_args()
    on_gpu = not args.smoke and native()
    if not on_gpu:
        cuda_path_on_the_cpu()
    count_launches()
    from dsv3.fp8.linear import FP8Linear

    device = torch.device("cuda" if on_gpu else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    tokens, shapes = (64, SMOKE_SHAPES) if args.smoke else (16384 if on_gpu else 256, SHAPES)
    for k, n in shapes:
        x = torch.randn(tokens, k, device=device, requires_grad=True)
        dy = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
        for mode in ("bf16", "fp8"):
            layer = nn.Linear(k, n, bias=False, device=device)
            if mode == "fp8":
                layer.__class__ = FP8Linear

            def step():
                layer.weight.grad = x.grad = None
                with autocast:
                    y = layer(x)
                y.backward(dy)
            step()  # Triton compiles, cuBLASLt plans
            with profile(activities=[ProfilerActivity.CPU]) as trace:
                step()
            counts = issued(trace.events())
            print(json.dumps({
                "shape": f"{k}->{n}", "mode": mode, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
                "aten_ops": sum(v for name, v in counts.items() if name.startswith("aten::")),
                "triton_launches": counts["triton launch"], "gemms": gemm_calls(trace.events()),
                "dsv3_ops": sum(v for name, v in counts.items() if name.startswith("dsv3::")),
                "by_name": dict(counts.most_common())}), flush=True)


if __name__ == "__main__":
    main()
