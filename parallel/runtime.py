"""The process group of a run started by torchrun (or srun), and what each rank needs of it."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .config import ParallelConfig
from .data_parallel import GradientSync
from .mesh import Layout, build_mesh, data_parallel_rank, resolve_layout, stage_group


@dataclass
class Runtime:
    layout: Layout
    mesh: DeviceMesh
    rank: int
    data_rank: int  # index among the dp * ep ranks that read different data
    stage: dist.ProcessGroup  # the dp * ep ranks of this pipeline stage
    sync: GradientSync | None = None  # set once the model exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    def barrier(self) -> None:
        dist.barrier()

    def sum_over_stage(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, group=self.stage)

    def mean_over_data_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        self.sum_over_stage(total)
        return total / self.layout.data_parallel

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("pp")

    @property
    def pp_rank(self) -> int:
        return self.mesh.get_local_rank("pp")

    def sum_over_pipeline(self, tensor: torch.Tensor) -> None:
        if self.layout.pp > 1:
            dist.all_reduce(tensor, group=self.pp_group)

    def attach(self, model: torch.nn.Module, copies: dict[str, int] | None = None) -> None:
        """copies: parameter name -> pipeline ranks holding it (for the global gradient norm)."""
        self.sync = GradientSync(model, self.stage, self.mesh.get_group("dp"), self.ep_group,
                                 self.pp_group if self.layout.pp > 1 else None, copies)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(cfg: ParallelConfig, n_routed_experts: int, device_name: str) -> tuple[torch.device, Runtime | None]:
    """Joins the process group when there are several ranks; returns this rank's device and the
    runtime (None for a single process). Checks the layout against the world size first."""
    world = world_size()
    layout = resolve_layout(cfg, world, n_routed_experts)
    if world == 1:
        return None, None
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
    return device, Runtime(layout, mesh, dist.get_rank(), data_parallel_rank(mesh), stage_group(mesh))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
