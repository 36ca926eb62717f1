"""Cutting the model into pipeline stages.

Layers are split into model stages by `parallel.stage_layers` (default: as even as possible). The
embedding sits with the first stage; the final norm, head and MTP modules with the last, which
also needs the embedding for MTP: on V placements (zbv, dualpipev) and in DualPipe the first and
last stages share a rank and so the embedding physically; with 1f1b the last rank holds a replica.
Each rank builds one module, a `Transformer` that keeps only what its stages need, under the full
model's parameter names; so checkpoints, ZeRO and expert sharding treat it like any model, and any
pipeline layout loads any other's checkpoint.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from dsv3.model import ModelConfig, Transformer

from .schedules import Placement


def split_layers(n_layers: int, n_stages: int, stage_layers: list[int]) -> list[range]:
    """The layer indices of each model stage."""
    if stage_layers:
        if len(stage_layers) != n_stages:
            raise ValueError(f"parallel.stage_layers has {len(stage_layers)} entries, but this schedule has "
                             f"{n_stages} model stages.")
        if sum(stage_layers) != n_layers or min(stage_layers) < 1:
            raise ValueError(f"parallel.stage_layers={list(stage_layers)} must be positive and sum to "
                             f"model.n_layers={n_layers}.")
        counts = list(stage_layers)
    else:
        if n_layers < n_stages:
            raise ValueError(f"model.n_layers={n_layers} cannot be split into {n_stages} pipeline stages of at "
                             f"least one layer each.")
        counts = [n_layers // n_stages + (s < n_layers % n_stages) for s in range(n_stages)]
    bounds = [0, *itertools.accumulate(counts)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


@dataclass(frozen=True)
class Cut:
    """A pipeline layout: the placement of virtual stages and each model stage's layers."""
    placement: Placement
    layers: list[range]  # per model stage
    mtp: bool  # the model has MTP modules (so the last stage needs the embedding)

    def holders(self, name: str) -> list[int]:
        """The pipeline ranks whose module holds the parameter or buffer `name`."""
        p = self.placement
        last = p.n_model_stages - 1
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            model_stages = [s for s, r in enumerate(self.layers) if layer in r]
        elif name.startswith("embed."):
            model_stages = [0, last] if self.mtp else [0]
        else:  # norm, head, mtp
            model_stages = [last]
        return sorted({p.rank(v) for v in range(p.n_stages) if p.model_stage(v) in model_stages})


def build_stage_module(cfg: ModelConfig, cut: Cut, rank: int) -> Transformer:
    """This rank's part of the model, on the current device (call under torch.device('meta'))."""
    model = Transformer(cfg)
    for name in list(model.layers.keys()):
        if rank not in cut.holders(f"layers.{name}."):
            del model.layers[name]
    if rank not in cut.holders("embed."):
        model.embed = None
    if rank not in cut.holders("head."):
        model.norm = model.head = None
        model.mtp = nn.ModuleList()
    return model
