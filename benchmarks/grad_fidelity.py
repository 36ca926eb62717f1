"""How far one step's gradients in BF16 and in FP8 are from FP32's, parameter kind by kind.

One model, one batch of the synthetic chain (data=synthetic): the loss and every parameter's
gradient in FP32 (TF32 off: the reference), under BF16 autocast (the `bf16` recipe), and with the
FP8 layers on under BF16 autocast (the `fp8` recipe; on the CPU, without autocast). For each kind
of parameter (its name without the layer number) and each precision it prints the relative error
of the gradient against FP32's, ||g - g32|| / ||g32||, and the ratio of norms ||g|| / ||g32||: a
ratio away from 1 is a bias (a scale wrong somewhere), an error without one is noise. Optionally
the model first trains a few steps in FP32, so that the gradients are those of a model past its
initialisation (learning the chain).

--per-gemm also takes every FP8 Linear's own input, output gradient and weight from the FP32 pass
and computes its Dgrad (dy @ W) and Wgrad (dy^T @ x) from E4M3-rounded operands, with the recipe's
tiles (dy in 1x128 tiles, W in 128x128 blocks; dy^T and x^T in 1x128 tiles along the tokens), against
the same products in FP32: the error of one GEMM, with nothing upstream. Rounding to E4M3 (3
mantissa bits) errs by 1.8-3.6% RMS per operand, so about 2.6% for one operand and 3.7% for two
(both independent) is what a correct quantisation gives; more means tiles whose values span more
than E4M3's range. Training's Wgrad reads x from its 1x128 FP8 cache, dequantised and requantised
along the tokens: a second rounding with exact scales, none with power-of-two scales (the new scale
is the old one times a power of two, so each value only shifts its exponent); --per-gemm reports
that Wgrad with both kinds of scale beside the one from x itself. --power-of-two runs the whole FP8
model with power-of-two scales (fp8.power_of_two_scales=true).

Usage: python benchmarks/grad_fidelity.py [--model small] [--layers 12] [--batch 4] [--seq-len 4096]
                                          [--warm-steps 0]
                                          [--per-gemm] [--power-of-two]
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
from dsv3.fp8 import FP8Config, convert, quant
from dsv3.parallel.runtime import Runtime
from dsv3.train.build import build_model
from dsv3.train.config import compose

MTP_WEIGHT = 0.3  # the recipe's weight for the first part of training (report section 4.2)


def kind(name: str) -> str:
    """layers.3.attn.w_dq.weight -> attn.w_dq.weight: one kind over all layers."""
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


def record_linears(model, names: list[str]) -> tuple[dict, list]:
    """Hooks on the Linears `names`: name -> (x, dy, W) of the next backward pass, and the hooks'
    handles (remove them after that pass)."""
    records, handles = {}, []

    def hook(name):
        def forward(module, inputs, output):
            x = inputs[0].detach()
            output.register_hook(lambda dy: records.__setitem__(name, (x, dy.detach(), module.weight.detach())))
        return forward

    modules = dict(model.named_modules())
    for name in names:
        if type(modules[name]) is torch.nn.Linear:  # the routed experts are not
            handles.append(modules[name].register_forward_hook(hook(name)))
    return records, handles


def rounded_tiles(t: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """t through E4M3 in 1x128 tiles along its last dimension, back in FP32."""
    return quant.dequantize_tiles(*quant.quantize_tiles(t, power_of_two), t.shape[-1])


def rounded_blocks(w: torch.Tensor) -> torch.Tensor:
    return quant.dequantize_blocks(*quant.quantize_blocks(w), tuple(w.shape))


def cached_transposed(x: torch.Tensor, power_of_two: bool) -> torch.Tensor:
    """x^T as the FP8 Linear's Wgrad reads it: x kept in 1x128 tiles along its features (the
    forward's FP8 cache), then dequantised and requantised in 1x128 tiles along the tokens."""
    x_q, x_s = quant.quantize_tiles(x, power_of_two)
    x_t = quant.dequantize_tiles(*quant.quantize_tiles_transposed(x_q, power_of_two, x_scale=x_s), x.shape[0])
    return x_t[:x.shape[1]]  # the cache's padded features cut off


class Errors:
    """Sums over tensors of ||approx - exact||^2, ||approx||^2 and ||exact||^2, and from them the
    relative error ||approx - exact|| / ||exact|| and the norm ratio ||approx|| / ||exact||."""

    def __init__(self):
        self.diff = self.approx = self.exact = 0.0

    def add(self, approx: torch.Tensor, exact: torch.Tensor) -> None:
        self.diff += (approx - exact).square().sum().item()
        self.approx += approx.square().sum().item()
        self.exact += exact.square().sum().item()

    def figures(self, prefix: str = "") -> dict:
        if not self.exact:
            return {f"{prefix}rel_err": 0.0, f"{prefix}norm_ratio": 1.0}
        return {f"{prefix}rel_err": (self.diff / self.exact) ** 0.5,
                f"{prefix}norm_ratio": (self.approx / self.exact) ** 0.5}


