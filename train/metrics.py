"""Where a step's numbers go: ``metrics.jsonl`` (always), the console (a progress bar on a
terminal, a line every ``train.log_every`` steps), and Weights & Biases (offline unless a key or
the config says online). A resumed run keeps its W&B run id and appends to its metrics file.

A process killed with -9 loses what W&B had not yet written (an offline run's file can stay
empty), so a resumed run first re-logs, from metrics.jsonl, every step up to the checkpoint that
its W&B run does not hold yet: the newest W&B run holds every step once.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from .config import WandbConfig
from .storage import DiskFull, is_disk_full, write_atomically

log = logging.getLogger("dsv3.train")


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


class MetricsLog:
    def __init__(self, run_dir: Path, wandb_cfg: WandbConfig, config: dict, total_steps: int, start_step: int,
                 log_every: int):
        self.path = run_dir / "metrics.jsonl"
        self.log_every = log_every
        self.total_steps = total_steps
        kept = self._records_up_to(start_step)  # drop steps after the checkpoint we resume from
        if self.path.exists():
            write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        self.wandb = None
        mode = wandb_mode(wandb_cfg)
        if mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
            self.wandb = wandb.init(project=wandb_cfg.project, name=wandb_cfg.name or run_dir.resolve().name,
                                    group=wandb_cfg.group or None, id=run_id, resume="allow", mode=mode,
                                    dir=str(run_dir), config=config,
                                    settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True))
            for record in kept:
                if record["step"] >= self.wandb.step:  # what this W&B run does not hold yet
                    self._log_wandb(record)

    def _records_up_to(self, step: int) -> list[dict]:
        """The records of metrics.jsonl up to `step`. A torn last line (the process was killed or
        the disk filled mid-write) is dropped with a warning; any other unreadable line stops the
        run with its line number."""
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    log.warning("%s: dropped its torn last line (a write was cut short)", self.path)
                    break
                raise ValueError(f"{self.path} line {number} is not a JSON record; repair or move the file "
                                 "to continue the run.") from None
        return [r for r in records if r["step"] <= step]

    def _log_wandb(self, record: dict) -> None:
        flat = {k: v for k, v in record.items() if not isinstance(v, list)}
        for name, values in record.items():
            if isinstance(values, list):
                flat.update({f"{name}/{i}": v for i, v in enumerate(values)})
        self.wandb.log(flat, step=record["step"])

    def log(self, record: dict) -> None:
        step = record["step"]
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            if not is_disk_full(error):
                raise
            raise DiskFull(f"No space left on the device of {self.path} while appending step {step}; the run "
                           "stops, and resuming repairs the cut line.") from None
        if self.wandb is not None:
            self._log_wandb(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", tokens_per_s=f"{record['tokens_per_s']:.0f}")
        if step % self.log_every == 0 or step == self.total_steps or "val_loss" in record:
            parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}",
                     f"main {record['main_loss']:.4f}", f"mtp {record['mtp_loss']:.4f}",
                     f"lr {record['lr']:.2e}", f"grad norm {record['grad_norm']:.3f}",
                     f"{record['tokens_per_s']:.0f} tokens/s"]
            if record.get("mfu") is not None:
                parts.append(f"MFU {100 * record['mfu']:.1f}%")
            if "val_loss" in record:
                parts.append(f"val loss {record['val_loss']:.4f}")
                if record.get("val_bpb") is not None:
                    parts.append(f"val bpb {record['val_bpb']:.4f}")
            message = " | ".join(parts)
            if self.bar.disable:
                log.info(message)
            else:
                self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        try:
            self.file.close()
        except OSError:  # a line cut short by a full disk, already reported; resuming repairs it
            pass
        if self.wandb is not None:
            self.wandb.finish()
