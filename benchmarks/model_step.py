"""One GPU, three measurements of the BF16 model, printed as one table:

1. MLA's attention core (q/k 192, v 128), forward + backward, through SDPA as `causal_attention`
   calls it, through each fused backend pinned, and with v zero-padded to 192 so flash accepts it.
2. The routed experts of `small` through torch._grouped_mm vs a loop over experts, fwd + bwd.
3. A full training step of a recipe (default `small`): tokens/s, model TFLOPS, MFU, peak memory.

Usage: python benchmarks/model_step.py [--model small] [--micro-batch 4] [--steps 10]
"""
import argparse
import json
import warnings

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel

from dsv3.model import count
from dsv3.model.attention import causal_attention
from dsv3.model.moe import RoutedExperts
from dsv3.train.config import TrainConfig, compose
from dsv3.train.loop import build_model, build_optimizer

H100_BF16_DENSE_PEAK = 989.4e12  # datasheet, SXM; MFU is quoted against this


def cuda_time(fn, warmup=3, iters=10) -> float:
    """Median milliseconds of fn() over iters, timed with CUDA events after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def flash_padded(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), is_causal=True)
    return out[..., :v.shape[-1]]


def attention_rows(batch=2, heads=16, seq=4096) -> list[dict]:
    q, k = (torch.randn(batch, heads, seq, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    v = torch.randn(batch, heads, seq, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * batch * heads * seq * seq / 2 * (192 + 128)  # causal, fwd + bwd
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
            ms = cuda_time(lambda: run(attend))
            rows.append({"part": "attention", "variant": name, "ms": ms, "tflops": flops / ms / 1e9})
        except RuntimeError as error:
            rows.append({"part": "attention", "variant": name, "error": str(error).splitlines()[0][:80]})
    return rows


def expert_rows(tokens=8192, experts=64, top_k=6, dim=1024, inter=384) -> list[dict]:
    module = RoutedExperts(experts, dim, inter, init_std=0.006).cuda()
    module.reset_parameters(seed=0)
    counts = torch.bincount(torch.randint(experts, (tokens * top_k,), device="cuda"), minlength=experts)
    x = torch.randn(tokens * top_k, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * tokens * top_k * 3 * dim * inter
    rows = []
    for name, path in (("torch._grouped_mm", module._grouped), ("loop over experts", module._looped)):
        def run(path=path):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = path(x, counts)
            out.backward(torch.ones_like(out))
        ms = cuda_time(run)
        rows.append({"part": f"experts {experts}x{dim}x{inter}, {tokens}x top-{top_k}", "variant": name,
                     "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def step_rows(model_name: str, micro_batch: int, steps: int) -> list[dict]:
    cfg = compose([f"model={model_name}", "train.run_dir=/tmp/unused"])
    model_cfg = OmegaConf.to_object(cfg.model)
    seq = model_cfg.max_seq_len
    device = torch.device("cuda")
    model = build_model(model_cfg, device, seed=0)
    optimizer = build_optimizer(model, TrainConfig(), device)
    tokens = torch.randint(model_cfg.vocab_size, (micro_batch, seq + 1), device=device)
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens[:, :-1], tokens[:, 1:]).total(0.3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ms = cuda_time(step, warmup=3, iters=steps)
    counts = count(model_cfg, seq)
    flop_per_token = counts.flop_per_token + counts.mtp_flop_per_token
    tokens_per_s = micro_batch * seq / (ms / 1e3)
    return [{"part": f"train step, {model_name}, {micro_batch}x{seq} tokens", "variant": "bf16 autocast, fp32 master",
             "ms": ms, "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * flop_per_token / 1e12,
             "mfu": tokens_per_s * flop_per_token / H100_BF16_DENSE_PEAK,
             "peak_gib": torch.cuda.max_memory_allocated() / 2**30}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)  # SDPA explains each backend it skips
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = attention_rows() + expert_rows() + step_rows(args.model, args.micro_batch, args.steps)
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
