"""One GPU, three measurements of the BF16 model, printed as one table:

1. MLA's attention core (q/k 192, v 128), forward + backward, through SDPA as `causal_attention`
   calls it, through each fused backend pinned, and with v zero-padded to 192 so flash accepts it.
2. The routed experts of `small` through torch._grouped_mm vs a loop over experts, fwd + bwd.
3. A full training step of a recipe (default `small`): tokens/s, model TFLOPS, MFU, peak memory.

Usage: python benchmarks/model_step.py [--model small] [--micro-batch 4] [--steps 10]
       python benchmarks/model_step.py --smoke   (tiny shapes and the `tiny` recipe on the CPU, seconds)

On the CPU the pinned fused SDPA backends and torch._grouped_mm are refused; their rows say so.
"""
import argparse
import json
import resource
import time
import warnings

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv3.model import count
from dsv3.model.attention import causal_attention
from dsv3.model.moe import RoutedExperts, grouped_mm_supported
from dsv3.train.config import compose
from dsv3.parallel.runtime import Runtime
from dsv3.train.build import build_model
from dsv3.train.engine import autocast
from dsv3.train.optim import build_optimizer

H100_BF16_DENSE_PEAK = 989.4e12  # datasheet, SXM; MFU is quoted against this


def median_ms(fn, warmup=3, iters=10, cuda: bool | None = None) -> float:
    """Median milliseconds of fn() over iters after warmup: CUDA events when fn runs on a GPU
    (cuda; default: when one is present), the wall clock otherwise."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]



def peak_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def flash_padded(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), is_causal=True)
    return out[..., :v.shape[-1]]


def attention_rows(device, batch=2, heads=16, seq=4096, warmup=3, iters=10) -> list[dict]:
    q, k = (torch.randn(batch, heads, seq, 192, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    v = torch.randn(batch, heads, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * batch * heads * seq * seq / 2 * (192 + 128)  # causal, fwd + bwd
    part = f"attention, {batch}x{heads} heads x {seq}"
    rows = []

    def run(attend):
        out = attend()
        out.backward(torch.ones_like(out))

    variants = {
        "causal_attention (ours)": lambda: causal_attention(q, k, v, 192 ** -0.5),
        "flash, v zero-padded to 192": lambda: flash_padded(q, k, v),
    }
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        def pinned(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        variants[f"sdpa, v 128, {backend.name}"] = pinned
    for name, attend in variants.items():
        try:
            ms = median_ms(lambda: run(attend), warmup, iters, cuda=device.type == "cuda")
            rows.append({"part": part, "variant": name, "ms": ms, "tflops": flops / ms / 1e9})
        except RuntimeError as error:
            rows.append({"part": part, "variant": name, "error": str(error).splitlines()[0][:80]})
    return rows


def expert_rows(device, tokens=8192, experts=64, top_k=6, dim=1024, inter=384, warmup=3, iters=10) -> list[dict]:
    module = RoutedExperts(experts, dim, inter, init_std=0.006).to(device)
    module.reset_parameters(seed=0)
    counts = torch.bincount(torch.randint(experts, (tokens * top_k,), device=device), minlength=experts)
    x = torch.randn(tokens * top_k, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * tokens * top_k * 3 * dim * inter
    part = f"experts {experts}x{dim}x{inter}, {tokens}x top-{top_k}"
    rows = []
    for name, path in (("torch._grouped_mm", module._grouped), ("loop over experts", module._looped)):
        if path == module._grouped and not grouped_mm_supported(x):
            rows.append({"part": part, "variant": name, "error": "skipped: needs a CUDA GPU of compute capability 9.0+"})
            continue

        def run(path=path):
            with autocast(device):
                out = path(x, counts)
            out.backward(torch.ones_like(out))
        ms = median_ms(run, warmup, iters, cuda=device.type == "cuda")
        rows.append({"part": part, "variant": name, "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def step_rows(model_name: str, micro_batch: int, steps: int, device, warmup=3) -> list[dict]:
    """One training step as the trainer runs it on one process: BF16 autocast over FP32 master
    weights on a GPU, the recipe's AdamW (fused on CUDA), gradient clipping."""
    cfg = OmegaConf.to_object(compose([f"model={model_name}", "data=synthetic", "train.run_dir=/tmp/unused"]))
    model_cfg, tc = cfg.model, cfg.train
    seq = model_cfg.max_seq_len
    model = build_model(model_cfg, device, 0, Runtime())
    optimizer = build_optimizer(model, tc.schedule.lr, (tc.beta1, tc.beta2), tc.eps, tc.weight_decay,
                                tc.adam_state_dtype, device)
    tokens = torch.randint(model_cfg.vocab_size, (micro_batch, seq + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with autocast(device):
            loss = model(tokens[:, :-1], tokens[:, 1:]).total(tc.schedule.mtp_weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = median_ms(step, warmup=warmup, iters=steps, cuda=device.type == "cuda")
    counts = count(model_cfg, seq)
    flop_per_token = counts.flop_per_token + counts.mtp_flop_per_token
    tokens_per_s = micro_batch * seq / (ms / 1e3)
    variant = "bf16 autocast, fp32 master" if device.type == "cuda" else "fp32, no autocast (CPU)"
    row = {"part": f"train step, {model_name}, {micro_batch}x{seq} tokens", "variant": variant, "ms": ms, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flop_per_token / 1e12,
           "peak_gib": peak_gib(device)}
    if device.type == "cuda":
        row["mfu"] = tokens_per_s * flop_per_token / H100_BF16_DENSE_PEAK
    return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains each backend it skips
    if args.smoke:
        device = torch.device("cpu")
        torch.manual_seed(0)
        print(f"# smoke: CPU, torch {torch.__version__}, tiny shapes (the figures mean nothing)")
        rows = (attention_rows(device, batch=1, heads=2, seq=64, warmup=1, iters=2)
                + expert_rows(device, tokens=64, experts=4, top_k=2, dim=64, inter=32, warmup=1, iters=2)
                + step_rows("tiny", 2, steps=2, device=device, warmup=1))
    else:
        device = torch.device("cuda")
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
        rows = attention_rows(device) + expert_rows(device) + step_rows(args.model, args.micro_batch, args.steps, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"| {'part':<48} | {'variant':<34} | {'ms':>8} | {'TFLOPS':>7} | other")
    for r in rows:
        other = r.get("error") or ", ".join(f"{k} {r[k]:.3g}" for k in ("tokens_per_s", "mfu", "peak_gib") if k in r)
        ms = f"{r['ms']:8.2f}" if "ms" in r else " " * 8
        tf = f"{r['tflops']:7.1f}" if "tflops" in r else " " * 7
        print(f"| {r['part']:<48} | {r['variant']:<34} | {ms} | {tf} | {other}")


if __name__ == "__main__":
    main()
