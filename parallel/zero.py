"""ZeRO-1 AdamW: optimizer states sharded over the data-parallel ranks (report sections 3.2, 3.3.3).

Parameters are grouped into flat buckets that share a process group and a weight decay: dense
matrices and dense norm gains over the stage's dp * ep ranks, routed experts over dp. For each
bucket, one step is:
  1. reduce-scatter the flattened gradients: rank r receives the sum of slice r (then / dp*ep);
  2. the global gradient norm from the slices (one all-reduce over the stage) and clipping
     (ShardedGradients: reduce, norm, scale, like the gradients of every other layout);
  3. AdamW (adamw_) on slice r only, with slice r's moments, the only moments this rank keeps;
  4. all-gather the updated slices back into every rank's full FP32 parameters (ZeroAdamW.step).
Parameters are views of one flat buffer per bucket, which the all-gather fills in place.
Memory for moments falls by the bucket's group size; communication equals one all-reduce.
Checkpoints store the moments per parameter, whole (see state_dict), so any layout can load them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors

from .adamw import adamw_


class Bucket:
    """Parameters of one process group and weight decay, living in one flat FP32 buffer (padded to
    a multiple of the group size) that the all-gather writes directly. This rank owns slice
    [start, start + shard). Gradients stay ordinary tensors, freed after each step: a persistent
    gradient buffer would sit in memory through the next forward and backward, at the peak."""

    def __init__(self, names: list[str], params: list[torch.nn.Parameter], group: dist.ProcessGroup,
                 weight_decay: float, state_dtype: torch.dtype, copies: int = 1):
        self.names, self.params, self.group, self.weight_decay = names, params, group, weight_decay
        self.copies = copies  # pipeline ranks holding these parameters (counted once in the norm)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.numel = sum(p.numel() for p in params)
        self.shard = math.ceil(self.numel / self.world)
        self.start = self.rank * self.shard
        device = params[0].device
        self.flat = torch.zeros(self.shard * self.world, dtype=torch.float32, device=device)
        offset = 0
        for p in params:  # parameters become views of the flat buffer
            self.flat[offset:offset + p.numel()].copy_(p.detach().flatten())
            p.data = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.exp_avg = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=state_dtype, device=device)
        self.grad: torch.Tensor | None = None  # this rank's slice of the summed gradient, reduce to step

    def padded(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = _flatten_dense_tensors([t.float() for t in tensors])
        return torch.nn.functional.pad(flat, (0, self.shard * self.world - self.numel))


class ShardedGradients:
    """ZeRO-1's gradients: each bucket's summed over its group by a reduce-scatter, this rank keeping
    its slice (in `bucket.grad`, which the step consumes); the whole gradients are freed on the way."""

    def __init__(self, buckets: list[Bucket], stage_group: dist.ProcessGroup, data_parallel: int,
                 pp_group: dist.ProcessGroup | None = None):
        self.buckets, self.stage_group, self.data_parallel, self.pp_group = buckets, stage_group, data_parallel, pp_group

    @torch.no_grad()
    def reduce(self) -> None:
        for bucket in self.buckets:
            full = bucket.padded([p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params])
            for p in bucket.params:  # the gradients are in `full` now; free them before the update
                p.grad = None
            grad = torch.empty(bucket.shard, dtype=torch.float32, device=full.device)
            dist.reduce_scatter_tensor(grad, full, group=bucket.group)
            del full
            bucket.grad = grad.div_(self.data_parallel)

    @torch.no_grad()
    def norm(self) -> torch.Tensor:
        squares = torch.zeros((), device=self.buckets[0].flat.device)
        for bucket in self.buckets:
            squares += bucket.grad.square().sum() / bucket.copies
        dist.all_reduce(squares, group=self.stage_group)  # every slice of every bucket, experts of all ep ranks
        if self.pp_group is not None:
            dist.all_reduce(squares, group=self.pp_group)  # every pipeline rank's layers
        return squares.sqrt()

    @torch.no_grad()
    def scale(self, factor: torch.Tensor) -> None:
        for bucket in self.buckets:
            bucket.grad.mul_(factor)


class ZeroAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in slices across ranks: one param group per bucket; `step` updates
    this rank's slice from the gradient slice ShardedGradients left, then all-gathers the slices."""

    def __init__(self, buckets: list[Bucket], lr: float, betas: tuple[float, float], eps: float):
        groups = [{"params": bucket.params, "weight_decay": bucket.weight_decay} for bucket in buckets]
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.buckets = buckets
        self.steps = 0

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.steps += 1
        for bucket, group in zip(self.buckets, self.param_groups):
            master = bucket.flat[bucket.start:bucket.start + bucket.shard]  # this rank's FP32 slice
            adamw_(master, bucket.grad, bucket.exp_avg, bucket.exp_avg_sq, self.steps, group["lr"], group["betas"],
                   group["eps"], group["weight_decay"])
            bucket.grad = None
            dist.all_gather_into_tensor(bucket.flat, master.clone(), group=bucket.group)

    # --- checkpoints: whole per-parameter moments, as torch's optimizers have them ---------------

    def state_dict(self) -> dict:
        state = {}
        for bucket in self.buckets:
            moments = []
            for local in (bucket.exp_avg, bucket.exp_avg_sq):
                full = torch.empty(bucket.shard * bucket.world, dtype=local.dtype, device=local.device)
                dist.all_gather_into_tensor(full, local, group=bucket.group)
                moments.append(full)
            offset = 0
            for name, p in zip(bucket.names, bucket.params):
                state[name] = {"step": torch.tensor(float(self.steps)),
                               "exp_avg": moments[0][offset:offset + p.numel()].view_as(p),
                               "exp_avg_sq": moments[1][offset:offset + p.numel()].view_as(p)}
                offset += p.numel()
        groups = [{key: value for key, value in group.items() if key != "params"} for group in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Loads the moments and step; the hyper-parameters stay the config's."""
        per_param = state["state"]
        for bucket in self.buckets:
            for local, key in ((bucket.exp_avg, "exp_avg"), (bucket.exp_avg_sq, "exp_avg_sq")):
                full = bucket.padded([per_param[name][key] for name in bucket.names])
                local.copy_(full[bucket.start:bucket.start + bucket.shard])
        self.steps = int(next(iter(per_param.values()))["step"])


def build_zero_adamw(model: torch.nn.Module, runtime, lr: float, betas: tuple[float, float], eps: float,
                     weight_decay: float, state_dtype: torch.dtype, copies: dict[str, int] | None = None
                     ) -> tuple[ZeroAdamW, ShardedGradients]:
    """Buckets: dense matrices (decayed) and dense gains (not) over the stage; experts over dp;
    each split by how many pipeline ranks hold the parameters (`copies`, by name)."""
    from .data_parallel import split_parameters

    copies = copies or {}
    names = {id(p): n for n, p in model.named_parameters()}
    dense, experts = split_parameters(model)
    stage, dp = runtime.stage, runtime.mesh.get_group("dp")
    specs = [([p for p in dense if p.dim() >= 2], stage, weight_decay),
             ([p for p in dense if p.dim() < 2], stage, 0.0),
             (experts, dp, weight_decay)]
    buckets = []
    for params, group, decay in specs:
        for k in sorted({copies.get(names[id(p)], 1) for p in params}):
            chosen = [p for p in params if copies.get(names[id(p)], 1) == k]
            buckets.append(Bucket([names[id(p)] for p in chosen], chosen, group, decay, state_dtype, k))
    pp_group = runtime.pp_group if runtime.layout.pp > 1 else None
    return (ZeroAdamW(buckets, lr, betas, eps),
            ShardedGradients(buckets, stage, runtime.layout.data_parallel, pp_group))
