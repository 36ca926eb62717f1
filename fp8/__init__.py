"""FP8 training with fine-grained (1x128 activation, 128x128 weight) scaling: kernels, GEMM paths
and the module swaps that turn them on."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dsv3.model.moe import RoutedExperts

from .linear import FP8Linear, FP8RoutedExperts

KEPT_IN_HIGH_PRECISION = ("head", "eh_proj")  # with the embedding, routers, norms, attention core


@dataclass
class FP8Config:
    enabled: bool = False  # precision=fp8
    power_of_two_scales: bool = False  # round every scale up to a power of two


def convert(model: nn.Module, cfg: FP8Config) -> list[str]:
    """Turns the model's GEMMs that RECIPE.md section 4 runs in FP8 into FP8 ones, in place (same
    parameters, same names): every Linear of MLA, the dense MLPs and the shared experts, and the
    routed experts. The embedding, output head, MTP projection, routers and norms stay as they
    are, and attention's core is not a Linear. Returns the names converted."""
    converted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in KEPT_IN_HIGH_PRECISION:
            module.__class__ = FP8Linear
        elif type(module) is RoutedExperts:
            module.__class__ = FP8RoutedExperts
        else:
            continue
        module.power_of_two = cfg.power_of_two_scales
        converted.append(name)
    return converted
