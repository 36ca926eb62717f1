"""A run directory belongs to one run. Starting in one that already holds a run either continues
it with settings that may change between attempts, or is refused with a sentence saying what
differs; a fresh start is explicit (``train.resume=fresh``) and moves the old run aside.

    <run_dir>/config.yaml   the resolved config of the attempt that is running (written once its
                            settings have passed every check); each checkpoint keeps its own copy
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import OmegaConf

from .storage import write_atomically

CONFIG = "config.yaml"

# Settings that may change when a run resumes: its length, its layout, where and how it runs, and how
# often it logs, evaluates and saves. Everything else (the model, the data, the optimizer, the
# schedule's shape, precision, the seed) defines the run.
MAY_CHANGE = ("train.steps", "train.tokens", "train.run_dir", "train.resume", "train.device",
              "train.micro_batch_size", "train.log_every", "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint", "train.peak_tflops",
              "train.compile", "train.cuda_graphs",
              "train.wandb.", "parallel.", "cluster.", "data.num_proc", "data.cache_dir", "data.store")

# What a run writes into its directory; `train.resume=fresh` moves these aside together.
RUN_FILES = ("metrics.jsonl", "checkpoints", "wandb", "wandb_run_id", CONFIG)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def may_change(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in MAY_CHANGE)


def differences(saved_yaml: str, requested_yaml: str, only_model: bool = False) -> list[str]:
    """'key: saved -> requested' for every setting that differs and may not change on resume (with
    only_model, every model.* setting: what decides whether the weights fit)."""
    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    requested = _flatten(OmegaConf.to_container(OmegaConf.create(requested_yaml)))
    keys = sorted(set(saved) | set(requested))
    if only_model:
        keys = [k for k in keys if k.startswith("model.")]
    else:
        keys = [k for k in keys if not may_change(k)]
    return [f"{k}: {saved.get(k, '(absent)')} -> {requested.get(k, '(absent)')}" for k in keys
            if saved.get(k) != requested.get(k)]


def refuse_if_different(run_dir: Path, saved_yaml: str, requested_yaml: str, source: str) -> None:
    """Raises one sentence if the requested config may not continue the run saved in `source`."""
    changed = differences(saved_yaml, requested_yaml)
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ValueError(f"train.run_dir={run_dir} holds a run whose settings ({source}) differ in what cannot "
                         f"change on resume ({shown}): keep those settings to continue it, set train.resume=fresh "
                         "to move the old run aside and start over, or choose another train.run_dir (run length, "
                         "parallel layout, device, and logging, evaluation, checkpoint and W&B settings may change).")


def holds_run(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return ((metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / CONFIG).is_file()
            or any((run_dir / "checkpoints").glob("step_*")))


def saved_config(run_dir: Path) -> str | None:
    path = run_dir / CONFIG
    return path.read_text() if path.is_file() else None


def move_run_aside(run_dir: Path) -> Path:
    """Moves the run's files into <run_dir>/replaced-<time>/; deletes nothing."""
    aside = run_dir / f"replaced-{time.strftime('%Y%m%dT%H%M%S')}"
    aside.mkdir()
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, aside / name)
    return aside


def write_config(run_dir: Path, config_yaml: str) -> None:
    write_atomically(run_dir / CONFIG, config_yaml)
