"""No run is lost or wedged: unusable checkpoints are moved aside (never deleted) and the run goes
on; a flipped byte is caught by the checksum; a run directory holding another run is refused with
nothing touched; a full disk is one sentence and a later resume; metrics.jsonl and the W&B run
keep every step once after kill -9."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_trainer import QUICK, losses, start, trainer, wait_for
from wandb_files import history_steps

TESTS = Path(__file__).resolve().parent
RUN = [*QUICK, "train.checkpoint_every=2"]


def train_command(run_dir, *overrides, timeout=300):
    return subprocess.run([sys.executable, "-m", "dsv3.train", f"train.run_dir={run_dir}", *RUN, *overrides],
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Losses of an uninterrupted 12-step run."""
    run_dir = tmp_path_factory.mktemp("straight")
    trainer(run_dir, "train.steps=12", "train.checkpoint_every=2").run()
    return losses(run_dir)


def test_an_unloadable_newest_checkpoint_is_moved_aside_and_the_run_finishes(tmp_path, straight, caplog):
    trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2").run()
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step_00000006" / ".metadata").unlink()
    trainer(tmp_path, "train.steps=12", "train.checkpoint_every=2").run()  # saves step 6 again, then 8..12
    assert "step_00000006" in caplog.text and "moved it to" in caplog.text
    assert losses(tmp_path) == straight  # resumed from step 4, bitwise the uninterrupted run
    assert [p.name for p in (checkpoints / "unusable").iterdir()][0].startswith("step_00000006.unloadable-")
    assert (checkpoints / "latest").read_text().strip() == "step_00000012"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000008", "step_00000010",
                                                                "step_00000012"]


def test_when_every_checkpoint_is_corrupt_the_run_restarts_and_keeps_what_it_writes(tmp_path, straight):
    trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2").run()
    checkpoints = tmp_path / "checkpoints"
    for folder in checkpoints.glob("step_*"):
        data = next(folder.glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:1000])
    history = trainer(tmp_path, "train.steps=12", "train.checkpoint_every=2").run()
    assert history[0]["step"] == 1 and losses(tmp_path) == straight
    assert len(list((checkpoints / "unusable").iterdir())) == 3  # set aside, not deleted
    latest = (checkpoints / "latest").read_text().strip()
    assert latest == "step_00000012" and (checkpoints / latest / ".metadata").is_file()


def test_a_changed_byte_of_the_same_size_is_caught_by_the_checksum(tmp_path, caplog):
    trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2").run()
    data = next((tmp_path / "checkpoints" / "step_00000006").glob("*.distcp"))
    size = data.stat().st_size
    with open(data, "r+b") as file:  # 4 KiB of garbage in the middle, the size unchanged
        file.seek(size // 2)
        file.write(os.urandom(4096))
    assert data.stat().st_size == size
    again = trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    again.resume()
    assert again.step == 4
    assert f"{data} does not match the checksum" in caplog.text


def test_a_run_dir_holding_a_run_is_refused_with_nothing_touched(tmp_path):
    assert train_command(tmp_path, "train.steps=4").returncode == 0
    before = snapshot(tmp_path)
    for overrides, words in [(["train.resume=never"], "already holds a run"),
                             (["model.dim=48"], "model.dim: 128 -> 48"),
                             (["data.seq_len=16"], "data.seq_len: 32 -> 16"),
                             (["train.schedule.lr=1e-3"], "train.schedule.lr: 0.003 -> 0.001")]:
        result = train_command(tmp_path, "train.steps=8", *overrides)
        assert result.returncode == 2, result.stderr
        assert len(error_lines(result)) == 1 and words in error_lines(result)[0] and str(tmp_path) in result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot(tmp_path) == before, overrides
    # What may change on resume: the run length, the cadence of logs and checkpoints, how blocks run.
    result = train_command(tmp_path, "train.steps=6", "train.log_every=1", "train.keep_checkpoints=5",
                           "train.compile=off")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3,
                                                                                                          4, 5, 6]


def test_a_fresh_start_is_explicit_and_moves_the_old_run_aside(tmp_path):
    assert train_command(tmp_path, "train.steps=4").returncode == 0
    before = snapshot(tmp_path)
    result = train_command(tmp_path, "train.steps=2", "model.dim=48", "train.resume=fresh")
    assert result.returncode == 0, result.stderr
    aside = next(tmp_path.glob("replaced-*"))
    moved = snapshot(aside)
    assert all(moved[name] == content for name, content in before.items() if name in moved)
    assert {"metrics.jsonl", "config.yaml"} <= set(moved)
    assert len(losses(tmp_path)) == 2 and "dim: 48" in (tmp_path / "config.yaml").read_text()


