"""Point-to-point links between pipeline stages.

Stage-to-stage tensors travel by point-to-point sends on 2-rank groups, one per (sender,
receiver, activations | gradients): each such group carries one stream of tensors in micro-batch
order, so sends and receives can never be matched out of order, whatever the schedule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .schedules import Placement


class StageLinks:
    """Sends and receives between pipeline ranks on dedicated 2-rank groups."""

    def __init__(self, placement: Placement, pp_lines: list[list[int]], my_line: list[int], device: torch.device):
        links = set()
        for v in range(placement.n_stages):
            nxt = placement.next(v)
            if nxt is not None and placement.rank(v) != placement.rank(nxt):
                links.add((placement.rank(v), placement.rank(nxt), "activation"))
                links.add((placement.rank(nxt), placement.rank(v), "gradient"))
        self.groups = {}
        for line in pp_lines:  # every rank creates every group, in the same order
            for src, dst, kind in sorted(links):
                group = dist.new_group([line[src], line[dst]])
                if line == my_line:
                    self.groups[src, dst, kind] = group
        # NCCL sets up a pair's point-to-point channel at its first send or receive, which blocks
        # until the peer gets there too: with two ranks that each start by sending (DualPipe) both
        # would wait forever. Set every link up now, in one order.
        me = my_line.index(dist.get_rank())
        probe = torch.zeros(1, device=device)
        for src, dst, kind in sorted(self.groups):
            if me == src:
                dist.send(probe, dst=my_line[dst], group=self.groups[src, dst, kind])
            elif me == dst:
                dist.recv(probe, src=my_line[src], group=self.groups[src, dst, kind])
        self.line = my_line
        self.pending_sends: list = []

    def send(self, tensor: torch.Tensor, src: int, dst: int, kind: str) -> None:
        tensor = tensor.detach().contiguous()
        work = dist.isend(tensor, dst=self.line[dst], group=self.groups[src, dst, kind])
        self.pending_sends.append((work, tensor))

    def receive(self, buffer: torch.Tensor, src: int, dst: int, kind: str) -> torch.Tensor:
        dist.irecv(buffer, src=self.line[src], group=self.groups[src, dst, kind]).wait()
        return buffer

    def wait_sends(self) -> None:
        for work, _ in self.pending_sends:
            work.wait()
        self.pending_sends.clear()
