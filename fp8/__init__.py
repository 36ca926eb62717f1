"""FP8 training with fine-grained (1x128 activation, 128x128 weight) scaling: kernels, GEMM paths
and the module swaps that turn them on."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

import torch

from dsv3.model.moe import MoE, RoutedExperts

from . import quant

KEPT_IN_HIGH_PRECISION = ("head", "eh_proj")  # with the embedding, routers, norms, attention core


@dataclass
class FP8Config:
    enabled: bool = False  # precision=fp8
    power_of_two_scales: bool = False  # round every scale up to a power of two
    # A GEMM runs in FP8 only when its input and output widths are both at least this (routed
    # experts: dim and moe_inter_dim); narrower ones stay in the compute dtype, for models whose
    # narrow GEMMs are slower in FP8 (`small`'s experts: 0.57-0.81x BF16, benchmarks/RESULTS.md,
    # "FP8 on an H200"). 0: all.
    min_width: int = 0
    # false: the routed experts stay in the compute dtype (and dispatch sends the rows as they are),
    # for models where the grouped FP8 GEMMs with their quantisation are slower than BF16's
    # `_grouped_mm`, as at V2-Lite's widths on an H200 (benchmarks/RESULTS.md, "FP8 on an H200, compiled")
    routed_experts: bool = True


class FP8DispatchCodec:
    """The DispatchCodec (dsv3.model.moe) of FP8 training: what an expert-parallel dispatcher sends in FP8 (report section 3.3.3: dispatch in FP8 with
    power-of-two scales): 1x128 E4M3 tiles as bytes, and their scales. The experts' FP8 GEMM then
    quantises the decoded rows again, which reproduces the same E4M3 values when it also uses
    power-of-two scales (fp8.power_of_two_scales=true)."""

    @staticmethod
    def encode(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rows.is_cuda:
            from .kernels import quantize_tiles
        else:
            quantize_tiles = quant.quantize_tiles
        q, scales = quantize_tiles(rows, True)
        return q.view(torch.uint8), scales

    @staticmethod
    def decode(data: torch.Tensor, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return quant.dequantize_tiles(data.view(quant.E4M3), scales, like.shape[1]).to(like.dtype)


def _narrow_side(experts: RoutedExperts) -> int:
    """The narrower of the experts' two widths (dim, moe_inter_dim)."""
    return min(experts.w2.shape[1:])


def convert(model: nn.Module, cfg: FP8Config) -> list[str]:
    """Turns the model's GEMMs that the report (section 3.3.1) runs in FP8 into FP8 ones, in place (same
    parameters, same names): every Linear of MLA, the dense MLPs and the shared experts, and the
    routed experts. The embedding, output head, MTP projection, routers and norms stay as they
    are, and attention's core is not a Linear. Every MoE layer whose experts turn FP8 gets the FP8
    codec: expert-parallel dispatch sends FP8 (combine stays in the compute dtype), whether the
    experts were sharded before or are sharded after. GEMMs narrower than cfg.min_width are left as
    they are, and so are the routed experts when cfg.routed_experts is false. Returns the names
    converted."""
    from .linear import FP8Linear, FP8RoutedExperts  # here: the layers import torch._dynamo (2 s), the config need not

    def experts_convert(experts: RoutedExperts) -> bool:
        return cfg.routed_experts and _narrow_side(experts) >= cfg.min_width

    converted = []
    for module in model.modules():
        if isinstance(module, MoE) and experts_convert(module.experts):
            module.dispatcher = module.dispatcher.with_codec(FP8DispatchCodec())
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in KEPT_IN_HIGH_PRECISION:
            if min(module.in_features, module.out_features) < cfg.min_width:
                continue
            module.__class__ = FP8Linear
        elif type(module) is RoutedExperts:
            if not experts_convert(module):
                continue
            module.__class__ = FP8RoutedExperts
        else:
            continue
        module.power_of_two = cfg.power_of_two_scales
        converted.append(name)
    return converted
