"""Where a step's numbers go: ``metrics.jsonl`` (always), the console (a progress bar on a
terminal, a line every ``train.log_every`` steps), and Weights & Biases (offline unless a key or
the config says online). A resumed run keeps its W&B run id and appends to its metrics file."""
from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

from tqdm import tqdm

from .config import WandbConfig

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
        self.file = open(self.path, "w")
        self.file.writelines(kept)
        self.file.flush()
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

    def _records_up_to(self, step: int) -> list[str]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines(keepends=True)
        return [line for line in lines if line.strip() and json.loads(line)["step"] <= step]

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list)}
            for name, values in record.items():
                if isinstance(values, list):
                    flat.update({f"{name}/{i}": v for i, v in enumerate(values)})
            self.wandb.log(flat, step=step)
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
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
