"""Build a run from the config and train it.

recipe -> model on the meta device -> materialise and initialise -> AdamW -> resume from the newest
complete checkpoint -> steps of (micro-batches -> clip -> step -> router-bias update -> metrics)
-> checkpoints every N steps, on SIGTERM/SIGUSR1, and at the end.
"""
from __future__ import annotations

import logging
import math
import resource
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from dsv3.data.config import DataConfig
from dsv3.data.loader import TokenLoader
from dsv3.data.prepare import open_store
from dsv3.data.synthetic import SyntheticLoader
from dsv3.fp8 import FP8Config, convert as convert_to_fp8
from dsv3.model import ModelConfig, Transformer, count, update_expert_bias
from dsv3.parallel import runtime as parallel_runtime
from dsv3.parallel.expert_parallel import (expert_tensors, join_experts, join_optimizer_experts, shard_experts,
                                           split_experts, split_optimizer_experts)
from dsv3.parallel.mesh import Layout, pipeline_lines
from dsv3.parallel.p2p import StageLinks
from dsv3.parallel.pipeline import Pipeline
from dsv3.parallel.pipeline_cut import Cut, build_stage_module, split_layers
from dsv3.parallel.replicated import Replicas
from dsv3.parallel.runtime import Runtime
from dsv3.parallel.schedules import Placement
from dsv3.parallel.zero import ZeroAdamW, build_zero_adamw

from .run_dir import CONFIG as RUN_CONFIG
from .run_dir import differences, holds_run, move_run_aside, refuse_if_different, saved_config, write_config
from .checkpoint import Checkpointer, first_line, step_of
from .config import Config
from .metrics import MetricsLog
from .optim import build_optimizer, clipped_step
from .schedule import run_schedule, steps_for

log = logging.getLogger("dsv3.train")

# Dense BF16 peak of known GPUs in TFLOPS (datasheets, SXM parts), for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} asks for CUDA, but no CUDA device is available.")
    return device


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    return None


def build_model(cfg: ModelConfig, device: torch.device, seed: int, runtime: Runtime | None = None,
                cut: Cut | None = None, fp8: FP8Config | None = None) -> Transformer:
    """Construct on the meta device (no memory), keep this rank's pipeline stages, apply expert
    parallelism, then allocate on `device`, initialise, and turn the FP8 layers on."""
    with torch.device("meta"):
        model = Transformer(cfg) if cut is None else build_stage_module(cfg, cut, runtime.pp_rank)
        if runtime is not None and runtime.layout.ep > 1:
            shard_experts(model, runtime.ep_group)
    model.to_empty(device=device)
    model.init_weights(seed)
    if fp8 is not None and fp8.enabled:
        convert_to_fp8(model, fp8)
    return model


def build_loader(cfg: DataConfig, model_cfg: ModelConfig, seed: int, split: str = "train",
                 runtime: Runtime | None = None):
    """A loader over `split` of the configured source for this rank's share of each batch (the
    store is prepared on first use, by the first rank while the others wait)."""
    rank, world = (runtime.data_rank, runtime.layout.data_parallel) if runtime else (0, 1)
    if cfg.source == "synthetic":
        return SyntheticLoader(model_cfg.vocab_size, cfg.synthetic_branching, cfg.seq_len, seed, rank, world,
                               held_out=split != "train")
    if runtime is not None and not runtime.is_main:
        runtime.barrier()  # rank 0 prepares the store
    store = open_store(cfg, seed)
    if runtime is not None and runtime.is_main:
        runtime.barrier()
    if store.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"The tokenizer of data store {store.path} has {store.vocab_size} tokens, more than "
                         f"model.vocab_size={model_cfg.vocab_size}.")
    return TokenLoader(store.split(split), cfg.seq_len, seed, rank, world, shuffle=split == "train")


@dataclass
class ReadAhead:
    """A step's batches read before it starts, and the loader's state from before reading them."""
    batch_size: int
    loader_state: dict
    batches: list[torch.Tensor]


