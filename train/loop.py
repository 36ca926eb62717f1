"""Build a run from the config and train it: model on the meta device -> materialise -> init ->
AdamW -> steps of (micro-batches -> clip -> step -> router-bias update -> metrics)."""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dsv3.data.config import DataConfig
from dsv3.data.loader import TokenLoader
from dsv3.data.prepare import open_store
from dsv3.data.synthetic import SyntheticLoader
from dsv3.model import ModelConfig, Transformer, update_expert_bias

from .config import Config, TrainConfig

log = logging.getLogger("dsv3.train")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} asks for CUDA, but no CUDA device is available.")
    return device


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> Transformer:
    """Construct on the meta device (no memory), then allocate on `device` and initialise."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on every matrix and embedding, none on the 1-d norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=device.type == "cuda")


def build_loader(cfg: DataConfig, model_cfg: ModelConfig, seed: int) -> TokenLoader | SyntheticLoader:
    """The training-split loader of `cfg` (the store is prepared on first use)."""
    if cfg.source == "synthetic":
        return SyntheticLoader(model_cfg.vocab_size, cfg.synthetic_branching, cfg.seq_len, seed)
    store = open_store(cfg, seed)
    if store.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"The tokenizer of data store {store.path} has {store.vocab_size} tokens, more than "
                         f"model.vocab_size={model_cfg.vocab_size}.")
    return TokenLoader(store.split("train"), cfg.seq_len, seed)


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warmup over train.warmup_steps, then the peak rate."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr


def train(cfg: Config) -> list[dict]:
    """Runs cfg.train.steps optimizer steps; returns the per-step metrics it also writes to
    ``<run_dir>/metrics.jsonl``."""
    tc = cfg.train
    device = pick_device(tc.device)
    model = build_model(cfg.model, device, cfg.seed)
    model.train()
    optimizer = build_optimizer(model, tc, device)
    loader = build_loader(cfg.data, cfg.model, cfg.seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    routers = model.routers()

    run_dir = Path(tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens_per_step = tc.grad_accum * tc.micro_batch_size * cfg.data.seq_len
    log.info("training %d steps of %d tokens on %s from %s", tc.steps, tokens_per_step, device, cfg.data.source)

    history = []
    with open(run_dir / "metrics.jsonl", "w") as metrics_file:
        for step in range(tc.steps):
            start = time.perf_counter()
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = torch.zeros(4, device=device)  # total, main, mtp, balance; averaged over micro-batches
            for micro in range(tc.grad_accum):
                batch = loader.next_batch(tc.micro_batch_size).to(device)
                with autocast:
                    out = model(batch[:, :-1], batch[:, 1:])
                    loss = out.total(tc.mtp_weight)
                (loss / tc.grad_accum).backward()
                losses += torch.stack([loss, out.main_loss, out.mtp_loss, out.balance_loss]).detach() / tc.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            violation = update_expert_bias(routers, tc.bias_update_speed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start

            sums = dict(zip(("loss", "main_loss", "mtp_loss", "balance_loss"), losses.tolist()))
            record = {"step": step + 1, **sums, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_step / seconds,
                      "max_violation": violation.max().item() if violation.numel() else 0.0}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"The loss became {record['loss']} at step {step + 1}.")
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            history.append(record)
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                log.info("step %d/%d | loss %.4f (main %.4f, mtp %.4f, balance %.2e) | lr %.2e | "
                         "grad norm %.3f | %.0f tokens/s | max violation %.2f",
                         step + 1, tc.steps, record["loss"], record["main_loss"], record["mtp_loss"],
                         record["balance_loss"], lr, grad_norm, record["tokens_per_s"], record["max_violation"])
    return history
