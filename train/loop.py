"""Build a run from the config and train it.

recipe -> the parts (build.py: model, passes, AdamW, the layout's gradients) -> resume from the newest
complete checkpoint -> steps of (micro-batches -> clip -> step -> router-bias update -> metrics)
-> checkpoints every N steps, on SIGTERM/SIGUSR1, and at the end.
"""
from __future__ import annotations

import logging
import math
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from dsv3.data.loader import TokenLoader
from dsv3.model import count, total_loss, update_expert_bias
from dsv3.parallel import runtime as parallel_runtime
from dsv3.parallel.expert_parallel import (expert_tensors, join_experts, join_optimizer_experts, split_experts,
                                           split_optimizer_experts)

from .run_dir import CONFIG as RUN_CONFIG
from .run_dir import differences, holds_run, move_run_aside, refuse_if_different, saved_config, write_config
from .build import Parts, build_loader, build_parts, start
from .checkpoint import Checkpointer, first_line, step_of
from .config import Config
from .metrics import MetricsLog
from .optim import clipped_step, load_moments, moments
from .schedule import run_schedule, steps_for

log = logging.getLogger("dsv3.train")

# Dense BF16 peak of known GPUs in TFLOPS (datasheets, SXM parts), for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    return None


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
        self.runtime, self.device = start(cfg)
        self.data_parallel = self.runtime.layout.data_parallel
        self.schedule = run_schedule(cfg, self.runtime.layout)  # checks every step's batch before anything is built
        self.total_steps = tc.steps or steps_for(self.schedule)
        self.is_main = self.runtime.is_main
        if not self.is_main:
            logging.getLogger("dsv3").setLevel(logging.WARNING)
        self.run_dir = Path(tc.run_dir)
        self._use(build_parts(cfg, self.runtime, self.device))
        self.loader = build_loader(cfg.data, cfg.model, cfg.seed, self.runtime)
        self._ahead: ReadAhead | None = None  # the next step's batches, read while the device works
        self.step = 0
        self.tokens = 0
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", tc.keep_checkpoints, self.runtime,
                                         tc.async_checkpoint)
        counts = count(cfg.model, cfg.data.seq_len)
        self.flop_per_token = counts.flop_per_token + counts.mtp_flop_per_token
        self.peak_flops = peak_flops(self.device, tc.peak_tflops)

    def _use(self, parts: Parts) -> None:
        self.model, self.passes, self.compiled = parts.model, parts.passes, parts.compiled
        self.optimizer, self.gradients = parts.optimizer, parts.gradients
        self.routers = self.model.routers()

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resume needs; routed experts stored one per key, so any expert layout
        can load it."""
        experts = expert_tensors(self.model)
        model = split_experts(get_model_state_dict(self.model), experts)
        optimizer = split_optimizer_experts({"state": moments(self.model, self.optimizer)["state"]},
                                            experts)  # per parameter, any layout
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        loader = self._ahead.loader_state if self._ahead is not None else self.loader.state_dict()
        trainer = {"step": self.step, "tokens": self.tokens, "loader": loader, "rng": rng}
        return {"model": model, "optimizer": optimizer, "trainer": trainer}

    def load_state_dict(self, state: dict) -> None:
        experts = expert_tensors(self.model)
        set_model_state_dict(self.model, join_experts(state["model"], experts))
        load_moments(self.model, self.optimizer, join_optimizer_experts(state["optimizer"], experts))
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
                self.runtime.barrier()
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
            self._use(build_parts(self.cfg, self.runtime, self.device))
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

    def save(self) -> None:
        self.checkpointer.save(self.step, self.state_dict(), self.config_yaml())

    # --- steps -----------------------------------------------------------------------------------

    def train_step(self) -> dict:
        tc, seq_len = self.cfg.train, self.cfg.data.seq_len
        start = time.perf_counter()
        batch_size = self.schedule.batch_size(self.tokens)
        tokens_after = self.tokens + batch_size * seq_len
        lr, mtp_weight = self.schedule.lr(tokens_after), self.schedule.mtp_weight(tokens_after)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self.passes.train_step(self._batches(batch_size), mtp_weight)
        # Host work while the device runs the backward pass: the next step's batches.
        self._read_ahead(self.schedule.batch_size(tokens_after))
        grad_norm = clipped_step(self.optimizer, self.gradients, tc.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)  # under CUDA graphs too (see Unpipelined)
        losses = self.runtime.mean_over_data_ranks(losses)
        bias_update_speed = self.schedule.bias_update_speed(tokens_after)
        violation = self.passes.every_layer(update_expert_bias(self.routers, bias_update_speed,
                                                               self.passes.sum_router_loads))
        self.step += 1
        self.tokens = tokens_after

        # One host sync for every figure of the step.
        scalars = torch.cat([losses.float(), grad_norm.reshape(1).float().to(losses.device),
                             violation.float().to(losses.device)]).tolist()
        (main, mtp, balance, grad_norm), violation = scalars[:4], scalars[4:]
        total = total_loss(main, mtp, balance, mtp_weight)
        seconds = time.perf_counter() - start
        tokens_per_s = batch_size * seq_len / seconds
        world = self.runtime.layout.world
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
            loader = build_loader(self.cfg.data, self.cfg.model, self.cfg.seed, self.runtime, "validation")
        except ValueError as error:  # e.g. a validation split shorter than one sequence
            log.warning("no validation: %s", error)
            return {}
        self.model.eval()
        batches = [loader.next_batch(tc.micro_batch_size * self.data_parallel).to(self.device)
                   for _ in range(tc.eval_batches)]
        total = self.passes.evaluate(batches)
        self.model.train()
        total = self.runtime.mean_over_data_ranks(total)
        val_loss = total.item() / tc.eval_batches
        result = {"val_loss": val_loss, "val_bpb": None}
        if isinstance(loader, TokenLoader):
            split = loader.split.meta
            result["val_bpb"] = val_loss * split["tokens"] / split["bytes"] / math.log(2)
        return result

    def _all_agree_to_stop(self, requested: bool) -> bool:
        """A signal reaches ranks at different moments; every rank stops after the same step."""
        return self.runtime.any(requested, self.device)

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
