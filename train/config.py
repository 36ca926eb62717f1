"""The root config: one typed dataclass per package, registered with Hydra as the schema that
every recipe in ``recipes/`` is merged into. A key that does not exist, or a value of the wrong
type, fails at start with Hydra's message naming the key."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from dsv3.data.config import DataConfig
from dsv3.fp8 import FP8Config
from dsv3.model.config import ModelConfig
from dsv3.parallel.config import ParallelConfig

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class ScheduleConfig:
    """Schedules over the run's tokens. Boundaries are fractions of the run's length, so a short
    run follows the same shape as DeepSeek-V3's 14.8T tokens (defaults: report section 4.2)."""
    lr: float = 2.2e-4  # peak, reached at the end of warmup
    warmup: float = 0.0019  # linear 0 -> lr; V3: 2K steps, about 28B of 14.8T tokens
    decay_start: float = 0.675676  # constant lr until here; V3: 10T
    decay_end: float = 0.966216  # cosine lr -> decayed_lr until here; V3: 14.3T
    decayed_lr: float = 2.2e-5  # held from decay_end to final_start; V3: 333B tokens
    final_start: float = 0.988716  # V3: 14.633T
    final_lr: float = 7.3e-6  # held to the end; V3: the last 167B tokens
    batch_ramp_start: int = 0  # global batch (sequences) at the start; 0: no ramp. V3: 3072
    batch_ramp_end: float = 0.031689  # global batch grows linearly to train.global_batch_size; V3: 469B
    mtp_weight: float = 0.3  # lambda, until mtp_switch; V3: the first 10T
    mtp_weight_late: float = 0.1  # lambda after mtp_switch
    mtp_switch: float = 0.675676
    bias_update_speed: float = 1e-3  # gamma, until bias_freeze; V3: 14.3T
    bias_freeze: float = 0.966216  # gamma is 0 from here on

    def __post_init__(self) -> None:
        points = [("warmup", self.warmup), ("decay_start", self.decay_start), ("decay_end", self.decay_end),
                  ("final_start", self.final_start)]
        for (a, x), (b, y) in zip(points, points[1:]):
            if not 0 <= x <= y <= 1:
                raise ValueError(f"train.schedule.{a}={x} and train.schedule.{b}={y} must satisfy "
                                 f"0 <= {a} <= {b} <= 1.")
        for name in ("batch_ramp_end", "mtp_switch", "bias_freeze"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"train.schedule.{name} must lie in [0, 1], got {getattr(self, name)}.")
        for name in ("lr", "decayed_lr", "final_lr"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"train.schedule.{name} must be a positive learning rate, got {getattr(self, name)}.")
        for name in ("mtp_weight", "mtp_weight_late", "bias_update_speed", "batch_ramp_start"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.schedule.{name} must be >= 0, got {getattr(self, name)}.")


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; online; offline; disabled
    project: str = "dsv3"
    name: str = ""  # the run's display name; "" uses the run directory's name
    group: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"train.wandb.mode must be auto, online, offline or disabled, got {self.mode!r}.")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # metrics.jsonl, checkpoints/, wandb/ go here
    steps: int = 0  # run length in optimizer steps, or:
    tokens: int = 0  # run length in tokens (exactly one of the two is set)
    global_batch_size: int = 8  # sequences per optimizer step (after any batch ramp)
    micro_batch_size: int = 8  # sequences per forward/backward on each data-parallel rank
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm
    adam_state_dtype: str = "float32"  # "bfloat16" keeps AdamW's moments in BF16, as DeepSeek-V3 did
    device: str = "auto"  # "auto": CUDA when present, else CPU
    # torch.compile each transformer block (as torchtitan does): "auto" on CUDA, not on the CPU
    # (where compiling costs more than it saves); "on"; "off". Pipelined runs execute blocks part by
    # part and stay eager.
    compile: str = "auto"
    # Replay each compiled block's forward and backward as CUDA graphs (torch.compile's
    # reduce-overhead mode): the host launches one graph per block instead of each of its kernels,
    # which matters where the host, not the GPU, bounds the step (README, "CUDA graphs"). Needs
    # compiled blocks on one CUDA device per expert set: no expert or pipeline parallelism.
    cuda_graphs: bool = False
    log_every: int = 10  # console lines; metrics.jsonl gets every step
    eval_every: int = 0  # validation loss and bits per byte every N steps (0: never; always at the end)
    eval_batches: int = 4  # micro-batches of the validation split per evaluation
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end and on preemption)
    keep_checkpoints: int = 3  # the newest K complete checkpoints are kept
    async_checkpoint: bool = False  # write checkpoints in the background after staging them
    # auto: continue the run in run_dir from its newest usable checkpoint, if any; never: a new run,
    # refused if run_dir holds one; fresh: a new run, the old one moved to run_dir/replaced-<time>/;
    # or a checkpoint's path
    resume: str = "auto"
    peak_tflops: float = 0.0  # the device's dense BF16 peak for MFU; 0: known GPUs by name
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if (self.steps > 0) == (self.tokens > 0):
            raise ValueError(f"Set exactly one of train.steps={self.steps} and train.tokens={self.tokens} "
                             "to a positive run length.")
        for name in ("global_batch_size", "micro_batch_size", "log_every", "eval_batches", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}.")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.micro_batch_size}.")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"train.compile must be auto, on or off, got {self.compile!r}.")
        if self.cuda_graphs and self.compile == "off":
            raise ValueError("train.cuda_graphs=true replays compiled blocks; it cannot run with train.compile=off.")
        if self.adam_state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"train.adam_state_dtype must be float32 or bfloat16, got {self.adam_state_dtype!r}.")