def per_gemm(records: dict) -> dict:
    """Per kind: each backward GEMM from E4M3-rounded operands against FP32, error and norm ratio.
    Wgrad three ways: x^T quantised from x itself (`wgrad_`, one rounding per operand), and x^T
    requantised from x's 1x128 FP8 cache as training computes it, with exact scales
    (`wgrad_cached_`) and with power-of-two ones (`wgrad_cached_pow2_`)."""
    errors = defaultdict(lambda: [Errors() for _ in range(4)])  # Dgrad, Wgrad direct, cached, cached pow2
    for name, (x, dy, w) in reversed(records.items()):  # forward order: backward filled it from the top
        x, dy, w = x.reshape(-1, x.shape[-1]).float(), dy.reshape(-1, dy.shape[-1]).float(), w.float()
        dgrad, wgrad, cached, cached_pow2 = errors[kind(name)]
        exact, dy_t = dy.t() @ x, dy.t().contiguous()
        dgrad.add(rounded_tiles(dy) @ rounded_blocks(w), dy @ w)
        wgrad.add(rounded_tiles(dy_t) @ rounded_tiles(x.t().contiguous()).t(), exact)
        cached.add(rounded_tiles(dy_t) @ cached_transposed(x, False).t(), exact)
        cached_pow2.add(rounded_tiles(dy_t, True) @ cached_transposed(x, True).t(), exact)
    return {k: {**e[0].figures("dgrad_"), **e[1].figures("wgrad_"), **e[2].figures("wgrad_cached_"),
                **e[3].figures("wgrad_cached_pow2_")} for k, e in errors.items()}


def compare(reference: dict, grads: dict) -> dict:
    """Per kind: relative error and norm ratio over all its parameters together."""
    errors = defaultdict(Errors)
    for name, g32 in reference.items():
        errors[kind(name)].add(grads[name], g32)
    return {k: e.figures() for k, e in errors.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--layers", type=int, default=0, help="the model's n_layers (0: the recipe's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--warm-steps", type=int, default=0, help="FP32 AdamW steps before the comparison")
    parser.add_argument("--per-gemm", action="store_true", help="also each FP8 Linear's Dgrad and Wgrad on its own")
    parser.add_argument("--power-of-two", action="store_true", help="the FP8 model with power-of-two scales")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.layers, args.batch, args.seq_len, args.warm_steps, args.per_gemm = "tiny", 0, 2, 64, 1, True
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
    fp8_model = copy.deepcopy(model)
    converted = convert(fp8_model, FP8Config(enabled=True, power_of_two_scales=args.power_of_two))
    records, handles = record_linears(model, converted if args.per_gemm else [])
    loss32, reference = gradients(model, tokens, "fp32")
    for handle in handles:
        handle.remove()
    gemms = per_gemm(records)
    records.clear()
    results = {"bf16": gradients(model, tokens, "bf16"), "fp8": gradients(fp8_model, tokens, "fp8")}
    print(f"# {args.model}, {cfg.n_layers} layers, {args.batch} x {args.seq_len} tokens on {device}, "
          f"after {args.warm_steps} FP32 steps, FP8 scales {'power-of-two' if args.power_of_two else 'exact'}; "
          f"loss FP32 {loss32:.5f}, "
          + ", ".join(f"{p.upper()} {loss:.5f}" for p, (loss, _) in results.items()))
    rows = {p: compare(reference, grads) for p, (_, grads) in results.items()}
    print(f"| {'parameter kind':<40} | {'BF16 rel err':>12} | {'BF16 norm':>9} | {'FP8 rel err':>11} | {'FP8 norm':>8} |")
    print(f"|{'-' * 42}|{'-' * 14}|{'-' * 11}|{'-' * 13}|{'-' * 10}|")
    for k in rows["bf16"]:
        b, f = rows["bf16"][k], rows["fp8"][k]
        print(f"| {k:<40} | {b['rel_err']:>12.4f} | {b['norm_ratio']:>9.4f} | {f['rel_err']:>11.4f} | {f['norm_ratio']:>8.4f} |")
    if gemms:
        print(f"\n| {'FP8 Linear, its GEMM alone':<40} | {'Dgrad err':>9} | {'Wgrad err':>9} | {'from cache':>10} "
              f"| {'pow2 scales':>11} | {'norm':>6} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 13}|{'-' * 8}|")
        for k, g in gemms.items():
            print(f"| {k:<40} | {g['dgrad_rel_err']:>9.4f} | {g['wgrad_rel_err']:>9.4f} | {g['wgrad_cached_rel_err']:>10.4f} "
                  f"| {g['wgrad_cached_pow2_rel_err']:>11.4f} | {g['wgrad_cached_norm_ratio']:>6.3f} |")
    print(json.dumps({"model": args.model, "layers": cfg.n_layers, "device": str(device),
                      "power_of_two": args.power_of_two, "loss_fp32": loss32,
                      **{f"loss_{p}": loss for p, (loss, _) in results.items()}, "kinds": rows, "per_gemm": gemms}))


if __name__ == "__main__":
    main()
