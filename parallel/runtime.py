"""The ranks of a run and the collectives between them: one process, or a process group started by
torchrun (or srun). Every run has a runtime, so the trainer never asks which kind it has."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .config import ParallelConfig
from .mesh import Layout, build_mesh, data_parallel_rank, resolve_layout, stage_group


class Runtime:
    """One process: degree 1 in every dimension, so each collective leaves its value as it is (a
    sum or maximum over one rank), as torchtitan's ParallelDims at world size 1."""

    def __init__(self):
        self.layout, self.rank, self.data_rank = Layout(1, 1, 1), 0, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Nothing to wait for."""

    def sum_over_stage(self, tensor: torch.Tensor) -> None:
        """Sums in place over the dp * ep ranks of this pipeline stage."""

    def sum_over_pipeline(self, tensor: torch.Tensor) -> None:
        """Sums in place over the pipeline ranks of this rank's line."""

    def mean_over_data_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        self.sum_over_stage(total)
        return total / self.layout.data_parallel

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is true on any rank."""
        return flag

    def sum_over_ranks(self, value: int) -> int:
        return value

    def from_main(self, value):
        """The first rank's `value` (a picklable object), on every rank."""
        return value

    def background_group(self) -> dist.ProcessGroup | None:
        """A new group of all ranks, for collectives a background thread runs (None: one process)."""
        return None


class DistributedRuntime(Runtime):
    """A rank of a process group laid out as a (pp, dp, ep) mesh."""

    def __init__(self, layout: Layout, mesh: DeviceMesh, rank: int, data_rank: int, stage: dist.ProcessGroup):
        self.layout, self.mesh, self.rank, self.data_rank = layout, mesh, rank, data_rank
        self.stage = stage  # the dp * ep ranks of this pipeline stage

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    def barrier(self) -> None:
        dist.barrier()

    def sum_over_stage(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.stage)

    def sum_over_pipeline(self, tensor: torch.Tensor) -> None:
        if self.layout.pp > 1:
            dist.all_reduce(tensor, group=self.pp_group)

    def any(self, flag: bool, device: torch.device) -> bool:
        value = torch.tensor(float(flag), device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def sum_over_ranks(self, value: int) -> int:
        total = torch.tensor([value], dtype=torch.float64)  # a CPU tensor: gloo on every backend
        dist.all_reduce(total)
        return int(total.item())

    def from_main(self, value):
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def background_group(self) -> dist.ProcessGroup:
        return dist.new_group(backend="gloo")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(cfg: ParallelConfig, n_routed_experts: int, device_name: str) -> tuple[torch.device | None, Runtime]:
    """Joins the process group when there are several ranks; returns this rank's device (None for
    a single process: the config's choice) and the runtime. Checks the layout against the world
    size first."""
    world = world_size()
    layout = resolve_layout(cfg, world, n_routed_experts)
    if world == 1:
        return None, Runtime()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # NCCL for tensors on the GPU; gloo for the CPU-side objects that checkpointing exchanges
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = build_mesh(layout, device.type)
    return device, DistributedRuntime(layout, mesh, dist.get_rank(), data_parallel_rank(mesh), stage_group(mesh))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