@dataclass
class ClusterConfig:
    """Where a run goes: one machine (torchrun) or a SLURM allocation (sbatch). dsv3-launch reads
    it; it is part of the recipe so that one composition describes the whole job."""
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU processes on gloo
    procs_per_node: int = 0  # ranks per node; 0: gpus_per_node, or 1 without GPUs
    partition: str = ""  # sbatch settings left out when empty
    account: str = ""
    qos: str = ""
    time: str = ""  # e.g. 2-00:00:00; the job is signalled grace_seconds before it ends
    grace_seconds: int = 120
    setup: list[str] = field(default_factory=list)  # shell lines before training: modules, venv
    log_dir: str = ""  # empty: <train.run_dir>/slurm
    port: int = 29500  # rendezvous port on the first node
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. --exclusive
    # Once one node's ranks have failed, the others have this long to report before the nodes that
    # have not are named as failed and the job attempt ends.
    node_timeout: int = 60
    node_failure_requeues: int = 2  # attempts requeued after a node failure; then the job fails

    def __post_init__(self) -> None:
        for name in ("nodes", "grace_seconds", "node_timeout"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("gpus_per_node", "procs_per_node", "node_failure_requeues"):
            if getattr(self, name) < 0:
                raise ValueError(f"cluster.{name} must be >= 0, got {getattr(self, name)}.")
        if self.gpus_per_node and self.procs_per_node and self.procs_per_node != self.gpus_per_node:
            raise ValueError(f"cluster.procs_per_node={self.procs_per_node} must equal cluster.gpus_per_node="
                             f"{self.gpus_per_node} on GPUs (one rank per GPU).")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=1))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}.")
        ramp = self.train.schedule.batch_ramp_start
        if ramp and (ramp % self.train.micro_batch_size or ramp > self.train.global_batch_size):
            raise ValueError(f"train.schedule.batch_ramp_start={ramp} must be a multiple of train.micro_batch_size="
                             f"{self.train.micro_batch_size} and at most train.global_batch_size="
                             f"{self.train.global_batch_size}.")


def register() -> None:
    ConfigStore.instance().store(name="dsv3_schema", node=Config)


def compose(overrides: list[str], resolve: bool = False) -> DictConfig:
    """The recipe with command-line style overrides, composed as the trainer would, without
    starting a run (for tools such as ``dsv3.train.summary``). With resolve=True every
    interpolation, ${hydra:...} ones included, is resolved as in a run."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    register()
    with initialize_config_dir(config_dir=str(RECIPES), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=resolve)
    if resolve:
        HydraConfig.instance().set_config(cfg)  # what ${hydra:...} reads
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    return cfg


def describe(error: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the bad key and value; show both."""
    cause = error.__cause__
    return f"{error}\n{cause}" if cause is not None and str(cause) not in str(error) else str(error)
