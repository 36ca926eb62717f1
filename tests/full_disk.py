"""Full-disk trials for tests/test_run_safety.py, run inside a private mount namespace
(`unshare --mount --propagation private python tests/full_disk.py MOUNT REPORT OVERRIDES...`): each
case mounts a small tmpfs, trains until the disk is full, checks what is left, grows the tmpfs and
resumes. The mounts vanish with the namespace. Writes what it saw to REPORT as JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path


def mount(path: Path, size: str, remount: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def train(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsv3.train", f"train.run_dir={run_dir}", "train.steps=12",
                           *overrides], capture_output=True, text=True, timeout=300)


def full_then_resume(mountpoint: Path, size: str, overrides: list[str]) -> dict:
    mount(mountpoint, size)
    run_dir = mountpoint / "run"
    full = train(run_dir, overrides)
    seen = {"returncode": full.returncode, "stderr": full.stderr[-3000:],
            "errors": [line for line in full.stderr.splitlines() if line.startswith("error:")],
            "leftover_tmp": [str(p) for p in run_dir.rglob("*.tmp")]}
    mount(mountpoint, "256m", remount=True)
    resumed = train(run_dir, overrides)
    seen["resumed_returncode"] = resumed.returncode
    seen["torn_line_warning"] = "torn last line" in resumed.stdout + resumed.stderr
    seen["losses"] = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return seen


def partial_write(mountpoint: Path) -> dict:
    """A payload the size estimate does not count (pickled bytes) fills the disk half-way through."""
    import warnings

    from dsv3.parallel.runtime import Runtime
    from dsv3.train.checkpoint import Checkpointer
    from dsv3.train.storage import DiskFull

    mount(mountpoint, "8m")
    checkpointer = Checkpointer(mountpoint / "checkpoints", keep=3, runtime=Runtime())
    warnings.filterwarnings("ignore")
    try:
        checkpointer.save(1, {"payload": os.urandom(16 * 2**20)}, "seed: 0\n")
        error = "saved"
    except DiskFull as raised:
        error = str(raised)
    return {"error": error, "leftover": [str(p) for p in (mountpoint / "checkpoints").iterdir()]}


def main() -> None:
    root, report, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    seen = {
        # room for two checkpoints of the tiny test model (12 MB each), not three
        "checkpoint": full_then_resume(root / "checkpoint", "30m", overrides),
        # three pages: the config, the log and a few lines of metrics
        "metrics": full_then_resume(root / "metrics", "12k", [*overrides, "train.checkpoint_every=0"]),
        "partial": partial_write(root / "partial"),
    }
    report.write_text(json.dumps(seen))


if __name__ == "__main__":
    main()