class StopSignals:
    """Records SIGTERM / SIGUSR1 (what SLURM sends before a time limit) so the loop can finish
    its step, save and exit cleanly; restores the previous handlers on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train
        device, self.runtime = parallel_runtime.start(cfg.parallel, cfg.model.n_routed_experts, tc.device)
        self.device = device or pick_device(tc.device)
        layout = self.runtime.layout if self.runtime else Layout(1, 1, 1)
        self.data_parallel = layout.data_parallel
        self.schedule = run_schedule(cfg, layout)  # checks every step's batch before anything is built
        self.total_steps = tc.steps or steps_for(self.schedule)
        self.is_main = self.runtime is None or self.runtime.is_main
        if not self.is_main:
            logging.getLogger("dsv3").setLevel(logging.WARNING)
        self.run_dir = Path(tc.run_dir)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else nullcontext())
        self.cut = self._cut()
        self.model = self._model()
        self.optimizer = self._optimizer()
        self.loader = build_loader(cfg.data, cfg.model, cfg.seed, runtime=self.runtime)
        self._ahead: ReadAhead | None = None  # the next step's batches, read while the device works
        self.step = 0
        self.tokens = 0
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", tc.keep_checkpoints, tc.async_checkpoint,
                                         self.runtime)
        counts = count(cfg.model, cfg.data.seq_len)
        self.flop_per_token = counts.flop_per_token + counts.mtp_flop_per_token
        self.peak_flops = peak_flops(self.device, tc.peak_tflops)

    def _cut(self) -> Cut | None:
        if self.runtime is None or self.runtime.layout.pp == 1:
            return None
        with torch.device("meta"):  # the whole model's routers, in order, for per-layer metrics
            self.all_router_names = [n for n, m in Transformer(self.cfg.model).named_modules() if n.endswith("router")]
        placement = Placement(self.cfg.parallel.schedule, self.runtime.layout.pp)
        layers = split_layers(self.cfg.model.n_layers, placement.n_model_stages, self.cfg.parallel.stage_layers)
        return Cut(placement, layers, mtp=self.cfg.model.mtp_depth > 0)
    def _model(self) -> Transformer:
        model = build_model(self.cfg.model, self.device, self.cfg.seed, self.runtime, self.cut, self.cfg.fp8)
        model.train()
        if self.compiled:
            for block in model.blocks():
                block.compile()
        self.routers = model.routers()
        self.pipeline = self.replicas = None
        if self.cut is not None:
            lines, line = pipeline_lines(self.runtime.mesh)
            self.replicas = Replicas(model, self.cut, lines, line)
            autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.device.type == "cuda"
                        else nullcontext)
            self.pipeline = Pipeline(model, self.cut, self.runtime.pp_rank, StageLinks(self.cut.placement, lines, line, self.device),
                                     self.cfg.parallel.overlap, autocast)
        if self.runtime is not None:
            self.runtime.attach(model, self.replicas.copies if self.replicas else None)
        return model

    def _optimizer(self) -> torch.optim.Optimizer | ZeroAdamW:
        tc = self.cfg.train
        betas = (tc.beta1, tc.beta2)
        if self.runtime is not None and self.cfg.parallel.zero:
            state_dtype = torch.bfloat16 if tc.adam_state_dtype == "bfloat16" else torch.float32
            return build_zero_adamw(self.model, self.runtime, tc.schedule.lr, betas, tc.eps, tc.weight_decay,
                                    state_dtype, self.replicas.copies if self.replicas else None)
        return build_optimizer(self.model, tc.schedule.lr, betas, tc.eps, tc.weight_decay, tc.adam_state_dtype,
                               self.device)

    @property
    def compiled(self) -> bool:
        setting = self.cfg.train.compile
        wanted = setting == "on" or (setting == "auto" and self.device.type == "cuda")
        if wanted and self.cut is not None:
            log.warning("train.compile: blocks stay eager in a pipelined run, which executes them part by part")
        return wanted and self.cut is None

    @property
    def zero(self) -> bool:
        return isinstance(self.optimizer, ZeroAdamW)

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs; routed experts stored one per key, so any expert layout
        can load it."""
        experts = expert_tensors(self.model)
        model = split_experts(get_model_state_dict(self.model), experts)
        moments = (self.optimizer.state_dict() if self.zero else get_state_dict(self.model, self.optimizer)[1])
        optimizer = split_optimizer_experts({"state": moments["state"]}, experts)  # per parameter, any layout
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        loader = self._ahead.loader_state if self._ahead is not None else self.loader.state_dict()
        trainer = {"step": self.step, "tokens": self.tokens, "loader": loader, "rng": rng}
        return {"model": model, "optimizer": optimizer, "trainer": trainer}

    def load_state_dict(self, state: dict) -> None:
        experts = expert_tensors(self.model)
        set_model_state_dict(self.model, join_experts(state["model"], experts))
        moments = join_optimizer_experts(state["optimizer"], experts)
        if self.zero:
            self.optimizer.load_state_dict(moments)
        else:
            full = get_state_dict(self.model, self.optimizer)[1]
            set_optimizer_state_dict(self.model, self.optimizer, {**full, "state": moments["state"]})
        trainer = state["trainer"]
        self.step, self.tokens = int(trainer["step"]), int(trainer["tokens"])
        self.loader.load_state_dict(trainer["loader"])
        self._ahead = None
        torch.set_rng_state(trainer["rng"]["cpu"])
        if "cuda" in trainer["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(trainer["rng"]["cuda"], self.device)

    def config_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self.cfg))

    def resume(self) -> None:
        """Continues the run in train.run_dir, or refuses to start in it. train.resume=auto: the
        newest complete checkpoint that verifies and loads (one that does not is moved aside with
        a warning naming it), if the settings that define the run are unchanged; never: a new run,
        refused if the directory already holds one; fresh: a new run, the old one moved aside;
        PATH: that checkpoint (of this run or another with the same model), or a clear error."""
        tc = self.cfg.train
        if tc.resume in ("never", "fresh"):
            if holds_run(self.run_dir):
                if tc.resume == "never":
                    raise ValueError(f"train.run_dir={self.run_dir} already holds a run and train.resume=never "
                                     "would write over it: continue it with train.resume=auto, move it aside and "
                                     "start over with train.resume=fresh, or choose another train.run_dir.")
                if self.is_main:
                    log.warning("train.resume=fresh: moved the previous run to %s", move_run_aside(self.run_dir))
                self._barrier()
            return
        explicit = tc.resume != "auto"
        if explicit and Path(tc.resume).resolve().parent != self.checkpointer.directory.resolve() \
                and holds_run(self.run_dir):
            raise ValueError(f"train.run_dir={self.run_dir} already holds a run, and train.resume={tc.resume} "
                             "belongs to another: start from that checkpoint in a new train.run_dir.")
        requested = self.config_yaml()
        candidates = [Path(tc.resume)] if explicit else self.checkpointer.complete()
        for path in candidates:
            try:
                self.checkpointer.verify(path)
                saved = self.checkpointer.saved_config(path)
            except Exception as error:
                self._unusable(path, error)
                continue
            if saved is not None:  # checked before loading: a changed run is refused, not skipped
                self._refuse_changed_settings(path, saved, requested, explicit)
            try:
                state = self.state_dict()
                self.checkpointer.load(path, state)
                self.load_state_dict(state)
            except Exception as error:  # a torn or foreign checkpoint fails in many ways
                self._unusable(path, error)
                continue
            for newer in [p for p in self.checkpointer.complete() if step_of(p) > self.step]:
                log.warning("checkpoint %s is newer than the one resumed; moved it to %s", newer,
                            self.checkpointer.move_aside(newer, "superseded"))
            log.info("resumed from %s at step %d (%d tokens)", path, self.step, self.tokens)
            return
        saved = saved_config(self.run_dir)  # a run stopped before its first checkpoint
        if saved is not None:
            refuse_if_different(self.run_dir, saved, requested, RUN_CONFIG)
        if candidates:  # every load failed, possibly half-way: start from a clean slate
            self.model = self._model()
            self.optimizer = self._optimizer()
            self.loader.load_state_dict({**self.loader.state_dict(), "samples_seen": 0})
            self.step = self.tokens = 0

    def _unusable(self, path: Path, error: Exception) -> None:
        """An explicit train.resume=PATH stops with the reason; an automatic resume moves the
        checkpoint aside and tries the one before."""
        if self.cfg.train.resume != "auto":
            raise ValueError(f"train.resume={self.cfg.train.resume} cannot be loaded: {first_line(error)}") from None
        aside = self.checkpointer.move_aside(path, "unloadable")
        log.warning("checkpoint %s cannot be loaded (%s); moved it to %s and trying the one before",
                    path, first_line(error), aside)

    def _refuse_changed_settings(self, path: Path, saved: str, requested: str, explicit: bool) -> None:
        if not explicit:  # the same run: only what MAY_CHANGE may differ
            refuse_if_different(self.run_dir, saved, requested, f"checkpoint {path.name}")
            return
        changed = differences(saved, requested, only_model=True)  # another run: the weights must fit
        if changed:
            raise ValueError(f"train.resume={path} holds a model with other settings ({'; '.join(changed[:4])}); "
                             "set the model as it was saved.")

    def _barrier(self) -> None:
        if self.runtime is not None:
            self.runtime.barrier()

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state_dict(), self.config_yaml())

    # --- steps -----------------------------------------------------------------------------------

    def train_step(self) -> dict:
        tc, seq_len = self.cfg.train, self.cfg.data.seq_len
        start = time.perf_counter()
        batch_size = self.schedule.batch_size(self.tokens)
        tokens_after = self.tokens + batch_size * seq_len
        lr, mtp_weight = self.schedule.lr(tokens_after), self.schedule.mtp_weight(tokens_after)
        if self.zero:
            self.optimizer.lr = lr
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        losses = self._forward_backward(self._batches(batch_size), mtp_weight)
        # Host work while the device runs the backward pass: the next step's batches.
        self._read_ahead(self.schedule.batch_size(tokens_after))
        if self.zero:  # reduce-scatter, clip, update its slice, all-gather
            grad_norm = self.optimizer.step(tc.grad_clip)
        elif self.runtime is None:
            grad_norm = clipped_step(self.optimizer, list(self.model.parameters()), tc.grad_clip)
        else:
            self.runtime.sync.reduce()
            grad_norm = self.runtime.sync.clip_(tc.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sum_loads = None
        if self.runtime is not None:
            losses = self.runtime.mean_over_data_ranks(losses)
            sum_loads = self._sum_loads
        bias_update_speed = self.schedule.bias_update_speed(tokens_after)
        violation = self._all_layers(update_expert_bias(self.routers, bias_update_speed, sum_loads))
        self.step += 1
        self.tokens = tokens_after

        # One host sync for every figure of the step.
        scalars = torch.cat([losses.float(), grad_norm.reshape(1).float().to(losses.device),
                             violation.float().to(losses.device)]).tolist()
        (main, mtp, balance, grad_norm), violation = scalars[:4], scalars[4:]
        total = main + mtp_weight * mtp + balance
        seconds = time.perf_counter() - start
        tokens_per_s = batch_size * seq_len / seconds
        world = self.runtime.layout.world if self.runtime else 1
        if not math.isfinite(total):
            raise FloatingPointError(f"The loss became {total} at step {self.step}; the run stops here.")
        return {"step": self.step, "tokens": self.tokens, "loss": total, "main_loss": main, "mtp_loss": mtp,
                "balance_loss": balance, "lr": lr, "mtp_weight": mtp_weight,
                "bias_update_speed": bias_update_speed, "batch_size": batch_size,
                "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.flop_per_token / (self.peak_flops * world) if self.peak_flops else None,
                "max_violation": max(violation, default=0.0),
                "max_violation_per_layer": violation, "peak_memory_gib": self._peak_memory_gib(),
                "step_seconds": seconds}

    def _batches(self, batch_size: int) -> list[torch.Tensor]:
        """This rank's micro-batches of a step of batch_size sequences, on the device: the ones the
        previous step read ahead, or read now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.batch_size == batch_size:
            return ahead.batches
        if ahead is not None:  # the batch ramp changed the size since: read them again
            self.loader.load_state_dict(ahead.loader_state)
        tc = self.cfg.train
        micro = tc.micro_batch_size * self.data_parallel
        pinned = self.device.type == "cuda"  # so that the copy runs while the host goes on
        return [(b.pin_memory() if pinned else b).to(self.device, non_blocking=True)
                for b in (self.loader.next_batch(micro) for _ in range(batch_size // micro))]

    def _read_ahead(self, batch_size: int) -> None:
        """Reads the next step's batches now, keeping the loader's state from before for a
        checkpoint saved in between (see state_dict)."""
        state = self.loader.state_dict()
        self._ahead = ReadAhead(batch_size, state, self._batches(batch_size))

    def _forward_backward(self, batches: list[torch.Tensor], mtp_weight: float) -> torch.Tensor:
        """Gradients of the mean loss over the step's micro-batches in .grad; returns this rank's
        (main, mtp, balance) losses, summed over pipeline stages."""
        if self.pipeline is not None:
            losses = self.pipeline.train_step([(b[:, :-1], b[:, 1:]) for b in batches], mtp_weight)
            self.replicas.sum_gradients()
            self.runtime.sum_over_pipeline(losses)
            return losses
        losses = torch.zeros(3, device=self.device)
        for batch in batches:
            with self.autocast:
                out = self.model(batch[:, :-1], batch[:, 1:])
                loss = out.total(mtp_weight)
            (loss / len(batches)).backward()
            losses += torch.stack([out.main_loss, out.mtp_loss, out.balance_loss]).detach() / len(batches)
        return losses

    def _sum_loads(self, loads: torch.Tensor) -> None:
        """Router loads over every rank that routes tokens through the same layers."""
        self.runtime.sum_over_stage(loads)
        if self.replicas is not None:
            self.replicas.sum_router_loads(loads)

    def _all_layers(self, violation: torch.Tensor) -> torch.Tensor:
        """Per-layer values of this rank's routers -> values of every router of the model (each
        pipeline rank holds some layers)."""
        if self.cut is None:
            return violation
        names = [name for name, m in self.model.named_modules() if name.endswith("router")]
        every = torch.zeros(len(self.all_router_names), device=violation.device)
        for name, value in zip(names, violation.to(every.device)):
            every[self.all_router_names.index(name)] = value
        dist.all_reduce(every, op=dist.ReduceOp.MAX, group=self.runtime.pp_group)
        return every

    def _peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Main-model loss on the first train.eval_batches micro-batches of the held-out split, and
        bits per byte (nats per token x tokens per UTF-8 byte of the split / ln 2)."""
        tc = self.cfg.train
        try:
            loader = build_loader(self.cfg.data, self.cfg.model, self.cfg.seed, "validation", self.runtime)
        except ValueError as error:  # e.g. a validation split shorter than one sequence
            log.warning("no validation: %s", error)
            return {}
        self.model.eval()
        batches = [loader.next_batch(tc.micro_batch_size * self.data_parallel).to(self.device)
                   for _ in range(tc.eval_batches)]
        if self.pipeline is not None:
            total = self.pipeline.evaluate([(b[:, :-1], b[:, 1:]) for b in batches])
            self.runtime.sum_over_pipeline(total)
        else:
            total = torch.zeros((), device=self.device)
            for batch in batches:
                with self.autocast:
                    total += self.model(batch[:, :-1], batch[:, 1:]).main_loss.float()
        self.model.train()
        if self.runtime is not None:
            total = self.runtime.mean_over_data_ranks(total)
        val_loss = total.item() / tc.eval_batches
        result = {"val_loss": val_loss, "val_bpb": None}
        if isinstance(loader, TokenLoader):
            split = loader.split.meta
            result["val_bpb"] = val_loss * split["tokens"] / split["bytes"] / math.log(2)
        return result

    def _all_agree_to_stop(self, requested: bool) -> bool:
        """A signal reaches ranks at different moments; every rank stops after the same step."""
        if self.runtime is None:
            return requested
        flag = torch.tensor(float(requested), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> list[dict]:
        tc = self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        if self.step >= self.total_steps:
            log.info("the run in %s has already finished its %d steps", self.run_dir, self.total_steps)
            return []
        log.info("training %s: steps %d..%d of %d-token sequences on %s from %s", self.run_dir,
                 self.step + 1, self.total_steps, self.cfg.data.seq_len, self.device, self.cfg.data.source)
        if self.is_main:  # what runs now, once every check has passed
            write_config(self.run_dir, self.config_yaml())
        config = OmegaConf.to_container(OmegaConf.structured(self.cfg))
        metrics = (MetricsLog(self.run_dir, tc.wandb, config, self.total_steps, self.step, tc.log_every)
                   if self.is_main else None)
        history = []
        try:
            with StopSignals() as stop:
                while self.step < self.total_steps:
                    record = self.train_step()
                    finished = self.step == self.total_steps
                    if (tc.eval_every and self.step % tc.eval_every == 0) or finished:
                        record.update(self.evaluate())
                    if metrics is not None:
                        metrics.log(record)
                    history.append(record)
                    if self._all_agree_to_stop(stop.received is not None):
                        name = signal.Signals(stop.received).name if stop.received else "a stop request"
                        log.info("received %s: saving step %d and exiting", name, self.step)
                        break
                    if not finished and tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                        self.save()
                self.save()
                self.checkpointer.wait()
        finally:
            if metrics is not None:
                metrics.close()
        return history


def train(cfg: Config) -> list[dict]:
    """Runs (or resumes) the training run of `cfg`; returns the metrics of the steps it ran."""
    try:
        return Trainer(cfg).run()
    finally:
        parallel_runtime.stop()
