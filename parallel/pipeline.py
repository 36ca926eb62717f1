"""Pipeline parallelism: the model cut into stages, run by a schedule from `schedules.py`.

Cutting. Layers are split into model stages by `parallel.stage_layers` (default: as even as
possible). The embedding sits with the first stage; the final norm, head and MTP modules with the
last, which also needs the embedding for MTP: on V placements (zbv, dualpipev) and in DualPipe the
first and last stages share a rank and so the embedding physically; with 1f1b the last rank holds a
replica. Each rank builds one module, a `Transformer` that keeps only what its stages need, under
the full model's parameter names; so checkpoints, ZeRO and expert sharding treat it like any model,
and any pipeline layout loads any other's checkpoint. Parameters held by several pipeline ranks
(DualPipe's two copies of every stage, the 1f1b embedding replica) have their gradients summed
over those ranks.

Running. A stage is a list of *parts*, each a computation over named tensors: per MoE layer
  attn      attention, the router, the balance loss, sorting token copies by expert
  dispatch  all-to-all of token copies to the ranks that own their experts
  mlp       routed experts (grouped GEMM) and shared experts
  combine   all-to-all of expert outputs back
  finish    gate-weighted sum and residual
(dense layers, the embedding and the loss head are one part each). The autograd graph is cut at
every part boundary, so the backward of one part can run on its own: this is what lets an
overlapped F&B action interleave the forward of one micro-batch with the backward of another,
part by part, starting each all-to-all asynchronously and computing the other micro-batch while it
is in flight (DeepSeek-V3's order: combine(B), attn(F), mlp(B), dispatch(F), dispatch(B), mlp(F),
attn(B), combine(F)). Backward may also stop at input gradients (I) and leave the weight
gradients (W) to a FIFO, with torch.distributed.pipelining's `stage_backward_input` and
`stage_backward_weight`.

Stage-to-stage tensors travel by point-to-point sends on 2-rank groups, one per (sender,
receiver, activations | gradients): each such group carries one stream of tensors in micro-batch
order, so sends and receives can never be matched out of order, whatever the schedule.
"""
from __future__ import annotations

import functools
import itertools
from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from dsv3.model import ModelConfig, Transformer
from dsv3.model.moe import MoE

from .schedules import Placement, build, forward_only


# --- cutting the model ---------------------------------------------------------------------------

