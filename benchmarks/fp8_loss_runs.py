"""FP8 against BF16 over a long run, in one command: an FP8 run and two BF16 seeds trained at once
on one GPU, each `python -m dsv3.train` in its own run directory under --out (its console in
--out/NAME.log), then compared by compare_loss.compare: FP8's relative gap in EMA main loss
(coefficient 0.9) to BF16 of the same seed at the top level of the JSON, the other BF16 seed's gap
under "spread", and each run's validation losses.

    python3 benchmarks/fp8_loss_runs.py --out DIR [--steps 1000] [--common "train.cuda_graphs=true"]
        [--fp8 "fp8.power_of_two_scales=true"] [--limit-s SECONDS] [--plot loss.png]
    python benchmarks/fp8_loss_runs.py --smoke --out DIR   (the tiny recipe, 4 steps on the CPU, a minute)

The recipe is issue 15's: `small` (MTP D=1), the V3 schedule without its batch ramp, 4 x 4096
tokens a step in micro-batches of 2, evaluation every 250 steps on 8 batches of the held-out
split, compiled blocks; --common adds overrides to every run, --fp8 to the FP8 run only. The runs
share the GPU, so their tokens/s are not step figures. Each saves a checkpoint every 250 steps;
--limit-s sends each run SIGTERM after that many seconds (it finishes its step, saves and exits),
and the same command again continues every run from its newest checkpoint, leaving finished runs
as they are. The comparison covers the steps all three runs have; it is printed as one JSON line
and written to DIR/summary.json.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from compare_loss import compare, load  # benchmarks/ is on sys.path when run as a script

RECIPE = ["model=small", "schedule=v3", "train.tokens=0", "train.global_batch_size=4", "train.micro_batch_size=2",
          "train.schedule.batch_ramp_start=0", "train.eval_every=250", "train.eval_batches=8",
          "train.checkpoint_every=250", "train.wandb.mode=disabled", "train.compile=on", "train.log_every=100"]
SMOKE = ["model=tiny", "data=synthetic", "data.seq_len=32", "train.tokens=0", "train.global_batch_size=2",
         "train.micro_batch_size=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
         "train.wandb.mode=disabled", "train.device=cpu", "train.compile=off"]
RUNS = {"fp8_seed0": ["precision=fp8", "seed=0"], "bf16_seed0": ["seed=0"], "bf16_seed1": ["seed=1"]}
GRACE_S = 120  # after SIGTERM: the step in flight and the checkpoint


def start(out: Path, name: str, overrides: list[str]) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.log", "a") as log:  # beside the run directory, which is the trainer's
        return subprocess.Popen([sys.executable, "-m", "dsv3.train", f"train.run_dir={out / name}", *overrides],
                                stdout=log, stderr=subprocess.STDOUT)


def wait(processes: dict[str, subprocess.Popen], limit_s: float) -> dict[str, int]:
    """Exit codes; past limit_s each run still going gets SIGTERM, and SIGKILL GRACE_S later."""
    begin, stopped = time.monotonic(), False
    while any(p.poll() is None for p in processes.values()):
        elapsed = time.monotonic() - begin
        if limit_s and elapsed > limit_s and not stopped:
            for p in processes.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            stopped = True
        if limit_s and elapsed > limit_s + GRACE_S:
            for p in processes.values():
                if p.poll() is None:
                    p.kill()
        time.sleep(1)
    return {name: p.returncode for name, p in processes.items()}


def validation(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {r["step"]: r["val_loss"] for r in map(json.loads, f) if r.get("val_loss") is not None}


def compare_runs(out: Path, plot: str | None) -> dict:
    """compare_loss.compare of the three runs, with each run's validation losses."""
    runs = {name: load(str(out / name / "metrics.jsonl")) for name in RUNS}
    return {**compare(runs, plot), "validation_loss": {name: validation(out / name / "metrics.jsonl") for name in RUNS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the three run directories go here")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--common", default="", help="Hydra overrides for every run")
    parser.add_argument("--fp8", default="", help="Hydra overrides for the FP8 run")
    parser.add_argument("--limit-s", type=float, default=0.0, help="stop the runs (SIGTERM) after this long")
    parser.add_argument("--plot", help="write the EMA losses and the gaps to this PNG")
    parser.add_argument("--smoke", action="store_true", help="the tiny recipe, 4 steps on the CPU")
    args = parser.parse_args()
    out = Path(args.out)
    recipe = SMOKE if args.smoke else RECIPE
    steps = 4 if args.smoke else args.steps
    processes = {}
    for name, overrides in RUNS.items():
        extra = shlex.split(args.fp8) if name.startswith("fp8") else []
        processes[name] = start(out, name, [*recipe, f"train.steps={steps}", *overrides,
                                            *shlex.split(args.common), *extra])
    codes = wait(processes, args.limit_s)
    for name, code in codes.items():
        if code:
            tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:]
            print(f"# {name} exited with {code}: {tail[0] if tail else 'no output'}", file=sys.stderr)
    result = {"exit_codes": codes, **compare_runs(out, args.plot)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
