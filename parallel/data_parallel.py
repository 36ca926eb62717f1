"""Gradients of one process and data-parallel gradient reduction, with the global gradient norm.
Every layout's gradients (these and ZeRO-1's ShardedGradients) offer reduce, norm and scale.

Each rank's loss is the mean over its own tokens, so the loss of the global batch is the mean of
the dp * ep ranks' losses. Dense gradients are identical in shape on every rank of a stage: they
are summed over the stage's dp * ep ranks. An expert's gradient already holds the contributions of
every ep rank's tokens (the all-to-all's backward brought them), so it is summed over dp only.
Both are then divided by dp * ep.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dsv3.model.moe import RoutedExperts


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(dense parameters, routed-expert parameters)."""
    experts = {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}
    params = list(model.parameters())
    return [p for p in params if id(p) not in experts], [p for p in params if id(p) in experts]


def _all_reduce_(tensors: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """Sums `tensors` over `group` in one collective, then multiplies them by `scale`, in place."""
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for tensor, reduced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(reduced)


class LocalGradients:
    """The gradients of one process, as backward left them."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def reduce(self) -> None:
        """Nothing to sum over: one rank."""

    def norm(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm(self._grads())

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        torch._foreach_mul_(self._grads(), factor)


class AllReducedGradients:
    """Whole gradients on every data-parallel rank, summed over the ranks that share them."""

    def __init__(self, model: torch.nn.Module, stage_group: dist.ProcessGroup, dp_group: dist.ProcessGroup,
                 ep_group: dist.ProcessGroup, pp_group: dist.ProcessGroup | None = None,
                 copies: dict[str, int] | None = None):
        self.dense, self.experts = split_parameters(model)
        self.stage_group, self.dp_group, self.ep_group, self.pp_group = stage_group, dp_group, ep_group, pp_group
        self.data_parallel = dist.get_world_size(stage_group)
        # a parameter held by k pipeline ranks counts 1/k on each in the global norm
        copies = copies or {}
        self.weight = {id(p): 1.0 / copies.get(name, 1) for name, p in model.named_parameters()}

    @torch.no_grad()
    def reduce(self) -> None:
        scale = 1.0 / self.data_parallel
        _all_reduce_([p.grad for p in self.dense if p.grad is not None], self.stage_group, scale)
        _all_reduce_([p.grad for p in self.experts if p.grad is not None], self.dp_group, scale)

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        """The global norm over every parameter of the model (experts of all ep ranks and layers of
        all pipeline ranks included)."""
        squares = torch.stack([torch.linalg.vector_norm(p.grad).square() * self.weight[id(p)]
                               for p in self.dense if p.grad is not None]).sum()
        expert_squares = (torch.stack([torch.linalg.vector_norm(p.grad).square() * self.weight[id(p)]
                                       for p in self.experts if p.grad is not None]).sum()
                          if any(p.grad is not None for p in self.experts) else torch.zeros_like(squares))
        dist.all_reduce(expert_squares, group=self.ep_group)  # each ep rank holds different experts
        squares = squares + expert_squares
        if self.pp_group is not None:  # each pipeline rank holds different layers
            dist.all_reduce(squares, group=self.pp_group)
        return squares.sqrt()

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        torch._foreach_mul_([p.grad for p in self.dense + self.experts if p.grad is not None], factor)
