"""Everything a run trains with, built from the config in one pass: each piece from the config and
the pieces before it, passed explicitly.

runtime and device -> the pipeline cut (if any) -> model on the meta device -> materialise,
initialise, FP8 -> forward/backward passes -> AdamW and the layout's gradients.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dsv3.data.config import DataConfig
from dsv3.data.loader import TokenLoader
from dsv3.data.prepare import open_store
from dsv3.data.synthetic import SyntheticLoader
from dsv3.fp8 import FP8Config, convert as convert_to_fp8
from dsv3.model import ModelConfig, Transformer
from dsv3.parallel import runtime as parallel_runtime
from dsv3.parallel.data_parallel import AllReducedGradients, LocalGradients
from dsv3.parallel.expert_parallel import shard_experts
from dsv3.parallel.pipeline_cut import Cut, build_stage_module, split_layers
from dsv3.parallel.runtime import Runtime
from dsv3.parallel.schedules import Placement
from dsv3.parallel.zero import ShardedGradients, build_zero_adamw

from .config import Config
from .engine import Pipelined, Unpipelined
from .optim import build_optimizer

log = logging.getLogger("dsv3.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} asks for CUDA, but no CUDA device is available.")
    return device


def start(cfg: Config) -> tuple[Runtime, torch.device]:
    """This process's runtime (joining the process group of a multi-rank run) and device."""
    device, runtime = parallel_runtime.start(cfg.parallel, cfg.model.n_routed_experts, cfg.train.device)
    return runtime, device or pick_device(cfg.train.device)


def build_model(cfg: ModelConfig, device: torch.device, seed: int, runtime: Runtime, cut: Cut | None = None,
                fp8: FP8Config | None = None) -> Transformer:
    """Construct on the meta device (no memory), keep this rank's pipeline stages, apply expert
    parallelism, then allocate on `device`, initialise, and turn the FP8 layers on."""
    with torch.device("meta"):
        model = Transformer(cfg) if cut is None else build_stage_module(cfg, cut, runtime.pp_rank)
        if runtime.layout.ep > 1:
            shard_experts(model, runtime.ep_group)
    model.to_empty(device=device)
    model.init_weights(seed)
    if fp8 is not None and fp8.enabled:
        convert_to_fp8(model, fp8)
    return model


def build_loader(cfg: DataConfig, model_cfg: ModelConfig, seed: int, runtime: Runtime, split: str = "train"):
    """A loader over `split` of the configured source for this rank's share of each batch (the
    store is prepared on first use, by the first rank while the others wait)."""
    rank, world = runtime.data_rank, runtime.layout.data_parallel
    if cfg.source == "synthetic":
        return SyntheticLoader(model_cfg.vocab_size, cfg.synthetic_branching, cfg.seq_len, seed, rank, world,
                               held_out=split != "train")
    if not runtime.is_main:
        runtime.barrier()  # rank 0 prepares the store
    store = open_store(cfg, seed)
    if runtime.is_main:
        runtime.barrier()
    if store.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"The tokenizer of data store {store.path} has {store.vocab_size} tokens, more than "
                         f"model.vocab_size={model_cfg.vocab_size}.")
    return TokenLoader(store.split(split), cfg.seq_len, seed, rank, world, shuffle=split == "train")


def build_cut(cfg: Config, runtime: Runtime) -> Cut | None:
    """The pipeline's placement of stages and layers; None without a pipeline."""
    if runtime.layout.pp == 1:
        return None
    placement = Placement(cfg.parallel.schedule, runtime.layout.pp)
    layers = split_layers(cfg.model.n_layers, placement.n_model_stages, cfg.parallel.stage_layers)
    return Cut(placement, layers, mtp=cfg.model.mtp_depth > 0)


def compiles(setting: str, device: torch.device, cut: Cut | None) -> bool:
    """Whether train.compile compiles each block: on, or auto on CUDA; never in a pipelined run."""
    wanted = setting == "on" or (setting == "auto" and device.type == "cuda")
    if wanted and cut is not None:
        log.warning("train.compile: blocks stay eager in a pipelined run, which executes them part by part")
    return wanted and cut is None


def check_cuda_graphs(device: torch.device, runtime: Runtime, compiled: bool) -> None:
    """train.cuda_graphs=true: refused where a block cannot be captured as a graph."""
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graphs=true needs a CUDA device; this run is on {device.type}.")
    if runtime.layout.ep > 1:
        raise ValueError("train.cuda_graphs=true needs parallel.ep=1: the expert all-to-all sizes its "
                         "exchanges on the host, which a CUDA graph cannot capture.")
    if not compiled:
        raise ValueError("train.cuda_graphs=true needs compiled blocks, which a pipelined run does not have.")


def build_optimizer_and_gradients(cfg: Config, model: Transformer, runtime: Runtime, device: torch.device,
                                  copies: dict[str, int] | None
                                  ) -> tuple[torch.optim.Optimizer, LocalGradients | AllReducedGradients
                                             | ShardedGradients]:
    """AdamW and the gradients of the layout: local on one process, ZeRO-1's sharded ones
    (parallel.zero) or all-reduced ones on several. copies: parameter name -> pipeline ranks
    holding it, for the global gradient norm."""
    tc = cfg.train
    betas = (tc.beta1, tc.beta2)
    if runtime.layout.world > 1 and cfg.parallel.zero:
        state_dtype = torch.bfloat16 if tc.adam_state_dtype == "bfloat16" else torch.float32
        return build_zero_adamw(model, runtime, tc.schedule.lr, betas, tc.eps, tc.weight_decay, state_dtype, copies)
    optimizer = build_optimizer(model, tc.schedule.lr, betas, tc.eps, tc.weight_decay, tc.adam_state_dtype, device)
    if runtime.layout.world == 1:
        return optimizer, LocalGradients(model.parameters())
    pp_group = runtime.pp_group if runtime.layout.pp > 1 else None
    return optimizer, AllReducedGradients(model, runtime.stage, runtime.mesh.get_group("dp"), runtime.ep_group,
                                          pp_group, copies)


@dataclass
class Parts:
    model: Transformer
    passes: Unpipelined | Pipelined
    optimizer: torch.optim.Optimizer
    gradients: LocalGradients | AllReducedGradients | ShardedGradients
    compiled: bool


def build_parts(cfg: Config, runtime: Runtime, device: torch.device) -> Parts:
    cut = build_cut(cfg, runtime)
    model = build_model(cfg.model, device, cfg.seed, runtime, cut, cfg.fp8)
    model.train()
    compiled, cuda_graphs = compiles(cfg.train.compile, device, cut), cfg.train.cuda_graphs
    if cuda_graphs:
        check_cuda_graphs(device, runtime, compiled)
    if compiled:
        for block in model.blocks():
            block.compile(mode="reduce-overhead" if cuda_graphs else None)
    if cut is None:
        passes, copies = Unpipelined(model, runtime, device, cuda_graphs), None
    else:
        passes = Pipelined(model, runtime, device, cut, cfg.parallel.overlap, cfg.model)
        copies = passes.replicas.copies
    optimizer, gradients = build_optimizer_and_gradients(cfg, model, runtime, device, copies)
    return Parts(model, passes, optimizer, gradients, compiled)
