"""DeepSeekMoE with auxiliary-loss-free balancing (report section 2.1.2, eqs 12-20; docs/recipe.md).

One MoE layer: a router picks top-k routed experts per token, a dispatcher groups the tokens by
expert, the experts run as one grouped computation, the dispatcher puts the results back in token
order, and they are summed with the router's gates plus the shared experts' output.

The dispatcher is injected, through the ``Dispatcher`` protocol: ``LocalDispatcher`` here, an
all-to-all one over the expert-parallel group from ``dsv3.parallel``. Either may carry a
``DispatchCodec`` (FP8 from ``dsv3.fp8``) that encodes the rows dispatch sends. Nothing in this
file knows about process groups or FP8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .mlp import MLP


class Router(nn.Module):
    """Scores experts in fp32, selects with a bias-corrected score, gates with the raw score."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Per-expert fp32 bias that enters only expert selection; moved by update_expert_bias, no gradient.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts) if cfg.expert_bias else None)
        # Tokens routed to each expert since the last bias update (all micro-batches of a step).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (tokens, dim) -> gates (tokens, k) fp32, expert indices (tokens, k), scores (tokens, E) fp32."""
        cfg = self.cfg
        logits = F.linear(x, self.weight).float()  # a BF16 GEMM under autocast, read out in fp32
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        selection = scores if self.expert_bias is None else scores + self.expert_bias
        if cfg.n_expert_groups > 1:
            selection = self._limit_groups(selection)
        indices = selection.topk(cfg.n_activated_experts, dim=-1).indices
        gates = scores.gather(1, indices)  # raw affinities: the bias never reaches the gate values
        if cfg.score_func == "sigmoid":
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates * cfg.route_scale, indices, scores

    def _limit_groups(self, selection: torch.Tensor) -> torch.Tensor:
        """Keep the n_limited_groups best expert groups (nodes) per token; mask the rest to -inf."""
        cfg = self.cfg
        grouped = selection.view(selection.shape[0], cfg.n_expert_groups, -1)
        # As DeepSeek-V3's reference code: with a bias, the sum of a group's top-2; without, its max.
        group_scores = top_two_sum(grouped) if self.expert_bias is not None else grouped.amax(dim=-1)
        kept = group_scores.topk(cfg.n_limited_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)

    @torch.no_grad()
    def record_load(self, indices: torch.Tensor) -> None:
        self.tokens_per_expert += rows_per_expert(indices.flatten(), self.cfg.n_routed_experts)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.weight, 0.0, self.cfg.init_std, generator=generator)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        self.tokens_per_expert.zero_()


