"""How the ranks of a run are laid out (report section 3.2: DeepSeek-V3 used PP, EP and ZeRO-1
data parallelism, no tensor parallelism)."""
from dataclasses import dataclass, field

from .schedules import SCHEDULES


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline stages
    dp: int = 0  # data-parallel replicas of each expert; 0: whatever world_size / (pp * ep) leaves
    ep: int = 1  # expert-parallel ranks: each holds n_routed_experts / ep experts of every MoE layer
    zero: bool = True  # ZeRO-1: AdamW's moments sharded over the data-parallel ranks (several ranks only)
    schedule: str = "1f1b"  # pipeline schedule when pp > 1: 1f1b, zbv, dualpipev or dualpipe
    overlap: bool = True  # dualpipev/dualpipe: interleave each F&B pair around its all-to-alls
    stage_layers: list[int] = field(default_factory=list)  # layers per model stage; empty: as even as possible

    def __post_init__(self) -> None:
        for name in ("pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}.")
        if self.dp < 0:
            raise ValueError(f"parallel.dp must be >= 0 (0: derived from the world size), got {self.dp}.")
