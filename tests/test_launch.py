"""dsv3-launch against a real one-node SLURM cluster (tests/start_slurm.sh): a 2-rank gloo job of
the tiny recipe, a preempted job that requeues itself and resumes, and settings refused before
submission. They use a cluster that already answers `sinfo`; DSV3_START_SLURM=1 lets them install
and start one on this machine first (root, apt), which a plain test run never does. Without SLURM
these tests skip with the reason, unless DSV3_REQUIRE_SLURM=1 (CI, which sets both)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slurm_test_cluster

ROOT = Path(__file__).resolve().parent.parent
RUN = ["data=synthetic", "cluster.procs_per_node=2", "train.wandb.mode=disabled", "train.eval_every=0",
       "train.global_batch_size=8", "train.micro_batch_size=2", "train.checkpoint_every=10"]


def launch(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "dsv3.launch", *args], capture_output=True, text=True,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def slurm_answers() -> bool:
    """A running SLURM whose `sinfo` lists a node that can take jobs."""
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and re.search(r"idle|mix|alloc", result.stdout) is not None


@pytest.fixture(scope="module")
def slurm():
    """A SLURM cluster to submit to: one already up, or the one-node cluster of start_slurm.sh."""
    script = ["bash", str(ROOT / "tests" / "start_slurm.sh")]
    yield from slurm_test_cluster(slurm_answers, script, [*script, "down"],
                            "no SLURM cluster answers sinfo; set DSV3_START_SLURM=1 to let tests/start_slurm.sh "
                            "install (apt-get, as root) and start a one-node cluster on this machine")


def job_state(job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait(job: str, timeout: float = 400) -> dict:
    """Until the job ends. A requeued job waits ~2 minutes before it may start again (SLURM's
    requeue delay); here it is told to start 10 s after the requeue: started at once, while the node
    still revokes the first attempt's credential, SLURM kills it ("Job credential revoked")."""
    deadline, requeued = time.time() + timeout, None
    while time.time() < deadline:
        state = job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state.get("JobState") == "PENDING" and state.get("Restarts", "0") != "0":
            requeued = requeued or time.time()
            if time.time() > requeued + 10:
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_state(job)}")


def submitted_job(result) -> str:
    return result.stdout.split("submitted job ")[1].split(":")[0]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same 2-rank run through `dsv3-launch local` (torchrun on this machine)."""
    run_dir = tmp_path_factory.mktemp("local")
    launch("local", *RUN, "train.steps=60", f"train.run_dir={run_dir}")
    return losses(run_dir)


def test_dry_run_prints_the_job_script(tmp_path):
    result = launch("slurm", "--dry-run", *RUN, "cluster.nodes=2", "cluster.procs_per_node=0",
                    "cluster.gpus_per_node=4", "parallel=ep8", "train.global_batch_size=16", "cluster.partition=gpu", "cluster.time=1:00:00",
                    "cluster.grace_seconds=90", f"train.run_dir={tmp_path / 'run'}", "cluster.setup=[module load cuda]")
    script = result.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --signal=B:USR1@90",
                 "#SBATCH --requeue", "module load cuda", "--nproc-per-node=4", "--rdzv-backend=c10d",
                 f"train.run_dir={tmp_path / 'run'}", "scontrol requeue"]:
        assert line in script, line
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize("overrides, sentence", [
    (["cluster.procs_per_node=0", "cluster.gpus_per_node=3", "parallel=ep2"],
     "cluster.nodes=1 x cluster.gpus_per_node=3 = 3 ranks do not fit the recipe's layout"),
    (["cluster.partition=nonexistent"], "cluster.partition=nonexistent does not exist on this cluster"),
])
def test_bad_cluster_settings_fail_before_submission(slurm, tmp_path, overrides, sentence):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = launch("slurm", *RUN, *overrides, f"train.run_dir={tmp_path}", check=False)
    assert result.returncode == 2 and sentence in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "slurm").exists()


def test_tiny_recipe_as_a_two_rank_slurm_job(slurm, tmp_path, uninterrupted):
    result = launch("slurm", *RUN, "train.steps=60", f"train.run_dir={tmp_path}")
    job = submitted_job(result)
    state = wait(job)
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert (tmp_path / "slurm" / "job.sbatch").exists()
    assert (tmp_path / "checkpoints" / "step_00000060").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000060"
    assert losses(tmp_path) == uninterrupted  # the same ranks, the same data: the same losses


def test_preempted_job_requeues_itself_and_resumes(slurm, tmp_path, uninterrupted):
    """SIGUSR1 to the batch shell, as SLURM sends before the time limit: the ranks save at the
    step they are in, the job requeues itself, resumes, and logs the uninterrupted run's losses."""
    job = submitted_job(launch("slurm", *RUN, "train.steps=60", f"train.run_dir={tmp_path}"))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 15):
        assert time.time() < deadline and job_state(job)["JobState"] in ("PENDING", "RUNNING"), job_state(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait(job)
    log = (tmp_path / "slurm" / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert "received SIGTERM: saving step" in log and "attempt 2" in log and "resumed from" in log
    assert losses(tmp_path) == uninterrupted
