"""``python -m dsv3.launch.allocation --nodes N --ranks-per-node R --gpus-per-node G``: run by the job
script on the batch node before torch starts.

It reads the allocation from SLURM (the node count and list, CPUs and GPUs per node) and checks it
against the layout the job was rendered for; a mismatch (a job resubmitted with `sbatch -N 1`, a
node range, fewer GPUs) ends the job with one sentence on stderr and exit code 2. On success it
prints the address of the allocation's first node, from SLURM's NodeAddr, for the c10d rendezvous.
Imports nothing heavy: it must answer in well under a second.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys


class AllocationMismatch(ValueError):
    """The allocation SLURM gave is not the one the job was rendered for."""


def expand_counts(value: str) -> list[int]:
    """SLURM's per-node counts, e.g. SLURM_JOB_CPUS_PER_NODE='4(x2),2' -> [4, 4, 2]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise AllocationMismatch(f"SLURM's per-node count {value!r} cannot be read.")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def scontrol(*args: str) -> str:
    result = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AllocationMismatch(f"scontrol {' '.join(args)} failed: {result.stderr.strip() or result.returncode}.")
    return result.stdout


def head_address(nodelist: str) -> str:
    """The first node's NodeAddr as SLURM knows it (its hostname on most clusters)."""
    head = scontrol("show", "hostnames", nodelist).split()[0]
    match = re.search(r"\bNodeAddr=(\S+)", scontrol("show", "node", "--oneliner", head))
    return match.group(1) if match else head


def check(env: dict[str, str], nodes: int, ranks_per_node: int, gpus_per_node: int) -> None:
    """Raises AllocationMismatch with one sentence if the allocation cannot run the layout."""
    if "SLURM_JOB_ID" not in env or "SLURM_NNODES" not in env:
        raise AllocationMismatch("this is not a SLURM job (SLURM_JOB_ID and SLURM_NNODES are unset); "
                                 "submit it with sbatch.")
    nodelist = env.get("SLURM_JOB_NODELIST", "?")
    got = int(env["SLURM_NNODES"])
    if got != nodes:
        raise AllocationMismatch(
            f"the allocation has {got} node{'s' if got != 1 else ''} ({nodelist}) but the job was made for "
            f"cluster.nodes={nodes}, so its {nodes * ranks_per_node} ranks cannot run; resubmit with "
            f"dsv3-launch cluster.nodes={got} (and a layout that fits) or without overriding --nodes.")
    if gpus_per_node:
        value = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "0")
        have = int(re.sub(r"^.*:", "", value) or 0)  # SLURM_GPUS_PER_NODE may be 'type:count'
        if have != gpus_per_node:
            raise AllocationMismatch(
                f"the allocation gives {have} GPUs per node ({nodelist}) but the job was made for "
                f"cluster.gpus_per_node={gpus_per_node} (one rank per GPU); resubmit with a matching --gpus-per-node.")
    elif "SLURM_JOB_CPUS_PER_NODE" in env:
        cpus = expand_counts(env["SLURM_JOB_CPUS_PER_NODE"])
        if min(cpus) < ranks_per_node:
            raise AllocationMismatch(
                f"the allocation gives {min(cpus)} CPUs on a node ({nodelist}: {env['SLURM_JOB_CPUS_PER_NODE']}) "
                f"but cluster.procs_per_node={ranks_per_node} CPU ranks need one each.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dsv3.launch.allocation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--ranks-per-node", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        check(dict(os.environ), args.nodes, args.ranks_per_node, args.gpus_per_node)
        print(head_address(os.environ["SLURM_JOB_NODELIST"]))
    except (AllocationMismatch, OSError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
