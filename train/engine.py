"""The forward and backward passes of a step, with or without a pipeline: each rank's losses, its
gradients in .grad, and the sums the bias update and the metrics need over the ranks."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch
import torch.distributed as dist

from dsv3.model import ModelConfig, Transformer
from dsv3.parallel.mesh import pipeline_lines
from dsv3.parallel.p2p import StageLinks
from dsv3.parallel.pipeline import Pipeline
from dsv3.parallel.pipeline_cut import Cut
from dsv3.parallel.replicated import Replicas
from dsv3.parallel.runtime import Runtime


def autocast(device: torch.device) -> AbstractContextManager:
    """The compute precision around FP32 master weights: BF16 on CUDA, FP32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class Unpipelined:
    """The whole model (with this rank's experts) on every rank: micro-batches one after another.

    cuda_graphs: the blocks replay CUDA graphs (train.cuda_graphs). A graph writes its outputs,
    the backward's parameter gradients among them, into memory of its own that its next replay
    overwrites. An empty .grad takes the graph's tensor as it is: right for a step of one
    micro-batch (the optimizer consumes it before the next replay, and the step ends by dropping
    it), wrong for several, where the next micro-batch's replay would overwrite it; so a step of
    several allocates every .grad outside the graphs first, for backward to add into (a pass over
    the gradients that one micro-batch does not pay). Each micro-batch tells torch that the
    previous one's outputs are consumed."""

    def __init__(self, model: Transformer, runtime: Runtime, device: torch.device, cuda_graphs: bool = False):
        self.model, self.runtime, self.device, self.cuda_graphs = model, runtime, device, cuda_graphs

    def train_step(self, batches: list[torch.Tensor], mtp_weight: float) -> torch.Tensor:
        """Gradients of the mean loss over the micro-batches in .grad; returns the (main, mtp,
        balance) losses, means over them."""
        if self.cuda_graphs and len(batches) > 1:
            allocate_gradients(self.model)
        losses = torch.zeros(3, device=self.device)
        for batch in batches:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device):
                out = self.model(batch[:, :-1], batch[:, 1:])
                loss = out.total(mtp_weight)
            (loss / len(batches)).backward()
            losses += torch.stack([out.main_loss, out.mtp_loss, out.balance_loss]).detach() / len(batches)
        return losses

    def evaluate(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """The sum of the micro-batches' main losses."""
        total = torch.zeros((), device=self.device)
        for batch in batches:
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(self.device):
                total += self.model(batch[:, :-1], batch[:, 1:]).main_loss.float()
        return total

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        """Router loads over every rank that routes tokens through the same layers."""
        self.runtime.sum_over_stage(loads)

    def every_layer(self, values: torch.Tensor) -> torch.Tensor:
        """Per-router values of this rank -> values of every router of the model."""
        return values


@torch.no_grad()
def allocate_gradients(model: torch.nn.Module) -> None:
    """A zeroed .grad for every trained parameter that has none, for backward to add into."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


class Pipelined:
    """This rank's pipeline stages, run by the schedule of `cut`; losses and layers summed over the
    pipeline, gradients of parameters several pipeline ranks hold summed over them."""

    def __init__(self, model: Transformer, runtime: Runtime, device: torch.device, cut: Cut, overlap: bool,
                 cfg: ModelConfig):
        self.model, self.runtime = model, runtime
        lines, line = pipeline_lines(runtime.mesh)
        self.replicas = Replicas(model, cut, lines, line)
        self.pipeline = Pipeline(model, cut, runtime.pp_rank, StageLinks(cut.placement, lines, line, device),
                                 overlap, partial(autocast, device))
        with torch.device("meta"):  # the whole model's routers, in order, for per-layer metrics
            self.all_router_names = [n for n, m in Transformer(cfg).named_modules() if n.endswith("router")]

    def train_step(self, batches: list[torch.Tensor], mtp_weight: float) -> torch.Tensor:
        losses = self.pipeline.train_step([(b[:, :-1], b[:, 1:]) for b in batches], mtp_weight)
        self.replicas.sum_gradients()
        self.runtime.sum_over_pipeline(losses)
        return losses

    def evaluate(self, batches: list[torch.Tensor]) -> torch.Tensor:
        total = self.pipeline.evaluate([(b[:, :-1], b[:, 1:]) for b in batches])
        self.runtime.sum_over_pipeline(total)
        return total

    def sum_router_loads(self, loads: torch.Tensor) -> None:
        self.runtime.sum_over_stage(loads)
        self.replicas.sum_router_loads(loads)

    def every_layer(self, values: torch.Tensor) -> torch.Tensor:
        """Each pipeline rank holds some layers: its values go in their places, the others' come
        in by a maximum over the pipeline."""
        names = [name for name, m in self.model.named_modules() if name.endswith("router")]
        every = torch.zeros(len(self.all_router_names), device=values.device)
        for name, value in zip(names, values.to(every.device)):
            every[self.all_router_names.index(name)] = value
        dist.all_reduce(every, op=dist.ReduceOp.MAX, group=self.runtime.pp_group)
        return every
