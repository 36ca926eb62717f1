"""Where a run goes: one machine (torchrun) or a SLURM allocation (sbatch)."""
from dataclasses import dataclass, field


@dataclass
class ClusterConfig:
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
