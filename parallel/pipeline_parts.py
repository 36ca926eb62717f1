"""A pipeline stage as a list of parts, and the runner that runs them forward and backward.

A stage is a list of *parts*, each a computation over some fields of `Values`: per MoE layer
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
"""
from __future__ import annotations

import functools
from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

from dsv3.model import Transformer
from dsv3.model.moe import DispatchPlan, MoE


@dataclass(slots=True)
class Values:
    """What one micro-batch carries through one virtual stage; parts read and write its fields by
    the names they list (slots: a misspelt name fails)."""
    tokens: torch.Tensor  # (batch, seq) inputs
    targets: torch.Tensor  # (batch, seq) next tokens
    x: torch.Tensor | None = None  # the residual stream between blocks
    h: torch.Tensor | None = None  # an MoE block's residual stream after attention
    normed: torch.Tensor | None = None  # its FFN input
    gates: torch.Tensor | None = None  # (tokens, k) router gates
    plan: DispatchPlan | None = None  # the route of the token copies
    sent: torch.Tensor | None = None  # token copies in send order
    arrived: torch.Tensor | None = None  # token copies at their experts
    expert_out: torch.Tensor | None = None  # routed experts' outputs, in send order
    shared: torch.Tensor | None = None  # shared experts' output (None without shared experts)
    returned: torch.Tensor | None = None  # routed experts' outputs back at their tokens' rank
    loss: torch.Tensor | None = None  # the scaled training loss (last stage)


@dataclass
class Part:
    """A computation run(*reads) -> writes (a tuple, in order), or an exchange (moe set) that moves
    reads[0] along reads[1]'s plan into writes[0]."""
    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[..., tuple] | None = None
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


def stage_parts(model: Transformer, layer_ids: range, first: bool, last: bool, step: StepContext) -> list[Part]:
    parts = []
    if first:
        parts.append(Part("embed", ("tokens",), ("x",), lambda tokens: (model.embed(tokens),),
                          list(model.embed.parameters())))
    for i in layer_ids:
        block = model.layers[str(i)]
        if isinstance(block.ffn, MoE):
            parts += _moe_block_parts(block, step)
        else:
            parts.append(Part("dense", ("x",), ("x",), lambda x, b=block: (b(x)[0],), list(block.parameters())))
    if last:
        def head(x, tokens, targets):
            out = model.losses(x, tokens, targets)
            step.record(out.main_loss, out.mtp_loss, out.balance_loss)
            return (out.total(step.mtp_weight) * step.scale,)
        params = [*model.norm.parameters(), *model.head.parameters(), *model.mtp.parameters()]
        if model.mtp:
            params += list(model.embed.parameters())
        parts.append(Part("head", ("x", "tokens", "targets"), ("loss",), head, params))
    return parts


def _moe_block_parts(block, step: StepContext) -> list[Part]:
    moe: MoE = block.ffn

    def attn(x):
        h = block.attention(x)
        normed = block.ffn_norm(h)
        routed = moe.route(normed)
        step.record(balance=routed.balance_loss)
        gates = AttachLoss.apply(routed.gates, routed.balance_loss, step.scale)
        return h, normed, gates, routed.plan, routed.sent

    def mlp(arrived, normed, plan):
        return moe.compute_experts(arrived, normed.flatten(0, 1), plan)

    def finish(h, returned, gates, plan, shared):
        return (h + moe.finish(returned, gates, plan, shared).view_as(h),)

    attn_params = [*block.attn_norm.parameters(), *block.attn.parameters(), *block.ffn_norm.parameters(),
                   *moe.router.parameters()]
    mlp_params = [*moe.experts.parameters(), *(moe.shared_experts.parameters() if moe.shared_experts else [])]
    return [Part("attn", ("x",), ("h", "normed", "gates", "plan", "sent"), attn, attn_params),
            Part("dispatch", ("sent", "plan"), ("arrived",), moe=moe),
            Part("mlp", ("arrived", "normed", "plan"), ("expert_out", "shared"), mlp, mlp_params),
            Part("combine", ("expert_out", "plan"), ("returned",), moe=moe, back=True),
            Part("finish", ("h", "returned", "gates", "plan", "shared"), ("x",), finish)]


@dataclass
class Record:
    """One part's run for one micro-batch: the leaves it read and the tensors it wrote."""
    part: Part
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    plan: DispatchPlan | None = None  # exchange parts: the route, for the gradients' way back


def _not_a_view(value):
    """A part's output as a tensor of its own: FP8 layers return views of their (padded) GEMM output."""
    return value.clone() if torch.is_tensor(value) and value.requires_grad and value._is_view() else value


def _cut(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.is_floating_point())


class StageRunner:
    """Forward and backward of one virtual stage, part by part, as generators that yield a handle
    whenever they start an all-to-all (so a caller can run other work before waiting on it).
    Autocast covers each forward computation only: the generators interleave, and a backward must
    never run inside a forward's autocast region."""

    def __init__(self, parts: list[Part], autocast: Callable[[], AbstractContextManager]):
        self.parts, self.autocast = parts, autocast

    def forward(self, values: Values, records: list[Record] | None) -> Iterator:
        for part in self.parts:
            if part.moe is not None:
                rows, plan = (getattr(values, name) for name in part.reads)
                out, handle = part.moe.dispatcher.start_exchange(rows.detach(), plan, part.back)
                if handle is not None:
                    yield handle
                setattr(values, part.writes[0], out)
                if records is not None:
                    records.append(Record(part, {}, {}, plan))
                continue
            inputs = {}
            for name in part.reads:
                value = getattr(values, name)
                inputs[name] = _cut(value) if records is not None and torch.is_tensor(value) else value
            with self.autocast():
                outputs = dict(zip(part.writes, part.run(*inputs.values()), strict=True))
            if records is not None:  # the split backward detaches outputs in place, which a view refuses
                outputs = {name: _not_a_view(value) for name, value in outputs.items()}
            for name, value in outputs.items():
                setattr(values, name, value)
            if records is not None:
                records.append(Record(part, {k: t for k, t in inputs.items() if torch.is_tensor(t) and t.requires_grad},
                                      {k: t for k, t in outputs.items() if torch.is_tensor(t) and t.requires_grad}))

    def backward(self, records: list[Record], grads: dict[str, torch.Tensor], deferred: list | None) -> Iterator:
        """Consumes `records` in reverse; `grads` holds gradients by field name. With `deferred` (a
        list), weight gradients are not computed but appended there, as functions computing them."""
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
