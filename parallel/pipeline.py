"""Pipeline parallelism: the engine that runs this rank's actions of a schedule (`schedules.py`).

The model is cut into stages by `pipeline_cut.py`; each virtual stage runs as the parts of
`pipeline_parts.py`, whose runner lets an overlapped F&B action interleave a forward with a
backward around their all-to-alls; activations and gradients cross between ranks on the links of
`p2p.py`; parameters that several ranks hold have their gradients summed by `replicated.py`.
"""
from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from dsv3.model import Transformer

from .p2p import StageLinks
from .pipeline_cut import Cut
from .pipeline_parts import Part, Record, StageRunner, StepContext, Values, run_interleaved, run_to_end, stage_parts
from .schedules import build, forward_only


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
            state.outputs[action.stage, action.mb] = values.x
            self._send_forward(state, action.stage, action.mb)
        self.links.wait_sends()
        return step.sums[0]

    # --- actions -----------------------------------------------------------------------------------

    def _stage_inputs(self, state: "_StepState", stage: int, mb: int) -> Values:
        tokens, targets = state.micro_batches[mb]
        values = Values(tokens, targets)
        prev = self.placement.prev(stage)
        if prev is not None:
            if self.placement.rank(prev) == self.rank:
                values.x = state.outputs.pop((prev, mb))
            else:
                buffer = torch.empty((*tokens.shape, self.dim), dtype=self.dtype, device=tokens.device)
                values.x = self.links.receive(buffer, self.placement.rank(prev), self.rank, "activation")
        return values

    def _forward(self, runners, state: "_StepState", stage: int, mb: int) -> Iterator:
        values = self._stage_inputs(state, stage, mb)
        records: list[Record] = []
        yield from runners[stage].forward(values, records)
        state.records[stage, mb] = records
        if not self.placement.is_last(stage):
            state.outputs[stage, mb] = values.x

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