@torch.no_grad()
def update_expert_bias(routers: list[Router], gamma: float,
                       all_reduce: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """End-of-step bias update, b_i += gamma * sign(mean_load - load_i), for every MoE layer.

    Loads are the tokens counted since the last call (every micro-batch of the optimizer step).
    ``all_reduce`` sums them in place over every rank that routes tokens, so each rank applies the
    same update and biases stay identical. Returns each layer's max violation,
    (max_i load_i - mean load) / mean load, and resets the counts.
    """
    if not routers:
        return torch.zeros(0)
    loads = torch.stack([router.tokens_per_expert for router in routers])
    if all_reduce is not None:
        all_reduce(loads)
    mean = loads.mean(dim=-1, keepdim=True)
    for router, load, layer_mean in zip(routers, loads, mean):
        if router.expert_bias is not None and gamma > 0:
            router.expert_bias += gamma * torch.sign(layer_mean - load)
        router.tokens_per_expert.zero_()
    return ((loads.amax(dim=-1, keepdim=True) - mean) / mean.clamp_min(1.0)).squeeze(-1)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float) -> torch.Tensor:
    """Complementary sequence-wise balance loss (report eqs 17-20), averaged over sequences.

    scores: (batch, seq, E) raw affinities; indices: (batch, seq, k) selected experts.
    f_i counts the experts actually selected (with the bias), as common implementations do.
    """
    batch, seq, n_experts = scores.shape
    k = indices.shape[-1]
    selected = torch.zeros(batch, n_experts, device=scores.device, dtype=scores.dtype)
    selected.scatter_add_(1, indices.reshape(batch, seq * k), torch.ones_like(indices.reshape(batch, -1), dtype=scores.dtype))
    f = selected * (n_experts / (k * seq))
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """torch._grouped_mm has a fused kernel on Hopper-class GPUs (compute capability 9.0+)."""
    return (x.is_cuda and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class RoutedExperts(nn.Module):
    """The routed experts' SwiGLU weights as stacked tensors, in ``x @ W`` layout (expert, in, out).

    Holds experts [first_expert, first_expert + n_experts) of the layer: all of them on one
    process, a shard of them under expert parallelism.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, init_std: float, first_expert: int = 0):
        super().__init__()
        self.first_expert = first_expert
        self.init_std = init_std
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (tokens, dim) sorted by expert; counts: (n_experts,) tokens per expert."""
        if grouped_mm_supported(x):
            return self._grouped(x, counts)
        return self._looped(x, counts)

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        offsets = counts.cumsum(0).to(torch.int32)
        x = x.to(dtype)
        w1, w2, w3 = self.w1.to(dtype), self.w2.to(dtype), self.w3.to(dtype)
        h = F.silu(torch._grouped_mm(x, w1, offs=offsets)) * torch._grouped_mm(x, w3, offs=offsets)
        return torch._grouped_mm(h, w2, offs=offsets)

    def _looped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        outputs = []
        for e, tokens in enumerate(x.split(counts.tolist())):
            tokens = tokens.to(dtype)
            h = F.silu(tokens @ self.w1[e].to(dtype)) * (tokens @ self.w3[e].to(dtype))
            outputs.append(h @ self.w2[e].to(dtype))
        return torch.cat(outputs)

    def keep(self, first: int, count: int) -> None:
        """Keep only experts [first, first + count) of the layer (a shard under expert parallelism),
        in place: the module keeps its class, and its weights keep their values (or stay on meta)."""
        start = first - self.first_expert
        for name in ("w1", "w2", "w3"):
            weight = getattr(self, name)
            setattr(self, name, nn.Parameter(weight.detach()[start:start + count].clone(),
                                             requires_grad=weight.requires_grad))
        self.first_expert = first

    def reset_parameters(self, seed: int) -> None:
        """Each expert draws from its own stream, keyed by its global index, so any sharding of
        the experts over ranks initialises exactly what one process would."""
        for local, weights in enumerate(zip(self.w1, self.w2, self.w3)):
            generator = torch.Generator(device=self.w1.device)
            generator.manual_seed((seed * 1_000_003 + self.first_expert + local) % 2**63)
            for w in weights:
                nn.init.normal_(w, 0.0, self.init_std, generator=generator)


@dataclass
class DispatchPlan:
    """Where each token copy goes and how it comes back. Rows are token copies in the router's
    (token, k) order; `order` sorts them by global expert, which also groups them by the rank
    that owns the expert."""
    order: torch.Tensor  # (tokens * k,): the sort by global expert
    restore: torch.Tensor  # its inverse
    k: int
    local_counts: torch.Tensor  # (local experts,): rows each of this rank's experts receives
    send_splits: list[int] | None = None  # rows sent to each ep rank (None: a single rank)
    receive_splits: list[int] | None = None  # rows received from each ep rank
    regroup: torch.Tensor | None = None  # sorts received rows (by source rank) by local expert

    def sort(self, flat: torch.Tensor) -> torch.Tensor:
        """(tokens, dim) -> (tokens * k, dim) copies in send order."""
        return GatherRows.apply(flat, self.order // self.k, self.restore, self.k)

    def to_experts(self, arrived: torch.Tensor) -> torch.Tensor:
        return arrived if self.regroup is None else arrived[self.regroup]

    def from_experts(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.regroup is None else torch.empty_like(y).index_copy(0, self.regroup, y)

    def combine(self, returned: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Expert outputs back in (token, k) order, summed with the gates: (tokens, dim)."""
        routed = GatherRows.apply(returned, self.restore, self.order, 1).unflatten(0, (-1, self.k))
        return (routed * gates.unsqueeze(-1).to(routed.dtype)).sum(dim=1)


def top_two_sum(x: torch.Tensor) -> torch.Tensor:
    """x.topk(2, dim=-1).values.sum(-1), bit for bit (the same two values, added in the same order),
    from two max-reductions, which compile into one fused kernel where topk is a sort per row."""
    first = x.amax(dim=-1, keepdim=True)
    is_first = x == first
    second = x.masked_fill(is_first, float("-inf")).amax(dim=-1, keepdim=True)
    second = torch.where(is_first.sum(dim=-1, keepdim=True) > 1, first, second)  # a tie for first place
    return (first + second).squeeze(-1)


class GatherRows(torch.autograd.Function):
    """rows[index], where each row of `rows` lands at `copies` places (the token copies of the
    top-k) and `inverse` lists those places, row by row: out[inverse[r * copies + c]] = rows[r].
    Backward is then a gather too, grad[inverse] summed over the copies, where plain indexing would
    scatter-add with atomics into an FP32 buffer."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, copies: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return rows[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_rows = grad[inverse]
        if ctx.copies > 1:
            grad_rows = grad_rows.unflatten(0, (-1, ctx.copies)).sum(dim=1)
        return grad_rows, None, None, None


def rows_per_expert(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many entries of `flat` name each expert. Unlike torch.bincount, which reads the
    largest index on the host to size its output, this never waits for the device (and never
    breaks a compiled graph); integer sums are exact, so the result is deterministic."""
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, restore, rows per global expert) for the router's (tokens, k) expert indices."""
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    restore = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, restore, rows_per_expert(flat, n_experts)


class DispatchCodec(Protocol):
    """How dispatch encodes the rows it sends (FP8 with scales) and decodes what arrives."""

    def encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, dim) rows -> (data, scales), both (tokens, ...) so they split like the rows."""

    def decode(self, data: torch.Tensor, scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Rows of `like`'s width and dtype from what encode gave."""


class Handle(Protocol):
    def wait(self) -> object:
        """Blocks until the exchange's result is ready."""


class Dispatcher(Protocol):
    """Moves token copies to the experts that process them (dispatch) and back (combine)."""
    codec: DispatchCodec | None  # encodes what dispatch sends; combine and gradients are never encoded

    def plan(self, indices: torch.Tensor) -> DispatchPlan:
        """The route of the router's (tokens, k) expert indices."""

    def exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False) -> torch.Tensor:
        """Dispatch (or, with back=True, combine) inside autograd."""

    def start_exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False,
                       gradient: bool = False) -> tuple[torch.Tensor, Handle | None]:
        """The exchange outside autograd: (result, handle to wait on before reading it, or None).
        gradient=True: rows are gradients (a backward pass)."""

    def with_codec(self, codec: DispatchCodec | None) -> Dispatcher:
        """The same dispatcher with `codec` encoding what dispatch sends."""


class LocalDispatcher:
    """Single process: every expert is here, so the exchange moves nothing and encodes nothing.
    It keeps its codec for the all-to-all dispatcher that replaces it under expert parallelism."""

    def __init__(self, n_experts: int, codec: DispatchCodec | None = None):
        self.n_experts = n_experts
        self.codec = codec

    def plan(self, indices: torch.Tensor) -> DispatchPlan:
        order, restore, counts = sort_by_expert(indices, self.n_experts)
        return DispatchPlan(order, restore, indices.shape[1], counts)

    def exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False) -> torch.Tensor:
        return rows

    def start_exchange(self, rows: torch.Tensor, plan: DispatchPlan, back: bool = False,
                       gradient: bool = False) -> tuple[torch.Tensor, Handle | None]:
        return rows, None

    def with_codec(self, codec: DispatchCodec | None) -> LocalDispatcher:
        return LocalDispatcher(self.n_experts, codec)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.init_std)
        self.shared_experts = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim)
                               if cfg.n_shared_experts > 0 else None)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.n_routed_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (batch, seq, dim) -> output (batch, seq, dim) and this layer's sequence balance loss.

        Three computations joined by the dispatcher's two exchanges (all-to-alls under expert
        parallelism); a pipeline runs the same three with the exchanges interleaved elsewhere."""
        routed = self.route(x)
        arrived = self.dispatcher.exchange(routed.sent, routed.plan)
        expert_out, shared = self.compute_experts(arrived, routed.flat, routed.plan)
        returned = self.dispatcher.exchange(expert_out, routed.plan, back=True)
        return self.finish(returned, routed.gates, routed.plan, shared).view_as(x), routed.balance_loss

    def route(self, x: torch.Tensor) -> "Routed":
        """Scores, selects, records the load, and sorts the token copies into send order."""
        batch, seq, dim = x.shape
        k = self.cfg.n_activated_experts
        flat = x.reshape(-1, dim)
        gates, indices, scores = self.router(flat)
        if self.training:
            self.router.record_load(indices)
        balance_loss = x.new_zeros((), dtype=torch.float32)
        if self.cfg.seq_aux_alpha > 0:
            balance_loss = sequence_balance_loss(scores.view(batch, seq, -1), indices.view(batch, seq, k),
                                                 self.cfg.seq_aux_alpha)
        plan = self.dispatcher.plan(indices)
        return Routed(flat, gates, plan.sort(flat), plan, balance_loss)

    def compute_experts(self, arrived: torch.Tensor, flat: torch.Tensor,
                        plan: DispatchPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Routed experts on the rows that arrived (in send order again), and the shared experts."""
        expert_out = plan.from_experts(self.experts(plan.to_experts(arrived), plan.local_counts))
        shared = self.shared_experts(flat) if self.shared_experts is not None else None
        return expert_out, shared

    def finish(self, returned: torch.Tensor, gates: torch.Tensor, plan: DispatchPlan,
               shared: torch.Tensor | None) -> torch.Tensor:
        out = plan.combine(returned, gates)
        return out if shared is None else out + shared  # shared output is added unweighted


@dataclass
class Routed:
    flat: torch.Tensor  # (tokens, dim) layer input
    gates: torch.Tensor  # (tokens, k) fp32
    sent: torch.Tensor  # (tokens * k, dim) token copies in send order
    plan: DispatchPlan
    balance_loss: torch.Tensor
