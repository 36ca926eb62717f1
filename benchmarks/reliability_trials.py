"""Trials of what a user does to a run, each checked for lost or wedged work; prints one table.

    python benchmarks/reliability_trials.py [--kills 20] [--seed 0] [--out trials.json]
    python benchmarks/reliability_trials.py --smoke      # one trial of each kind but the full disk

Every trial runs the trainer as a user would (``python -m dsv3.train``, the tiny test model on
the synthetic chain, CPU) in a fresh run dir, and passes when the run finishes with metrics.jsonl
and the newest W&B run holding every step exactly once and the losses bitwise equal to an
uninterrupted run; a refused input passes when it exits non-zero with one `error:` sentence and
the run dir is byte for byte as before.
- kill: `kill -9` at a random moment of a 40-step run (checkpoints every 4 steps), some of them
  while a checkpoint is being written, then the same command again;
- corrupt: the newest checkpoint truncated, without its .metadata, with 4 KiB overwritten (same
  size), and every checkpoint truncated; then the same command again;
- refused: resume=never, a changed model, impossible schedule values, a layout torchrun cannot
  hold, an unreadable data source;
- full disk: a tmpfs too small for a checkpoint, and one too small for the metrics (needs root:
  run in a private mount namespace by tests/full_disk.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from wandb_files import history_steps  # noqa: E402

RUN = ["data=synthetic", "train.device=cpu", "train.eval_every=0", "model.n_layers=2", "data.seq_len=32",
       "train.global_batch_size=4", "train.micro_batch_size=2", "train.checkpoint_every=4",
       "train.wandb.mode=offline"]


def command(run_dir: Path, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "dsv3.train", f"train.run_dir={run_dir}", *RUN, f"train.steps={steps}", *overrides]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def whole(run_dir: Path, reference: list[float], steps: int) -> str:
    """'' when the finished run holds every step once with the reference losses, else what is wrong."""
    got = records(run_dir)
    if [r["step"] for r in got] != list(range(1, steps + 1)):
        return f"metrics steps {[r['step'] for r in got][:5]}..."
    if [r["loss"] for r in got] != reference:
        return "losses differ from the uninterrupted run"
    runs = sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    wandb_steps = history_steps(next(runs[-1].glob("run-*.wandb")))
    if wandb_steps != list(range(1, steps + 1)):
        return f"W&B history holds {len(wandb_steps)} steps, {len(set(wandb_steps))} distinct"
    return ""


def snapshot(folder: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def kill_trial(run_dir: Path, steps: int, reference: list[float], rng: random.Random, during_save: bool) -> dict:
    process = subprocess.Popen(command(run_dir, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_dir / "checkpoints"
    deadline = time.time() + rng.uniform(3, 15)
    while process.poll() is None:
        saving = any(checkpoints.glob("*.tmp")) if checkpoints.exists() else False
        if (during_save and saving and (checkpoints / "step_00000004").exists()) or (
                not during_save and time.time() > deadline):
            break
        time.sleep(0.005)
    killed_at = len(records(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
    process.kill()
    process.wait()
    mid_save = any(checkpoints.glob("*.tmp")) if checkpoints.exists() else False
    resumed = subprocess.run(command(run_dir, steps), capture_output=True, text=True, timeout=600)
    problem = f"resume failed: {resumed.stderr[-300:]}" if resumed.returncode else whole(run_dir, reference, steps)
    return {"trial": "kill -9" + (" during a save" if mid_save else ""), "at step": killed_at, "problem": problem}


def corrupt_trial(run_dir: Path, steps: int, reference: list[float], how: str) -> dict:
    """The run is stopped (SIGTERM: it saves) half-way, its checkpoints damaged, and run again."""
    first = subprocess.Popen(command(run_dir, steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run_dir / "checkpoints" / f"step_{steps // 2:08d}").exists():
        assert first.poll() is None, "the run ended before its half-way checkpoint"
        time.sleep(0.005)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=600) == 0
    folders = sorted((run_dir / "checkpoints").glob("step_*"))
    for folder in (folders if how == "every checkpoint truncated" else folders[-1:]):
        data = next(folder.glob("*.distcp"))
        if how == ".metadata deleted":
            (folder / ".metadata").unlink()
        elif how == "4 KiB overwritten":
            with open(data, "r+b") as file:
                file.seek(data.stat().st_size // 2)
                file.write(os.urandom(4096))
        else:
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    resumed = subprocess.run(command(run_dir, steps), capture_output=True, text=True, timeout=600)
    problem = f"resume failed: {resumed.stderr[-300:]}" if resumed.returncode else whole(run_dir, reference, steps)
    kept = len(list((run_dir / "checkpoints" / "unusable").glob("*")))
    return {"trial": f"corrupt: {how}", "at step": steps // 2, "problem": problem or ("" if kept else "not kept")}


REFUSED = [("train.resume=never on a finished run", ["train.resume=never"]),
           ("a changed model in the same run dir", ["model.dim=48"]),
           ("negative learning rate", ["train.schedule.lr=-1e-4"]),
           ("zero final learning rate", ["train.schedule.final_lr=0"]),
           ("a missing data source", ["data=files", "data.source=/no/such/corpus.jsonl"])]


def refused_trial(run_dir: Path, name: str, overrides: list[str]) -> dict:
    before = snapshot(run_dir)
    result = subprocess.run(command(run_dir, 8, *overrides), capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    problem = ("" if result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr
               else f"exit {result.returncode}, {len(errors)} error lines")
    if snapshot(run_dir) != before:
        problem += " run dir changed"
    return {"trial": f"refused: {name}", "at step": 8, "problem": problem, "message": errors[0] if errors else ""}


def full_disk_trials(work: Path) -> list[dict]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return [{"trial": "full disk", "at step": "-", "problem": "skipped: needs root and unshare"}]
    report = work / "full_disk.json"
    subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(ROOT / "tests" / "full_disk.py"),
                    str(work / "mnt"), str(report), *RUN[:-1], "train.wandb.mode=disabled"], check=True, timeout=900)
    seen = json.loads(report.read_text())
    rows = []
    for case, size in (("checkpoint", "30 MiB"), ("metrics", "12 KiB")):
        full = seen[case]
        ok = (full["returncode"] == 2 and len(full["errors"]) == 1 and not full["leftover_tmp"]
              and full["resumed_returncode"] == 0 and len(full["losses"]) == 12)
        rows.append({"trial": f"full disk ({size}, {case})", "at step": "-", "problem": "" if ok else json.dumps(full)[:300],
                     "message": full["errors"][0] if full["errors"] else ""})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--smoke", action="store_true", help="one trial of each kind on a 16-step run, no full disk")
    args = parser.parse_args()
    steps, kills = (16, 1) if args.smoke else (40, args.kills)
    corruptions = ("newest truncated", ".metadata deleted", "4 KiB overwritten", "every checkpoint truncated")
    refusals = REFUSED[:1] if args.smoke else REFUSED
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="dsv3-trials-"))
    straight = work / "straight"
    subprocess.run(command(straight, steps), check=True, capture_output=True, timeout=600)
    reference = [r["loss"] for r in records(straight)]
    rows = []
    for i in range(kills):
        rows.append(kill_trial(work / f"kill{i}", steps, reference, rng, during_save=i % 4 == 3))
    for how in corruptions[:1] if args.smoke else corruptions:
        rows.append(corrupt_trial(work / how.replace(" ", "_"), steps, reference, how))
    for name, overrides in refusals:
        rows.append(refused_trial(straight, name, overrides))
    if not args.smoke:
        rows += full_disk_trials(work)
    width = max(len(r["trial"]) for r in rows)
    print(f"{'trial':<{width}}  at step  result")
    for r in rows:
        print(f"{r['trial']:<{width}}  {str(r['at step']):>7}  {'nothing lost' if not r['problem'] else r['problem']}")
    passed = sum(not r["problem"] for r in rows)
    print(f"{passed} of {len(rows)} trials lost nothing")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if passed == len(rows) else 1)


if __name__ == "__main__":
    main()