def split_layers(n_layers: int, n_stages: int, stage_layers: list[int]) -> list[range]:
    """The layer indices of each model stage."""
    if stage_layers:
        if len(stage_layers) != n_stages:
            raise ValueError(f"parallel.stage_layers has {len(stage_layers)} entries, but this schedule has "
                             f"{n_stages} model stages.")
        if sum(stage_layers) != n_layers or min(stage_layers) < 1:
            raise ValueError(f"parallel.stage_layers={list(stage_layers)} must be positive and sum to "
                             f"model.n_layers={n_layers}.")
        counts = list(stage_layers)
    else:
        if n_layers < n_stages:
            raise ValueError(f"model.n_layers={n_layers} cannot be split into {n_stages} pipeline stages of at "
                             f"least one layer each.")
        counts = [n_layers // n_stages + (s < n_layers % n_stages) for s in range(n_stages)]
    bounds = [0, *itertools.accumulate(counts)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


@dataclass(frozen=True)
class Cut:
    """A pipeline layout: the placement of virtual stages and each model stage's layers."""
    placement: Placement
    layers: list[range]  # per model stage
    mtp: bool  # the model has MTP modules (so the last stage needs the embedding)

    def holders(self, name: str) -> list[int]:
        """The pipeline ranks whose module holds the parameter or buffer `name`."""
        p = self.placement
        last = p.n_model_stages - 1
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            model_stages = [s for s, r in enumerate(self.layers) if layer in r]
        elif name.startswith("embed."):
            model_stages = [0, last] if self.mtp else [0]
        else:  # norm, head, mtp
            model_stages = [last]
        return sorted({p.rank(v) for v in range(p.n_stages) if p.model_stage(v) in model_stages})


def build_stage_module(cfg: ModelConfig, cut: Cut, rank: int) -> Transformer:
    """This rank's part of the model, on the current device (call under torch.device('meta'))."""
    model = Transformer(cfg)
    for name in list(model.layers.keys()):
        if rank not in cut.holders(f"layers.{name}."):
            del model.layers[name]
    if rank not in cut.holders("embed."):
        model.embed = None
    if rank not in cut.holders("head."):
        model.norm = model.head = None
        model.mtp = nn.ModuleList()
    return model


# --- running a stage as parts ---------------------------------------------------------------------

@dataclass
class Part:
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[dict], dict] | None = None  # compute: values by name -> new values by name
    params: list[nn.Parameter] = field(default_factory=list)
    moe: MoE | None = None  # exchange parts: whose dispatcher moves the rows
    back: bool = False  # exchange parts: combine (True) or dispatch (False)


class AttachLoss(torch.autograd.Function):
    """Returns a copy of `x`; in backward also gives `loss` the gradient `scale`, so a loss computed
    inside a stage (the MoE balance loss) is trained without travelling to the last stage. (A copy,
    not a view: part outputs must not be views. It is attached to the small gates tensor.)"""

    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.scale, ctx.loss_meta = scale, (loss.shape, loss.dtype, loss.device)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def stage_parts(model: Transformer, layer_ids: range, first: bool, last: bool, step: "StepContext") -> list[Part]:
    parts = []
    if first:
        parts.append(Part("embed", ("tokens",), ("x",), lambda v: {"x": model.embed(v["tokens"])},
                          list(model.embed.parameters())))
    for i in layer_ids:
        block = model.layers[str(i)]
        if isinstance(block.ffn, MoE):
            parts += _moe_block_parts(block, step)
        else:
            parts.append(Part("dense", ("x",), ("x",), lambda v, b=block: {"x": b(v["x"])[0]},
                              list(block.parameters())))
    if last:
        def head(v):
            out = model.losses(v["x"], v["tokens"], v["targets"])
            step.record(out.main_loss, out.mtp_loss, out.balance_loss)
            loss = out.main_loss + step.mtp_weight * out.mtp_loss + out.balance_loss
            return {"loss": loss * step.scale}
        params = [*model.norm.parameters(), *model.head.parameters(), *model.mtp.parameters()]
        if model.mtp:
            params += list(model.embed.parameters())
        parts.append(Part("head", ("x", "tokens", "targets"), ("loss",), head, params))
    return parts


def _moe_block_parts(block, step: "StepContext") -> list[Part]:
    moe: MoE = block.ffn

    def attn(v):
        h = block.attention(v["x"])
        normed = block.ffn_norm(h)
        routed = moe.route(normed)
        step.record(balance=routed.balance_loss)
        gates = AttachLoss.apply(routed.gates, routed.balance_loss, step.scale)
        return {"h": h, "normed": normed, "gates": gates, "sent": routed.sent, "plan": routed.plan}

    def mlp(v):
        expert_out, shared = moe.compute_experts(v["arrived"], v["normed"].flatten(0, 1), v["plan"])
        return {"expert_out": expert_out} if shared is None else {"expert_out": expert_out, "shared": shared}

    def finish(v):
        return {"x": v["h"] + moe.finish(v["returned"], v["gates"], v["plan"], v.get("shared")).view_as(v["h"])}

    attn_params = [*block.attn_norm.parameters(), *block.attn.parameters(), *block.ffn_norm.parameters(),
                   *moe.router.parameters()]
    mlp_params = [*moe.experts.parameters(), *(moe.shared_experts.parameters() if moe.shared_experts else [])]
    shared = ("shared",) if moe.shared_experts is not None else ()
    return [Part("attn", ("x",), ("h", "normed", "gates", "sent"), attn, attn_params),
            Part("dispatch", ("sent",), ("arrived",), moe=moe),
            Part("mlp", ("arrived", "normed"), ("expert_out", *shared), mlp, mlp_params),
            Part("combine", ("expert_out",), ("returned",), moe=moe, back=True),
            Part("finish", ("h", "returned", "gates", *shared), ("x",), finish)]


@dataclass
class StepContext:
    """What the parts of one step share: loss scaling and the running loss sums."""
    scale: float  # 1 / micro-batches: the step's loss is the mean over micro-batches
    mtp_weight: float
    sums: torch.Tensor  # main, mtp, balance: sums over micro-batches, detached

    def record(self, main=None, mtp=None, balance=None) -> None:
        for i, value in enumerate((main, mtp, balance)):
            if value is not None:
                self.sums[i] += value.detach().float()


@dataclass
class Record:
    """One part's run for one micro-batch: the leaves it read and the tensors it wrote."""
    part: Part
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    plan: object = None


def _cut(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.is_floating_point())


class StageRunner:
    """Forward and backward of one virtual stage, part by part, as generators that yield a handle
    whenever they start an all-to-all (so a caller can run other work before waiting on it).
    Autocast covers each forward computation only: the generators interleave, and a backward must
    never run inside a forward's autocast region."""

    def __init__(self, parts: list[Part], autocast: Callable[[], AbstractContextManager]):
        self.parts, self.autocast = parts, autocast

    def forward(self, values: dict, records: list[Record] | None) -> Iterator:
        for part in self.parts:
            if part.moe is not None:
                plan = values["plan"]
                out, handle = part.moe.dispatcher.start_exchange(values[part.reads[0]].detach(), plan, part.back)
                if handle is not None:
                    yield handle
                values[part.writes[0]] = out
                if records is not None:
                    records.append(Record(part, {}, {}, plan))
                continue
            inputs = {k: _cut(values[k]) if records is not None and torch.is_tensor(values[k]) else values[k]
                      for k in part.reads}
            with self.autocast():
                outputs = part.run({**values, **inputs})
            values.update(outputs)
            if records is not None:
                grads_flow = {k: t for k, t in outputs.items() if k in part.writes and t.requires_grad}
                records.append(Record(part, {k: t for k, t in inputs.items() if torch.is_tensor(t)
                                             and t.requires_grad}, grads_flow))

    def backward(self, records: list[Record], grads: dict, deferred: list | None) -> Iterator:
        """Consumes `records` in reverse; `grads` holds gradients by name. With `deferred` (a list),
        weight gradients are not computed but appended there, as functions computing them."""
        while records:
            record = records.pop()
            part = record.part
            if part.moe is not None:
                grad = grads.pop(part.writes[0])
                out, handle = part.moe.dispatcher.start_exchange(grad, record.plan, not part.back, gradient=True)
                if handle is not None:
                    yield handle
                _accumulate(grads, part.reads[0], out)
                continue
            outputs, output_grads = [], []
            for name, tensor in record.outputs.items():
                grad = grads.pop(name, None)
                if grad is not None:
                    outputs.append(tensor)
                    output_grads.append(grad)
            if not outputs:
                continue
            leaves = list(record.inputs.values())
            if deferred is not None and part.params and not leaves:  # the embedding: all of it is W
                deferred.append(functools.partial(torch.autograd.backward, outputs, output_grads))
            elif deferred is not None and part.params:
                _, param_groups = stage_backward_input(outputs, output_grads, leaves, iter(part.params))
                deferred.append(functools.partial(stage_backward_weight, iter(part.params), param_groups))
            else:
                torch.autograd.backward(outputs, output_grads)
            for name, leaf in record.inputs.items():
                if leaf.grad is not None:
                    _accumulate(grads, name, leaf.grad)


def _accumulate(grads: dict, name: str, grad: torch.Tensor) -> None:
    grads[name] = grad if name not in grads else grads[name] + grad


def run_to_end(steps: Iterator) -> None:
    for handle in steps:
        handle.wait()


def run_interleaved(first: Iterator, second: Iterator) -> None:
    """Alternates two part sequences: each runs until it has started an all-to-all, then the other
    runs while that one is in flight; a sequence resumes after waiting on its own handle."""
    pending = {}
    active = deque([first, second])
    while active:
        steps = active.popleft()
        handle = pending.pop(id(steps), None)
        if handle is not None:
            handle.wait()
        try:
            pending[id(steps)] = next(steps)
        except StopIteration:
            continue
        active.append(steps)


# --- point-to-point between stages ---------------------------------------------------------------

class StageLinks:
    """Sends and receives between pipeline ranks on dedicated 2-rank groups (see module doc)."""

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


# --- parameters held by several pipeline ranks ------------------------------------------------------

class Replicas:
    """Sums the gradients (and router loads) of parameters that several pipeline ranks hold, and
    says how many copies of each exist, so a global gradient norm counts each parameter once."""

    def __init__(self, model: nn.Module, cut: Cut, pp_lines: list[list[int]], my_line: list[int]):
        self.copies = {name: len(cut.holders(name)) for name, _ in model.named_parameters()}
        holder_sets = sorted({tuple(cut.holders(name)) for name in _all_names(cut)} - {()}, key=str)
        groups = {}
        for line in pp_lines:  # every rank creates every group, in the same order
            for holders in holder_sets:
                if len(holders) > 1:
                    group = dist.new_group([line[h] for h in holders])
                    if line == my_line:
                        groups[holders] = group
        by_holders: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            holders = tuple(cut.holders(name))
            if len(holders) > 1:
                by_holders.setdefault(holders, []).append(param)
        self.param_groups = [(params, groups[h]) for h, params in sorted(by_holders.items())]  # (params, group)
        router_holders = {tuple(cut.holders(name)) for name, m in model.named_modules() if name.endswith("router")}
        self.router_group = groups.get(next(iter(router_holders))) if len(router_holders) == 1 else None
        if len(router_holders) > 1 and any(len(h) > 1 for h in router_holders):
            raise ValueError("routers held by different sets of pipeline ranks on one rank are not supported.")

    @torch.no_grad()
    def sum_gradients(self) -> None:
        for params, group in self.param_groups:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g.view_as(p)

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        if self.router_group is not None:
            dist.all_reduce(loads, group=self.router_group)


def _all_names(cut: Cut) -> list[str]:
    n_layers = cut.layers[-1].stop
    return [f"layers.{i}." for i in range(n_layers)] + ["embed.", "head."]


# --- the engine ------------------------------------------------------------------------------------

class Pipeline:
    """Runs this rank's actions of a schedule over the micro-batches of one step."""

    def __init__(self, model: Transformer, cut: Cut, rank: int, links: StageLinks, overlap: bool,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        self.model, self.cut, self.rank, self.links = model, cut, rank, links
        self.placement = cut.placement
        self.overlap, self.autocast = overlap, autocast
        self.stages = self.placement.stages_of(rank)
        self.dtype = next(model.parameters()).dtype
        self.dim = model.cfg.dim

    def _parts(self, stage: int, step: StepContext) -> list[Part]:
        p = self.placement
        return stage_parts(self.model, self.cut.layers[p.model_stage(stage)], p.is_first(stage), p.is_last(stage),
                           step)

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], mtp_weight: float) -> torch.Tensor:
        """Forward and backward of every micro-batch; gradients accumulate in .grad (scaled to the
        mean over micro-batches). Returns this rank's sums of (main, mtp, balance) losses / n."""
        n = len(micro_batches)
        device = next(self.model.parameters()).device
        step = StepContext(1.0 / n, mtp_weight, torch.zeros(3, device=device))
        runners = {s: StageRunner(self._parts(s, step), self.autocast) for s in self.stages}
        orders = build(self.placement.schedule, self.placement.pp, n)[self.rank]
        state = _StepState(micro_batches)
        for action in orders:
            if action.kind == "F":
                run_to_end(self._forward(runners, state, action.stage, action.mb))
                self._send_forward(state, action.stage, action.mb)
            elif action.kind in ("B", "I"):
                run_to_end(self._backward(runners, state, action.stage, action.mb, action.kind == "I"))
                self._send_backward(state, action.stage, action.mb)
            elif action.kind == "W":
                for weight_gradients in state.deferred.popleft():
                    weight_gradients()
            else:  # FB
                f, b = action.forward, action.backward
                forward = self._forward(runners, state, f.stage, f.mb)
                backward = self._backward(runners, state, b.stage, b.mb, False)
                if self.overlap:
                    run_interleaved(backward, forward)  # DeepSeek-V3's pair starts with combine(B)
                else:
                    run_to_end(forward)
                    run_to_end(backward)
                self._send_forward(state, f.stage, f.mb)
                self._send_backward(state, b.stage, b.mb)
        self.links.wait_sends()
        assert not state.deferred and not state.records, "the schedule left work undone"
        return step.sums * step.scale

    @torch.no_grad()
    def evaluate(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Sum over micro-batches of the main loss (nonzero on the ranks holding the last stage)."""
        device = next(self.model.parameters()).device
        step = StepContext(1.0, 0.0, torch.zeros(3, device=device))
        runners = {s: StageRunner(self._parts(s, step), self.autocast) for s in self.stages}
        state = _StepState(micro_batches)
        for action in forward_only(self.placement, len(micro_batches))[self.rank]:
            values = self._stage_inputs(state, action.stage, action.mb)
            run_to_end(runners[action.stage].forward(values, None))
            state.outputs[action.stage, action.mb] = values.get("x")
            self._send_forward(state, action.stage, action.mb)
        self.links.wait_sends()
        return step.sums[0]

    # --- actions -----------------------------------------------------------------------------------

    def _stage_inputs(self, state: "_StepState", stage: int, mb: int) -> dict:
        tokens, targets = state.micro_batches[mb]
        values = {"tokens": tokens, "targets": targets}
        prev = self.placement.prev(stage)
        if prev is not None:
            if self.placement.rank(prev) == self.rank:
                values["x"] = state.outputs.pop((prev, mb))
            else:
                buffer = torch.empty((*tokens.shape, self.dim), dtype=self.dtype, device=tokens.device)
                values["x"] = self.links.receive(buffer, self.placement.rank(prev), self.rank, "activation")
        return values

    def _forward(self, runners, state: "_StepState", stage: int, mb: int) -> Iterator:
        values = self._stage_inputs(state, stage, mb)
        records: list[Record] = []
        yield from runners[stage].forward(values, records)
        state.records[stage, mb] = records
        if not self.placement.is_last(stage):
            state.outputs[stage, mb] = values["x"]

    def _send_forward(self, state: "_StepState", stage: int, mb: int) -> None:
        nxt = self.placement.next(stage)
        if nxt is not None and self.placement.rank(nxt) != self.rank:
            self.links.send(state.outputs.pop((stage, mb)).to(self.dtype), self.rank, self.placement.rank(nxt),
                            "activation")

    def _backward(self, runners, state: "_StepState", stage: int, mb: int, defer_weights: bool) -> Iterator:
        records = state.records.pop((stage, mb))
        nxt = self.placement.next(stage)
        if nxt is None:
            grads = {"loss": torch.ones((), device=records[-1].outputs["loss"].device)}
        elif self.placement.rank(nxt) == self.rank:
            grads = {"x": state.input_grads.pop((nxt, mb))}
        else:
            output = records[-1].outputs["x"]
            buffer = torch.empty(output.shape, dtype=self.dtype, device=output.device)
            grads = {"x": self.links.receive(buffer, self.placement.rank(nxt), self.rank, "gradient")}
        deferred = [] if defer_weights else None
        yield from runners[stage].backward(records, grads, deferred)
        if deferred is not None:
            state.deferred.append(deferred)
        if not self.placement.is_first(stage):
            state.input_grads[stage, mb] = grads.pop("x")

    def _send_backward(self, state: "_StepState", stage: int, mb: int) -> None:
        prev = self.placement.prev(stage)
        if prev is not None and self.placement.rank(prev) != self.rank:
            self.links.send(state.input_grads.pop((stage, mb)).to(self.dtype), self.rank, self.placement.rank(prev),
                            "gradient")


@dataclass
class _StepState:
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]]
    records: dict = field(default_factory=dict)  # (stage, mb) -> records of the forward, until backward
    outputs: dict = field(default_factory=dict)  # (stage, mb) -> activation for the next stage
    input_grads: dict = field(default_factory=dict)  # (stage, mb) -> gradient for the previous stage
    deferred: deque = field(default_factory=deque)  # weight gradients waiting for W actions