def test_the_saved_config_describes_only_what_ran(tmp_path):
    assert train_command(tmp_path, "train.steps=2").returncode == 0
    saved = (tmp_path / "config.yaml").read_text()
    for bad in ["train.schedule.lr=-1e-4", "train.schedule.final_lr=0", "model.dim=48"]:
        result = train_command(tmp_path, "train.steps=4", bad)
        assert result.returncode == 2 and len(error_lines(result)) == 1, result.stderr
    assert (tmp_path / "config.yaml").read_text() == saved
    assert not (tmp_path / ".hydra").exists()


@pytest.mark.parametrize("setting", ["lr=-1e-4", "decayed_lr=0", "final_lr=-7.3e-6", "mtp_weight=-0.3",
                                     "bias_update_speed=-1e-3", "batch_ramp_start=-4"])
def test_impossible_schedule_values_are_refused_at_start(tmp_path, setting):
    result = train_command(tmp_path / "run", "train.steps=2", f"train.schedule.{setting}")
    assert result.returncode != 0 and f"train.schedule.{setting.split('=')[0]}" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path, straight, caplog):
    trainer(tmp_path, "train.steps=12", "train.checkpoint_every=2").run()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:8]) + lines[8][:40])  # killed while writing step 9
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000012")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000010")
    trainer(tmp_path, "train.steps=12", "train.checkpoint_every=2").run()
    assert "torn last line" in caplog.text
    assert losses(tmp_path) == straight


def test_the_resumed_wandb_run_holds_every_step_once_after_kill(tmp_path):
    process = start(tmp_path, "train.steps=16", "train.checkpoint_every=4", "train.wandb.mode=offline")
    wait_for(tmp_path / "checkpoints" / "step_00000008", process)
    process.kill()
    process.wait()
    result = subprocess.run([sys.executable, "-m", "dsv3.train", f"train.run_dir={tmp_path}", *QUICK,
                             "train.steps=16", "train.checkpoint_every=4", "train.wandb.mode=offline"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 2
    newest = next(runs[-1].glob("run-*.wandb"))
    assert history_steps(newest) == list(range(1, 17))
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 17))


def can_mount_private_tmpfs() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare --mount failed: {probe.stderr.decode().strip()}"


def test_a_full_disk_stops_the_run_with_one_sentence_and_a_later_run_resumes(tmp_path, straight):
    """Runs tests/full_disk.py in a private mount namespace (the tmpfs vanishes with it; nothing
    of this machine changes) and checks what it saw."""
    reason = can_mount_private_tmpfs()
    if reason:
        pytest.skip(reason)
    report = tmp_path / "report.json"
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                             str(TESTS / "full_disk.py"), str(tmp_path / "mnt"), str(report), *RUN],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(report.read_text())
    for case in ("checkpoint", "metrics"):
        full = seen[case]
        assert full["returncode"] == 2 and len(full["errors"]) == 1, full
        assert full["errors"][0].startswith("error: No space left on the device of"), full
        assert "Traceback" not in full["stderr"]
        assert full["leftover_tmp"] == [], full
        assert full["resumed_returncode"] == 0, full
        assert full["losses"] == straight  # every step once, bitwise the uninterrupted run
    assert "nothing was written" in seen["checkpoint"]["errors"][0]
    assert seen["metrics"]["torn_line_warning"]
    # A write that fails half-way (what the estimate cannot foresee) removes its partial folder.
    assert seen["partial"]["error"].startswith("No space left on the device of")
    assert "removed the partial write" in seen["partial"]["error"] and seen["partial"]["leftover"] == []


def test_under_torchrun_one_rank_prints_the_sentence_and_torchrun_names_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "dsv3.train", f"train.run_dir={tmp_path / 'run'}", *RUN, "train.steps=2",
                             "parallel.ep=4"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    sentence = "error: parallel.pp=1 x parallel.ep=4 does not divide the world size 2."
    assert result.stderr.count(sentence) >= 2  # printed once by rank 0, and named in torchrun's summary
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [sentence]
    assert "To enable traceback see" not in result.stderr  # every rank's error file holds the sentence
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dsv3_launch_local_checks_the_batch_before_starting_ranks(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dsv3.launch", "local", "cluster.procs_per_node=4",
                             "parallel=ep2", "data=synthetic", f"train.run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: train.global_batch_size=8 is not a multiple of train.micro_batch_size=8 "
                                     "x 4 data-parallel ranks.")
    assert "torch.distributed.run" not in result.stdout and not (tmp_path / "run").exists()
