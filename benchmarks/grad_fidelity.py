"""How far one step's gradients in BF16 and in FP8 are from FP32's, parameter kind by kind.

One model, one batch of the synthetic chain (data=synthetic): the loss and every parameter's gradient in FP32 (TF32 off: the reference),
under BF16 autocast (the `bf16` recipe), and with the FP8 layers on under BF16 autocast (the `fp8`
recipe; on the CPU, without autocast). For each kind of parameter (its name without the layer number) and each precision it
prints the relative error of the gradient against FP32's, ||g - g32|| / ||g32||, and the ratio of
norms ||g|| / ||g32||: a ratio away from 1 is a bias (a scale wrong somewhere), an error without one
is noise. Optionally the model first trains a few steps in FP32, so that the gradients are those of
a model past its initialisation (learning the chain).

Usage: python benchmarks/grad_fidelity.py [--model small] [--layers 12] [--batch 4] [--seq-len 4096]
                                          [--warm-steps 0]
       python benchmarks/grad_fidelity.py --smoke   (the `tiny` recipe on the CPU, seconds)
"""
import argparse
import copy
import json
import re
from collections import defaultdict

import torch
from omegaconf import OmegaConf

from dsv3.data.synthetic import SyntheticLoader
from dsv3.fp8 import FP8Config, convert
from dsv3.parallel.runtime import Runtime
from dsv3.train.build import build_model
from dsv3.train.config import compose

MTP_WEIGHT = 0.3  # the recipe's weight for the first part of training (report section 4.2)


def kind(name: str) -> str:
    """layers.3.attn.wq_a.weight -> attn.wq_a.weight; the dense layers' MLP keeps its own kind."""
    return re.sub(r"^layers\.\d+\.", "", name)


def gradients(model, tokens: torch.Tensor, precision: str) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    device = tokens.device.type
    # On the CPU the FP8 GEMMs' emulation runs without autocast, in FP32 around the GEMMs, as the
    # trainer runs it there; on a GPU both BF16 and FP8 run under BF16 autocast, as in training.
    bf16_around = precision == "bf16" or (precision == "fp8" and device == "cuda")
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16_around):
        out = model(tokens[:, :-1], tokens[:, 1:])
        loss = out.total(MTP_WEIGHT)
    loss.backward()
    return loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(reference: dict, grads: dict) -> dict:
    """Per kind: relative error and norm ratio over all its parameters together."""
    sums = defaultdict(lambda: [0.0, 0.0, 0.0])  # ||g - g32||^2, ||g||^2, ||g32||^2
    for name, g32 in reference.items():
        g = grads[name]
        s = sums[kind(name)]
        s[0] += (g - g32).square().sum().item()
        s[1] += g.square().sum().item()
        s[2] += g32.square().sum().item()
    return {k: {"rel_err": (d / r) ** 0.5 if r else 0.0, "norm_ratio": (n / r) ** 0.5 if r else 1.0}
            for k, (d, n, r) in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--layers", type=int, default=0, help="the model's n_layers (0: the recipe's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--warm-steps", type=int, default=0, help="FP32 AdamW steps before the comparison")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.layers, args.batch, args.seq_len, args.warm_steps = "tiny", 0, 2, 64, 1
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is FP32 GEMMs, not TF32
    torch.backends.cudnn.allow_tf32 = False

    overrides = [f"model={args.model}", f"model.max_seq_len={args.seq_len}", "train.run_dir=/tmp/unused"]
    if args.layers:
        overrides.append(f"model.n_layers={args.layers}")
    cfg = OmegaConf.to_object(compose(overrides)).model
    model = build_model(cfg, device, 0, Runtime())
    # Batches with structure to learn: a chain where each token has 4 successors (data=synthetic).
    loader = SyntheticLoader(cfg.vocab_size, 4, args.seq_len, seed=1)
    batch = lambda: loader.next_batch(args.batch).to(device)  # noqa: E731
    if args.warm_steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(args.warm_steps):
            gradients(model, batch(), "fp32")
            optimizer.step()
        model.zero_grad(set_to_none=True)

    tokens = batch()
    loss32, reference = gradients(model, tokens, "fp32")
    fp8_model = copy.deepcopy(model)
    convert(fp8_model, FP8Config(enabled=True))
    results = {"bf16": gradients(model, tokens, "bf16"), "fp8": gradients(fp8_model, tokens, "fp8")}
    print(f"# {args.model}, {cfg.n_layers} layers, {args.batch} x {args.seq_len} tokens on {device}, "
          f"after {args.warm_steps} FP32 steps; loss FP32 {loss32:.5f}, "
          + ", ".join(f"{p.upper()} {loss:.5f}" for p, (loss, _) in results.items()))
    rows = {p: compare(reference, grads) for p, (_, grads) in results.items()}
    print(f"| {'parameter kind':<40} | {'BF16 rel err':>12} | {'BF16 norm':>9} | {'FP8 rel err':>11} | {'FP8 norm':>8} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 11}|{'-' * 13}|{'-' * 10}|")
    for k in rows["bf16"]:
        b, f = rows["bf16"][k], rows["fp8"][k]
        print(f"| {k:<40} | {b['rel_err']:>12.4f} | {b['norm_ratio']:>9.4f} | {f['rel_err']:>11.4f} | {f['norm_ratio']:>8.4f} |")
    print(json.dumps({"model": args.model, "layers": cfg.n_layers, "device": str(device), "loss_fp32": loss32,
                      **{f"loss_{p}": loss for p, (loss, _) in results.items()}, "kinds": rows}))


if __name__ == "__main__":
    main()
