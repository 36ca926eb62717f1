"""`dsv3-launch slurm`: the recipe's run as an sbatch job, and `dsv3-launch local`: as torchrun here.

The job script (written to <run_dir>/slurm/job.sbatch) first checks the allocation SLURM gave (node
count, CPUs/GPUs per node) against the layout it was made for and reads the first node's address
from SLURM (`python -m dsv3.launch.allocation`); a mismatch ends the job there, in one sentence. It
then runs one srun task per node; each starts torchrun with a c10d rendezvous on that address, so
every node's ranks join one process group, and records torchrun's exit status per node. A node
that dies never records one: once another node's ranks have failed, the script waits
`cluster.node_timeout` seconds, names the nodes that have not reported, and requeues the job (at
most `cluster.node_failure_requeues` times); the next attempt resumes from the newest complete
checkpoint. SLURM signals the batch shell (SIGUSR1) `cluster.grace_seconds` before the time
limit; the script passes SIGTERM to the ranks, which finish their step, save a checkpoint and exit,
and then requeues the job. The requeued job runs the same command, and `train.resume=auto` continues
from the newest checkpoint: nothing changes between attempts.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.mesh import Layout, resolve_layout
from dsv3.train.config import ClusterConfig


TEMPLATE = """#!/bin/bash
{sbatch}

# environment
{setup}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed rank ends the job instead of hanging it
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-1}}

# The allocation as SLURM gives it (node count, CPUs/GPUs per node) must be the one this job was made
# for, or it ends here, before torch starts; the rendezvous runs on the first node's SLURM address.
attempt=$(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))
echo "$(date -Is) job $SLURM_JOB_ID attempt $attempt on $SLURM_JOB_NODELIST"
head_addr=$({python} -m dsv3.launch.allocation --nodes={nodes} --ranks-per-node={ranks_per_node} \\
  --gpus-per-node={gpus_per_node}) || exit 2
echo "$(date -Is) rendezvous on $head_addr:{port}, {ranks_per_node} rank(s) on each of $SLURM_NNODES nodes"

# One srun task per node; each leaves torchrun's exit status in $exits/<node> when it ends.
exits={exits}/$SLURM_JOB_ID.$attempt
mkdir -p "$exits"
export DSV3_EXITS=$exits
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c \\
  'trap : TERM; "$@"; status=$?; echo "$status" > "$DSV3_EXITS/$SLURMD_NODENAME"
   echo "$(date -Is) $SLURMD_NODENAME: torchrun exited with status $status"; exit "$status"' node \\
  {python} -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc-per-node={ranks_per_node} \\
  --rdzv-backend=c10d --rdzv-endpoint="$head_addr:{port}" --rdzv-id="$SLURM_JOB_ID" \\
  -m dsv3.train {overrides} &
ranks=$!

# The time limit is near: the ranks save and exit on SIGTERM, then the job goes back in the queue.
# (SIGTERM goes to the step's tasks on every node through scancel: srun would end the step on it.)
preempted=""
trap 'echo "$(date -Is) SIGUSR1: saving and requeueing"; preempted=1; scancel --signal=TERM "$SLURM_JOB_ID.0"' USR1

