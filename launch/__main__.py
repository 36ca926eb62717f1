"""``dsv3-launch slurm [--dry-run] [overrides]`` and ``dsv3-launch local [overrides]``.

The overrides are the trainer's (`model=small parallel=ep8 ...`) plus the `cluster.*` settings
(`cluster=mycluster cluster.nodes=4`). Settings the cluster cannot honour fail here, before
anything is submitted, with one sentence and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .slurm import check_layout, check_partition, local_command, render, submit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dsv3-launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["slurm", "local"])
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    from dsv3.train.config import compose
    from dsv3.train.schedule import run_schedule

    try:
        cfg = OmegaConf.to_object(compose(args.overrides, resolve=True))  # runs every config check
        layout = check_layout(cfg.cluster, cfg.parallel, cfg.model.n_routed_experts)
        run_schedule(cfg, layout)  # every step's batch must split over the ranks, as the trainer checks
        if args.target == "local":
            command = local_command(cfg.cluster, args.overrides)
            print(" ".join(command), flush=True)
            os.execv(command[0], command)
        run_dir = Path(cfg.train.run_dir).resolve()
        script = render(cfg.cluster, run_dir, args.overrides)
        if args.dry_run:
            print(script)
            return
        check_partition(cfg.cluster.partition)
        job = submit(script, run_dir, cfg.cluster)
    except (ValueError, HydraException, OmegaConfBaseException) as error:
        print("error: " + " ".join(line.strip() for line in str(error).splitlines()[:3]), file=sys.stderr)
        sys.exit(2)
    print(f"submitted job {job}: script {run_dir / 'slurm' / 'job.sbatch'}, log "
          f"{Path(cfg.cluster.log_dir) if cfg.cluster.log_dir else run_dir / 'slurm'}/{job}.out, "
          f"checkpoints {run_dir / 'checkpoints'}")


if __name__ == "__main__":
    main()
