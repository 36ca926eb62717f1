"""The device mesh of a run: dimensions (pp, dp, ep), one process per device.

Attention, dense FFNs, routers, embedding and head are replicated over every (dp, ep) rank of a
pipeline stage, and each of those ranks reads different data: the data-parallel degree is dp * ep.
Routed experts are sharded over ep and replicated over dp, so an expert's gradient is reduced over
dp only (DeepSeek-V3: EP64 inside DP128, i.e. dp = 2, ep = 64).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig


@dataclass
class Layout:
    pp: int
    dp: int
    ep: int

    @property
    def data_parallel(self) -> int:
        return self.dp * self.ep

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep


def resolve_layout(cfg: ParallelConfig, world_size: int, n_routed_experts: int) -> Layout:
    """The layout for `world_size` ranks, or one sentence saying why it cannot be."""
    if world_size % (cfg.pp * cfg.ep):
        raise ValueError(f"parallel.pp={cfg.pp} x parallel.ep={cfg.ep} does not divide the world size {world_size}.")
    dp = cfg.dp or world_size // (cfg.pp * cfg.ep)
    if cfg.pp * dp * cfg.ep != world_size:
        raise ValueError(f"parallel.pp={cfg.pp} x parallel.dp={dp} x parallel.ep={cfg.ep} = {cfg.pp * dp * cfg.ep} "
                         f"ranks, but the world size is {world_size}.")
    if n_routed_experts % cfg.ep:
        raise ValueError(f"model.n_routed_experts={n_routed_experts} cannot be split evenly over parallel.ep={cfg.ep} ranks.")
    return Layout(cfg.pp, dp, cfg.ep)


def build_mesh(layout: Layout, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, (layout.pp, layout.dp, layout.ep), mesh_dim_names=("pp", "dp", "ep"))


def data_parallel_rank(mesh: DeviceMesh) -> int:
    """This rank's index among the dp * ep ranks of its stage, which each read different data."""
    return mesh.get_local_rank("dp") * mesh.size(mesh.mesh_dim_names.index("ep")) + mesh.get_local_rank("ep")


def stage_group(mesh: DeviceMesh) -> dist.ProcessGroup:
    """All dp * ep ranks of this rank's pipeline stage: dense gradients and router loads sum here."""
    return mesh["dp", "ep"]._flatten("dp_ep").get_group()


def pipeline_lines(mesh: DeviceMesh) -> tuple[list[list[int]], list[int]]:
    """Global ranks of every pipeline (one per (dp, ep) position, ordered by stage), and this
    rank's own."""
    lines = mesh.mesh.permute(1, 2, 0).reshape(-1, mesh.mesh.shape[0]).tolist()
    me = dist.get_rank()
    return lines, next(line for line in lines if me in line)