# A node whose processes die never reports. Once any node has reported a failure, the others have
# {node_timeout} s (cluster.node_timeout) to report; then those that have not are named as failed.
failed_at=""
timed_out=""
while kill -0 "$ranks" 2>/dev/null; do
  if [ -z "$failed_at$preempted" ] && grep -qsvx 0 "$exits"/*; then failed_at=$SECONDS; fi
  if [ -n "$failed_at" ] && [ $(( SECONDS - failed_at )) -ge {node_timeout} ]; then timed_out=1; break; fi
  sleep 1 & wait $!
done
if [ -n "$preempted" ]; then
  wait "$ranks"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
lost=""
for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
  [ -f "$exits/$node" ] || lost="$lost $node"
done
if [ -n "$timed_out" ] && [ -n "$lost" ]; then
  echo "$(date -Is) node failure:$lost stopped answering (no exit status {node_timeout} s after another node's ranks failed)"
  {{ kill -KILL "$ranks"; wait "$ranks"; }} 2>/dev/null  # srun; the requeue (or exit) ends the step everywhere
  failures={exits}/$SLURM_JOB_ID.node-failures  # one line per node failure of this job, across attempts
  echo "$lost" >> "$failures"
  if [ "$(wc -l < "$failures")" -le {node_failure_requeues} ]; then
    echo "$(date -Is) requeueing; the next attempt resumes from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "$(date -Is) SLURM refused the requeue; submitting the job again resumes from the newest complete checkpoint"
    exit 1
  fi
  echo "$(date -Is) not requeued after {node_failure_requeues} node failures (cluster.node_failure_requeues); submitting the job again resumes from the newest complete checkpoint"
  exit 1
fi
wait "$ranks"
exit $?
"""


def world_size(cluster: ClusterConfig) -> int:
    return cluster.nodes * cluster.ranks_per_node


def check_layout(cluster: ClusterConfig, parallel: ParallelConfig, n_routed_experts: int) -> Layout:
    """The recipe's parallel layout must fit the ranks the cluster settings give."""
    world = world_size(cluster)
    try:
        return resolve_layout(parallel, world, n_routed_experts)
    except ValueError as error:
        per_node = "cluster.gpus_per_node" if cluster.gpus_per_node else "cluster.procs_per_node"
        raise ValueError(f"cluster.nodes={cluster.nodes} x {per_node}={cluster.ranks_per_node} = {world} ranks "
                         f"do not fit the recipe's layout: {error}") from None


def check_partition(partition: str) -> None:
    if not partition:
        return
    if shutil.which("sinfo") is None:
        raise ValueError("sinfo is not available on this machine, so cluster.partition cannot be checked; "
                         "run dsv3-launch slurm on a SLURM login node.")
    listed = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
    if partition not in listed:
        raise ValueError(f"cluster.partition={partition} does not exist on this cluster "
                         f"(sinfo lists: {', '.join(sorted(set(listed))) or 'none'}).")


def render(cluster: ClusterConfig, run_dir: Path, overrides: list[str]) -> str:
    log_dir = Path(cluster.log_dir) if cluster.log_dir else run_dir / "slurm"
    options = [f"--job-name=dsv3-{run_dir.name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1",
               f"--output={log_dir}/%j.out", "--open-mode=append",
               f"--signal=B:USR1@{cluster.grace_seconds}", "--requeue"]
    if cluster.gpus_per_node:
        options.append(f"--gpus-per-node={cluster.gpus_per_node}")
    else:  # CPU ranks: one CPU each
        options.append(f"--cpus-per-task={cluster.ranks_per_node}")
    for name in ("partition", "account", "qos", "time"):
        if getattr(cluster, name):
            options.append(f"--{name}={getattr(cluster, name)}")
    options += list(cluster.extra_sbatch)
    arguments = [*overrides, f"train.run_dir={run_dir}"]
    return TEMPLATE.format(
        sbatch="\n".join(f"#SBATCH {o}" for o in options),
        setup="\n".join(cluster.setup) or "# (none: cluster.setup)",
        python=shlex.quote(sys.executable), nodes=cluster.nodes, ranks_per_node=cluster.ranks_per_node,
        gpus_per_node=cluster.gpus_per_node, port=cluster.port, exits=shlex.quote(str(log_dir)),
        node_timeout=cluster.node_timeout, node_failure_requeues=cluster.node_failure_requeues,
        overrides=" ".join(shlex.quote(a) for a in arguments))


def submit(script: str, run_dir: Path, cluster: ClusterConfig) -> str:
    """Writes the script into the run directory and submits it; returns the job id."""
    if shutil.which("sbatch") is None:
        raise ValueError("sbatch is not available on this machine; run dsv3-launch slurm on a SLURM login node "
                         "(or use --dry-run to see the script).")
    (Path(cluster.log_dir) if cluster.log_dir else run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = run_dir / "slurm" / "job.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"sbatch refused {path}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def local_command(cluster: ClusterConfig, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={cluster.ranks_per_node}", "-m", "dsv3.train", *overrides]
