"""Parameters held by several pipeline ranks: DualPipe's two copies of every stage, the 1f1b
embedding replica on the last rank (see pipeline_cut.py). Their gradients, and the loads of their
routers, are summed over the ranks holding them, so every copy takes the same step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .pipeline_cut import Cut


class Replicas:
    """Sums the gradients (and router loads) of parameters that several pipeline ranks hold, and
    says how many copies of each exist, so a global gradient norm counts each parameter once."""

    def __init__(self, model: nn.Module, cut: Cut, pp_lines: list[list[int]], my_line: list[int]):
        self.copies = {name: len(cut.holders(name)) for name, _ in model.named_parameters()}
        holder_sets = sorted({tuple(cut.holders(name)) for name in _all_names(cut)} - {()}, key=str)
        groups = {}
        for line in pp_lines:  # every rank creates every group, in the same order
            for holders in holder_sets:
                if len(holders) > 1:
                    group = dist.new_group([line[h] for h in holders])
                    if line == my_line:
                        groups[holders] = group
        by_holders: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            holders = tuple(cut.holders(name))
            if len(holders) > 1:
                by_holders.setdefault(holders, []).append(param)
        self.param_groups = [(params, groups[h]) for h, params in sorted(by_holders.items())]  # (params, group)
        router_holders = {tuple(cut.holders(name)) for name, m in model.named_modules() if name.endswith("router")}
        self.router_group = groups.get(next(iter(router_holders))) if len(router_holders) == 1 else None
        if len(router_holders) > 1 and any(len(h) > 1 for h in router_holders):
            raise ValueError("routers held by different sets of pipeline ranks on one rank are not supported.")

    @torch.no_grad()
    def sum_gradients(self) -> None:
        for params, group in self.param_groups:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g.view_as(p)

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        if self.router_group is not None:
            dist.all_reduce(loads, group=self.router_group)


def _all_names(cut: Cut) -> list[str]:
    n_layers = cut.layers[-1].stop
    return [f"layers.{i}." for i in range(n_layers)] + ["embed.", "head."]
