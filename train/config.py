"""The root config: one typed dataclass per package, registered with Hydra as the schema that
every recipe in ``recipes/`` is merged into. A key that does not exist, or a value of the wrong
type, fails at start with Hydra's message naming the key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from dsv3.data.config import DataConfig
from dsv3.model.config import ModelConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # metrics.jsonl (and later checkpoints) go here
    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2.2e-4  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # applied to matrices and embeddings, not to norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm
    mtp_weight: float = 0.3  # lambda
    bias_update_speed: float = 0.001  # gamma
    device: str = "auto"  # "auto": CUDA when present, else CPU
    log_every: int = 10  # console lines; metrics.jsonl gets every step

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}.")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError("train.lr must be positive and train.warmup_steps >= 0.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}.")


def register() -> None:
    ConfigStore.instance().store(name="dsv3_schema", node=Config)


def compose(overrides: list[str]) -> DictConfig:
    """The recipe with command-line style overrides, composed as the trainer would, without
    starting a run (for tools such as ``dsv3.model.summary``)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)
