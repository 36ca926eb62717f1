"""dsv3-launch on a real two-node SLURM cluster built on this machine (tests/start_cluster.sh): each
node a network namespace with its own hostname and address running its own slurmd, one slurmctld,
jobs submitted from the controller's namespace as from a login node. The tiny recipe runs as one
rank per node with its experts split over the two nodes (parallel=ep2), rendezvous over gloo on the
head node's SLURM address; it is preempted across nodes; one node is killed mid-run; an allocation
that does not match the layout is refused before torch starts.

The cluster is built only when DSV3_START_SLURM=1 asks for it (root: namespaces, apt-get) and is
torn down after these tests; a cluster already up (`start_cluster.sh up` by hand) is used and left
as it is. Without one these tests skip with the reason, unless DSV3_REQUIRE_SLURM=1 (CI).

Losses are compared with `==`: with two ranks every all-reduce adds two fp32 numbers, and IEEE
addition is commutative, so neither the transport (veth between namespaces or loopback) nor the
order of the reduction can change a bit; the fp32 tolerance for two ranks is zero.

Each test prints its figures (time from submission to the first step, from a node's death to the
attempt's end, steps lost); `pytest -s` shows them.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import slurm_test_cluster

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "start_cluster.sh"
CONF = Path(os.environ.get("DSV3_CLUSTER_DIR", "/run/dsv3-cluster")) / "slurm.conf"
CTL = "dsv3ctl"
STEPS = 60
RUN = ["data=synthetic", "parallel=ep2", "cluster.procs_per_node=1", "train.wandb.mode=disabled",
       "train.eval_every=0", "train.global_batch_size=8", "train.micro_batch_size=2",
       "train.checkpoint_every=10", f"train.steps={STEPS}"]
TWO_NODES = [*RUN, "cluster.nodes=2", "cluster.node_timeout=10"]
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def on_login_node(*command: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """A command in the controller's namespace, where the cluster's SLURM answers."""
    result = subprocess.run(["ip", "netns", "exec", CTL, "env", f"SLURM_CONF={CONF}", *command],
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def idle_nodes() -> int:
    try:
        result = on_login_node("sinfo", "-h", "-o", "%D", "-t", "idle", timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster: one already up (used, left up), or built by start_cluster.sh."""
    started = time.time()
    yield from slurm_test_cluster(lambda: CONF.exists() and idle_nodes() >= 2, ["bash", str(SCRIPT), "up", "2"],
                            ["bash", str(SCRIPT), "down"],
                            "no two-node SLURM cluster answers; set DSV3_START_SLURM=1 to let tests/start_cluster.sh "
                            "build one on this machine (root: network namespaces; apt-get if SLURM is missing)")
    print(f"two-node cluster used for {time.time() - started:.1f} s")


def submit(*overrides: str) -> tuple[str, float]:
    submitted = time.time()
    result = on_login_node(sys.executable, "-m", "dsv3.launch", "slurm", *overrides, timeout=300)
    return result.stdout.split("submitted job ")[1].split(":")[0], submitted


def job_state(job: str) -> dict:
    text = on_login_node("scontrol", "show", "job", job, check=False).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def wait(job: str, timeout: float = 300, on_requeue=None) -> dict:
    """Until the job ends. A requeued job may start again 10 s after its requeue (SLURM holds it
    about two minutes; sooner, the node may still be revoking the last attempt's credential)."""
    deadline, requeued = time.time() + timeout, None
    while time.time() < deadline:
        state = job_state(job)
        if state.get("JobState") in ENDED:
            return state
        if state.get("JobState") == "PENDING" and state.get("Restarts", "0") != "0":
            if requeued is None:
                requeued = time.time()
                if on_requeue is not None:
                    on_requeue()
            if time.time() > requeued + 10:
                on_login_node("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
        elif state.get("JobState") == "RUNNING":
            requeued = None
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish in {timeout} s: {job_state(job)}")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir)]


def wait_for_step(run_dir: Path, job: str, step: int, timeout: float = 300) -> float:
    deadline = time.time() + timeout
    while len(metrics(run_dir)) < step:
        state = job_state(job).get("JobState")
        assert time.time() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), (state, log(run_dir, job))
        time.sleep(0.1)
    return time.time()


