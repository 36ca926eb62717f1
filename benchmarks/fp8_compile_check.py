"""FP8 gradients with and without torch.compile: one forward and backward of a few layers of `small`
(4 x 4096 tokens) in BF16 and in FP8, with eager blocks and with compiled blocks as the trainer runs
them (the FP8 Linear traced, the experts' operators called from the graph). Prints one JSON line per
mode: the loss, the global gradient norm, the largest |gradient|, the relative difference of all
gradients to the eager FP8 run's (and to BF16's), and the median step time.

    python benchmarks/fp8_compile_check.py [--layers 3] [--batch 4] [--seq-len 4096]
    python benchmarks/fp8_compile_check.py --smoke   (the tiny recipe on the CPU, eager modes only)
"""
import argparse
import json
from contextlib import nullcontext

import torch
from omegaconf import OmegaConf

from dsv3.fp8 import FP8Config, convert
from dsv3.model import ModelConfig, Transformer
from dsv3.train.config import compose
from model_step import median_ms  # benchmarks/ is on sys.path when run as a script


def step(cfg: ModelConfig, tokens, device, fp8: bool, compiled: bool, iters: int):
    torch._dynamo.reset()
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights(0)
    if fp8:
        convert(model, FP8Config(enabled=True))
    if compiled:
        for block in model.blocks():
            block.compile()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(tokens[:, :-1], tokens[:, 1:])
        loss = out.total(0.3)
        loss.backward()
        return loss

    loss = forward_backward().item()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    ms = median_ms(forward_backward, warmup=1, iters=iters, cuda=device.type == "cuda") if iters else None
    return loss, grads.cpu(), ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny recipe on the CPU, eager modes only")
    args = parser.parse_args()
    recipe = "tiny" if args.smoke else "small"
    seq_len = 64 if args.smoke else args.seq_len
    cfg = OmegaConf.to_object(compose([f"model={recipe}", f"model.n_layers={args.layers}",
                                       "model.mtp_depth=0"]).model)
    device = torch.device("cpu" if args.smoke else "cuda")
    tokens = torch.randint(cfg.vocab_size, (args.batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    modes = {"bf16 eager": (False, False), "fp8 eager": (True, False)}
    if not args.smoke:
        modes |= {"bf16 compiled": (False, True), "fp8 compiled": (True, True)}
    results = {name: step(cfg, tokens, device, *flags, 0 if args.smoke else args.iters)
               for name, flags in modes.items()}
    reference, bf16 = results["fp8 eager"][1], results["bf16 eager"][1]
    for name, (loss, grads, ms) in results.items():
        print(json.dumps({
            "mode": name, "loss": round(loss, 5), "grad_norm": float(grads.norm()),
            "max_abs_grad": float(grads.abs().max()), "finite": bool(grads.isfinite().all()),
            "rel_diff_to_fp8_eager": float((grads - reference).norm() / reference.norm()),
            "rel_diff_to_bf16_eager": float((grads - bf16).norm() / bf16.norm()),
            "step_ms": None if ms is None else round(ms, 2)}), flush=True)


if __name__ == "__main__":
    main()
