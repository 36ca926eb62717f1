"""Expert parallelism: every MoE layer's routed experts split over the ranks of the ep group, with
tokens sent to the ranks that own their experts and brought back, dropless.

dispatch: sort this rank's token copies by global expert; exchange how many go to each expert
(an all-to-all of counts); send each rank its tokens with an uneven `all_to_all_single`; regroup
what arrived by local expert for the grouped GEMM.
combine: the same moves in reverse, so outputs come back in the router's (token, k) order.
Both exchanges are autograd-aware: backward sends gradients along the reverse route.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from dsv3.model.moe import MoE, RoutedExperts
from dsv3.model.transformer import Transformer


@dataclass
class ExpertParallelDispatched:
    tokens: torch.Tensor  # (rows, dim): tokens for this rank's experts, grouped by local expert
    counts: torch.Tensor  # (local experts,): rows per local expert
    restore: torch.Tensor  # inverse of the sort by global expert on the sending side
    regroup: torch.Tensor  # the sort of received rows by local expert
    send_splits: list[int]  # rows sent to each rank
    receive_splits: list[int]  # rows received from each rank


class AllToAllDispatcher:
    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local_experts = n_experts // self.ep
        self.n_experts = n_experts

    def dispatch(self, x: torch.Tensor, indices: torch.Tensor) -> ExpertParallelDispatched:
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        restore = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        counts = torch.bincount(flat, minlength=self.n_experts)  # rows for each global expert
        # received[s, e]: rows that rank s sends to this rank's local expert e
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, self.local_experts)
        send_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
        receive_splits = received.sum(1).tolist()

        sent = x[order // indices.shape[1]]
        arrived = all_to_all_single_autograd(sent, receive_splits, send_splits, self.group)
        # Arrived rows are grouped by source rank, then local expert; the GEMM wants local expert first.
        local_expert = torch.repeat_interleave(
            torch.arange(self.local_experts, device=x.device).repeat(self.ep), received.flatten())
        regroup = local_expert.argsort(stable=True)
        return ExpertParallelDispatched(arrived[regroup], received.sum(0), restore, regroup, send_splits,
                                        receive_splits)

    def combine(self, y: torch.Tensor, dispatched: ExpertParallelDispatched, k: int) -> torch.Tensor:
        by_source = torch.empty_like(y).index_copy(0, dispatched.regroup, y)  # undo the regrouping
        returned = all_to_all_single_autograd(by_source, dispatched.send_splits, dispatched.receive_splits,
                                              self.group)
        return returned[dispatched.restore].unflatten(0, (-1, k))


def shard_experts(model: Transformer, group: dist.ProcessGroup) -> None:
    """Replace every MoE layer's experts by this rank's shard and its dispatcher by the
    all-to-all one. Call on the meta device, before materialising: init keys each expert by its
    global index, so the shards hold exactly what one process would."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        cfg = moe.cfg
        local = cfg.n_routed_experts // ep
        device = moe.experts.w1.device
        with torch.device(device):
            moe.experts = RoutedExperts(local, cfg.dim, cfg.moe_inter_dim, cfg.init_std, first_expert=rank * local)
        moe.dispatcher = AllToAllDispatcher(group, cfg.n_routed_experts)


# --- Checkpoints that any expert layout can read -------------------------------------------------
# Each routed expert is stored under its own global index ("layers.3.ffn.experts.w1.17"), so a
# checkpoint saved with ep=2 loads with ep=1 or ep=4: every rank asks for the experts it holds.

def expert_tensors(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Fully qualified name of every stacked expert tensor -> (first global expert, local count)."""
    return {f"{name}.{w}": (m.first_expert, m.w1.shape[0])
            for name, m in model.named_modules() if isinstance(m, RoutedExperts) for w in ("w1", "w2", "w3")}


def split_experts(state: dict, experts: dict[str, tuple[int, int]]) -> dict:
    out = {k: v for k, v in state.items() if k not in experts}
    for name, (first, count) in experts.items():
        if name in state:
            out.update({f"{name}.{first + i}": state[name][i] for i in range(count)})
    return out


def join_experts(state: dict, experts: dict[str, tuple[int, int]]) -> dict:
    out = {k: v for k, v in state.items() if not any(k.startswith(name + ".") for name in experts)}
    for name, (first, count) in experts.items():
        if f"{name}.{first}" in state:
            out[name] = torch.stack([state[f"{name}.{first + i}"] for i in range(count)])
    return out


def split_optimizer_experts(state: dict, experts: dict[str, tuple[int, int]]) -> dict:
    """The same split for an optimizer state dict from get_state_dict (per-parameter moments)."""
    per_param = {}
    for name, values in state["state"].items():
        if name not in experts:
            per_param[name] = values
            continue
        first, count = experts[name]
        for i in range(count):
            per_param[f"{name}.{first + i}"] = {k: v[i] if v.dim() > 0 else v for k, v in values.items()}
    return {**state, "state": per_param}


def join_optimizer_experts(state: dict, experts: dict[str, tuple[int, int]]) -> dict:
    per_param = {k: v for k, v in state["state"].items()
                 if not any(k.startswith(name + ".") for name in experts)}
    for name, (first, count) in experts.items():
        if f"{name}.{first}" not in state["state"]:
            continue
        shards = [state["state"][f"{name}.{first + i}"] for i in range(count)]
        per_param[name] = {k: torch.stack([s[k] for s in shards]) if shards[0][k].dim() > 0 else shards[0][k]
                           for k in shards[0]}
    return {**state, "state": per_param}
