"""Expert-sorted rows cut into 128-row tiles that never straddle two experts: the work list of the
grouped FP8 GEMMs (`grouped.py`) and of the per-expert transposed quantisation (`kernels.py`).
Built on the device from the per-expert counts, without reading them on the host."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import TILE


@dataclass
class Groups:
    """Expert-sorted rows in 128-row tiles: tile i holds rows [start[i], min(start[i] + 128, end[i]))
    of expert[i]; expert e's tiles are [first_tile[e], first_tile[e + 1]). Empty tiles have
    start == end."""
    counts: torch.Tensor  # (E,) rows per expert
    expert: torch.Tensor  # (T,) int32
    start: torch.Tensor  # (T,) int32
    end: torch.Tensor  # (T,) int32
    first_tile: torch.Tensor  # (E + 1,) int32

    @staticmethod
    def of(counts: torch.Tensor, rows: int) -> "Groups":
        n_experts = counts.numel()
        counts = counts.to(torch.int64)
        tiles = (counts + TILE - 1) // TILE
        last_tile = tiles.cumsum(0)
        first_row = counts.cumsum(0) - counts
        index = torch.arange(-(-rows // TILE) + n_experts, device=counts.device)
        expert = torch.searchsorted(last_tile, index, right=True)
        real = expert < n_experts
        e = expert.clamp_max(n_experts - 1)
        start = torch.where(real, first_row[e] + (index - (last_tile[e] - tiles[e])) * TILE, 0)
        end = torch.where(real, first_row[e] + counts[e], 0)
        first_tile = torch.cat([last_tile.new_zeros(1), last_tile])
        as32 = lambda t: t.to(torch.int32)  # noqa: E731
        return Groups(counts, as32(e), as32(start), as32(end), as32(first_tile))

    def tensors(self) -> list[torch.Tensor]:
        """The fields in order: what the FP8 experts' custom operators take (`Groups(*tensors)`)."""
        return [self.counts, self.expert, self.start, self.end, self.first_tile]

    @property
    def n_tiles(self) -> int:
        return self.start.numel()

    def sizes(self) -> list[int]:
        """Rows per expert on the host (the emulation's split sizes)."""
        return self.counts.tolist()
