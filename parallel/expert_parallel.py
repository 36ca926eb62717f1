"""Expert parallelism: every MoE layer's routed experts split over the ranks of the ep group, with
tokens sent to the ranks that own their experts and brought back, dropless.

dispatch: sort this rank's token copies by global expert; exchange how many go to each expert
(an all-to-all of counts); send each rank its tokens with an uneven `all_to_all_single`; regroup
what arrived by local expert for the grouped GEMM.
combine: the same moves in reverse, so outputs come back in the router's (token, k) order.
Both exchanges are autograd-aware: backward sends gradients along the reverse route. With a codec
(FP8 from dsv3.fp8), dispatch sends encoded rows and their scales; combine, and the backward of
dispatch, stay in the compute dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from dsv3.model.moe import DispatchCodec, DispatchPlan, Handle, MoE, RoutedExperts, sort_by_expert
from dsv3.model.transformer import Transformer


class AllToAllDispatcher:
    """The model's Dispatcher (dsv3.model.moe) over the ranks of an expert-parallel group."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int, codec: DispatchCodec | None = None):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local_experts = n_experts // self.ep
        self.n_experts = n_experts
        self.codec = codec

    def with_codec(self, codec: DispatchCodec | None) -> AllToAllDispatcher:
        return AllToAllDispatcher(self.group, self.n_experts, codec)

    def plan(self, indices: torch.Tensor) -> DispatchPlan:
        order, restore, counts = sort_by_expert(indices, self.n_experts)  # rows for each global expert
        # received[s, e]: rows that rank s sends to this rank's local expert e
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(self.ep, self.local_experts)
        send_splits = counts.view(self.ep, self.local_experts).sum(1).tolist()
        # Arrived rows are grouped by source rank, then local expert; the GEMM wants local expert first.
        local_expert = torch.repeat_interleave(
            torch.arange(self.local_experts, device=indices.device).repeat(self.ep), received.flatten())
        return DispatchPlan(order, restore, indices.shape[1], received.sum(0), send_splits,
                            received.sum(1).tolist(), local_expert.argsort(stable=True))

    def _splits(self, plan: DispatchPlan, back: bool) -> tuple[list[int], list[int]]:
        """(output splits, input splits): dispatch sends send_splits, combine sends them back."""
        return (plan.send_splits, plan.receive_splits) if back else (plan.receive_splits, plan.send_splits)

    def exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False) -> torch.Tensor:
        """Dispatch (or, with back=True, combine) as a differentiable all-to-all."""
        if self.codec is not None and not back:
            return _EncodedDispatch.apply(rows, plan, self)
        return all_to_all_single_autograd(rows, *self._splits(plan, back), self.group)

    def start_exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False,
                       gradient: bool = False) -> tuple[torch.Tensor, Handle]:
        """The same all-to-all outside autograd and asynchronous: (result, handle to wait on).
        gradient=True: rows are gradients (a backward pass), which are never encoded."""
        output_splits, input_splits = self._splits(plan, back)
        if self.codec is not None and not back and not gradient:
            return self._start_encoded(rows, output_splits, input_splits)
        return self._start_plain(rows, output_splits, input_splits)

    def _start_plain(self, rows: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        handle = dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=self.group,
                                        async_op=True)
        return out, handle

    def _start_encoded(self, rows: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        data, scales = self.codec.encode(rows)
        data_out = data.new_empty((sum(output_splits), data.shape[1]))
        scales_out = scales.new_empty((sum(output_splits), scales.shape[1]))
        works = [dist.all_to_all_single(data_out, data, output_splits, input_splits, group=self.group,
                                        async_op=True),
                 dist.all_to_all_single(scales_out, scales, output_splits, input_splits, group=self.group,
                                        async_op=True)]
        out = rows.new_empty((sum(output_splits), rows.shape[1]))
        return out, _DecodeWhenDone(works, lambda: out.copy_(self.codec.decode(data_out, scales_out, out)))


class _DecodeWhenDone:
    """A handle whose wait() waits for the exchanges and then decodes what arrived."""

    def __init__(self, works, decode):
        self.works, self.decode = works, decode

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.decode()


class _EncodedDispatch(torch.autograd.Function):
    """Dispatch with the rows encoded (FP8 + scales) on the wire; gradients go back unencoded."""

    @staticmethod
    def forward(ctx, rows, plan, dispatcher):
        ctx.plan, ctx.dispatcher = plan, dispatcher
        out, handle = dispatcher.start_exchange(rows, plan)
        handle.wait()
        return out

    @staticmethod
    def backward(ctx, grad):
        dispatcher = ctx.dispatcher
        out, handle = dispatcher._start_plain(grad.contiguous(), *dispatcher._splits(ctx.plan, back=True))
        handle.wait()
        return out, None, None


def shard_experts(model: Transformer, group: dist.ProcessGroup) -> None:
    """Keep this rank's shard of every MoE layer's experts and give the layer the all-to-all
    dispatcher, with the codec its dispatcher had. The experts keep their class (FP8 or not) and
    the values of their weights, so sharding and FP8 conversion may come in either order; on the
    meta device, before materialising, init keys each expert by its global index, so the shards
    hold exactly what one process would."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        local = moe.cfg.n_routed_experts // ep
        moe.experts.keep(rank * local, local)
        moe.dispatcher = AllToAllDispatcher(group, moe.cfg.n_routed_experts, moe.dispatcher.codec)


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