def log(run_dir: Path, job: str) -> str:
    path = run_dir / "slurm" / f"{job}.out"
    return path.read_text() if path.exists() else ""


def node_exits(run_dir: Path, job: str, attempt: int) -> dict[str, int]:
    """What each node's srun task recorded as torchrun's exit status in that attempt."""
    directory = run_dir / "slurm" / f"{job}.{attempt}"
    return {path.name: int(path.read_text()) for path in directory.iterdir()} if directory.is_dir() else {}


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The same layout (2 ranks, experts split over them) as `dsv3-launch local` on this machine."""
    run_dir = tmp_path_factory.mktemp("one-node")
    result = subprocess.run([sys.executable, "-m", "dsv3.launch", "local", *RUN, "cluster.procs_per_node=2",
                             f"train.run_dir={run_dir}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return losses(run_dir)


def test_two_nodes_train_as_one_node_does(cluster, tmp_path, one_node):
    job, submitted = submit(*TWO_NODES, f"train.run_dir={tmp_path}")
    first_step = wait_for_step(tmp_path, job, 1) - submitted
    state = wait(job)
    text = log(tmp_path, job)
    assert state["JobState"] == "COMPLETED", text[-3000:]
    assert state["NodeList"] == "dsv3n[1-2]" and "rendezvous on 10.217.0.11:29500" in text, text[-3000:]
    assert node_exits(tmp_path, job, 1) == {"dsv3n1": 0, "dsv3n2": 0}  # a torchrun on each node
    assert losses(tmp_path) == one_node
    print(f"two nodes: submission to first step {first_step:.1f} s")


def test_preemption_reaches_every_node_and_loses_nothing(cluster, tmp_path, one_node):
    """SIGUSR1 to the batch shell, as SLURM sends it `cluster.grace_seconds` before the time limit:
    both nodes' ranks stop after the same step and save it, the job requeues, the resumed run
    logs the uninterrupted run's losses."""
    job, _ = submit(*TWO_NODES, f"train.run_dir={tmp_path}")
    wait_for_step(tmp_path, job, 15)
    on_login_node("scancel", "--signal=USR1", "--batch", job)
    trained = []
    state = wait(job, on_requeue=lambda: trained.append(len(metrics(tmp_path))))
    text = log(tmp_path, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    saved = int(text.split("received SIGTERM: saving step ")[1].split()[0])
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{saved:08d}'}" in text, text[-3000:]
    # both nodes' torchruns ended by themselves after the save (none was killed)
    assert set(node_exits(tmp_path, job, 1)) == {"dsv3n1", "dsv3n2"}, text[-3000:]
    assert "attempt 2 on dsv3n[1-2]" in text
    assert losses(tmp_path) == one_node
    lost = trained[0] - saved
    assert lost == 0
    print(f"preemption at step {saved}: steps lost {lost}")


def test_node_death_ends_the_job_naming_the_node_and_resumes(cluster, tmp_path, one_node):
    """Every process of node dsv3n2 (slurmd, slurmstepd, torchrun, its rank) killed mid-run: the
    attempt ends within cluster.node_timeout of the other node's failure, naming dsv3n2; once the
    node is back, the requeued job resumes from the newest complete checkpoint and loses nothing."""
    job, _ = submit(*TWO_NODES, f"train.run_dir={tmp_path}")
    wait_for_step(tmp_path, job, 25)
    pids = subprocess.run(["ip", "netns", "pids", "dsv3n2"], capture_output=True, text=True).stdout.split()
    subprocess.run(["kill", "-KILL", *pids], check=True)
    died = time.time()
    newest = (tmp_path / "checkpoints" / "latest").read_text().strip()  # the newest complete checkpoint
    while "requeueing;" not in log(tmp_path, job):
        assert time.time() < died + 60, log(tmp_path, job)[-3000:]
        time.sleep(0.1)
    seconds, trained = time.time() - died, len(metrics(tmp_path))
    # The node reboots; until it answers (or SlurmdTimeout marks it down) SLURM keeps the attempt
    # COMPLETING, since it cannot confirm that the node's processes are gone.
    subprocess.run(["bash", str(SCRIPT), "node", "2"], check=True, timeout=60)
    state = wait(job)
    text = log(tmp_path, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert "node failure: dsv3n2 stopped answering" in text and "requeueing" in text, text[-3000:]
    assert node_exits(tmp_path, job, 1) == {"dsv3n1": 1}  # the survivor's rank failed; dsv3n2 never reported
    assert seconds < 10 + 10, text[-3000:]  # cluster.node_timeout, and the surviving node's failure
    checkpoint = int(text.split("resumed from ")[1].split("step_")[1].split()[0])
    assert f"step_{checkpoint:08d}" == newest
    assert losses(tmp_path) == one_node
    print(f"node death at step {trained}: the job said so and ended {seconds:.1f} s later, resumed from step "
          f"{checkpoint}, steps lost {trained - checkpoint}")


def test_an_allocation_that_does_not_fit_is_refused_before_torch_starts(cluster, tmp_path):
    script = on_login_node(sys.executable, "-m", "dsv3.launch", "slurm", "--dry-run", *TWO_NODES,
                           f"train.run_dir={tmp_path}").stdout
    (tmp_path / "slurm").mkdir()
    (tmp_path / "job.sbatch").write_text(script)
    job = on_login_node("sbatch", "--parsable", "--nodes=1", str(tmp_path / "job.sbatch")).stdout.strip()
    state = wait(job, timeout=60)
    text = log(tmp_path, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", text
    errors = [line for line in text.splitlines() if "error" in line]
    assert errors == ["error: the allocation has 1 node (dsv3n1) but the job was made for cluster.nodes=2, so "
                      "its 2 ranks cannot run; resubmit with dsv3-launch cluster.nodes=1 (and a layout that fits) "
                      "or without overriding --nodes."], text
    assert "rendezvous" not in text and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("env, sentence", [
    ({"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu01"},
     "the allocation has 1 node (gpu01) but the job was made for cluster.nodes=2"),
    ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4"},
     "the allocation gives 4 GPUs per node (gpu[01-02]) but the job was made for cluster.gpus_per_node=8"),
    ({"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_PER_NODE": "h100:2"},
     "the allocation gives 2 GPUs per node"),
])
def test_allocation_check_reads_slurm_and_names_the_mismatch(env, sentence):
    """No cluster needed: the check the job script runs first, on SLURM's variables."""
    from dsv3.launch.allocation import AllocationMismatch, check

    with pytest.raises(AllocationMismatch, match=re.escape(sentence)) as error:
        check({"SLURM_JOB_ID": "7", **env}, nodes=2, ranks_per_node=8, gpus_per_node=8)
    assert len(str(error.value).splitlines()) == 1


def test_allocation_check_counts_cpus_per_node():
    from dsv3.launch.allocation import AllocationMismatch, check, expand_counts

    assert expand_counts("4(x2),2") == [4, 4, 2]
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_CPUS_PER_NODE": "4(x2),2"}
    check(env, nodes=3, ranks_per_node=2, gpus_per_node=0)
    with pytest.raises(AllocationMismatch, match="the allocation gives 2 CPUs on a node"):
        check(env, nodes=3, ranks_per_node=4, gpus_per_node=0)
    with pytest.raises(AllocationMismatch, match="this is not a SLURM job"):
        check({}, nodes=1, ranks_per_node=1, gpus_per_node=0)
