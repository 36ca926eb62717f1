"""The trainer: exact resume, checkpoints that survive kills, preemption, metrics and W&B files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dsv3.train.config import compose
from dsv3.train.loop import Trainer

QUICK = ["data=synthetic", "train.device=cpu", "train.wandb.mode=disabled", "train.eval_every=0",
         "model.n_layers=2", "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2"]


def trainer(run_dir, *overrides) -> Trainer:
    return Trainer(OmegaConf.to_object(compose([f"train.run_dir={run_dir}", *QUICK, *overrides])))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def start(run_dir, *overrides) -> subprocess.Popen:
    args = [sys.executable, "-m", "dsv3.train", f"train.run_dir={run_dir}", *QUICK, *overrides]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference: 24 steps, with a checkpoint at the end."""
    run_dir = tmp_path_factory.mktemp("straight")
    t = trainer(run_dir, "train.steps=24")
    t.run()
    return run_dir, t


def expert_biases(t: Trainer) -> list[torch.Tensor]:
    return [r.expert_bias.clone() for r in t.model.routers()]


def test_exact_resume_after_kill(tmp_path, straight):
    """Run 24 steps in a process that is killed (-9) once step 8's checkpoint exists, then resume:
    the loss sequence, the router biases and the data position equal the uninterrupted run's."""
    reference_dir, reference = straight
    process = start(tmp_path, "train.steps=24", "train.checkpoint_every=8")
    wait_for(tmp_path / "checkpoints" / "step_00000008", process)
    process.kill()
    process.wait()
    resumed = trainer(tmp_path, "train.steps=24", "train.checkpoint_every=8")
    history = resumed.run()
    assert 9 <= history[0]["step"] <= 24  # it really resumed mid-run
    assert losses(tmp_path) == losses(reference_dir)  # bitwise: JSON keeps every float exactly
    assert all(torch.equal(a, b) for a, b in zip(expert_biases(resumed), expert_biases(reference)))
    assert any(b.abs().sum() > 0 for b in expert_biases(resumed))  # biases moved, and were restored
    assert resumed.loader.state_dict() == reference.loader.state_dict()
    for a, b in zip(resumed.model.state_dict().values(), reference.model.state_dict().values()):
        assert torch.equal(a, b)


def test_sigterm_saves_exits_cleanly_and_the_restart_finishes(tmp_path, straight):
    reference_dir, _ = straight
    process = start(tmp_path, "train.steps=24")
    wait_for(tmp_path / "metrics.jsonl", process)
    while len((tmp_path / "metrics.jsonl").read_text().splitlines()) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "received SIGTERM: saving step" in output
    saved = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert len(saved) == 1 and saved[0] != "step_00000024"
    restart = subprocess.run([sys.executable, "-m", "dsv3.train", f"train.run_dir={tmp_path}", *QUICK,
                              "train.steps=24"], capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr
    assert losses(tmp_path) == losses(reference_dir)


def test_resume_auto_skips_a_torn_or_corrupt_newest_checkpoint(tmp_path, caplog):
    t = trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    t.run()
    checkpoints = tmp_path / "checkpoints"
    assert [p.name for p in t.checkpointer.complete()] == ["step_00000006", "step_00000004", "step_00000002"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"
    # A save killed half-way leaves a .tmp folder: never chosen.
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000008.tmp")
    (checkpoints / "step_00000008.tmp" / ".metadata").unlink()
    # The newest complete checkpoint is corrupt: a data file lost its tail.
    data_file = next((checkpoints / "step_00000006").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    again = trainer(tmp_path, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    again.resume()
    assert again.step == 4
    assert "cannot be loaded" in caplog.text and data_file.name in caplog.text
    assert [p.name for p in again.checkpointer.complete()] == ["step_00000004", "step_00000002"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"


def test_explicit_resume_of_a_missing_checkpoint_fails_with_one_sentence(tmp_path):
    t = trainer(tmp_path, "train.steps=2", f"train.resume={tmp_path / 'nope'}")
    with pytest.raises(ValueError, match=r"train.resume=.*nope cannot be loaded"):
        t.run()


def test_keeps_the_newest_k_checkpoints(tmp_path):
    trainer(tmp_path, "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2").run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000006",
                                                                           "step_00000008"]


def test_async_checkpoint_resumes_like_a_blocking_one(tmp_path, straight):
    reference_dir, _ = straight
    first = trainer(tmp_path, "train.steps=24", "train.async_checkpoint=true", "train.checkpoint_every=4")
    first.total_steps = 12  # stop half-way, as a preemption would
    first.run()
    trainer(tmp_path, "train.steps=24", "train.async_checkpoint=true", "train.checkpoint_every=4").run()
    assert losses(tmp_path) == losses(reference_dir)


def test_metrics_have_the_documented_fields(straight):
    run_dir, _ = straight
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ("loss", "main_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "tokens",
                "max_violation", "peak_memory_gib", "mtp_weight", "bias_update_speed", "batch_size"):
        assert all(isinstance(r[key], (int, float)) for r in records), key
    assert all(len(r["max_violation_per_layer"]) == 2 for r in records)  # 1 MoE layer + 1 MTP block
    assert records[-1]["tokens"] == 24 * 4 * 32
    assert records[-1]["val_loss"] > 0 and "val_bpb" in records[-1]  # evaluated at the end


def test_wandb_offline_run_continues_the_same_id_after_resume(tmp_path):
    overrides = ["train.steps=6", "train.wandb.mode=offline", "train.wandb.project=dsv3-test"]
    first = trainer(tmp_path, *overrides)
    first.total_steps = 3
    first.run()
    trainer(tmp_path, *overrides).run()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # one per process, one run id
    assert all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs)


def test_plot_command_writes_a_png(straight, tmp_path):
    run_dir, _ = straight
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "dsv3.train.plot", str(run_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def test_bf16_adam_moments_train(tmp_path):
    """train.adam_state_dtype=bfloat16: the AdamW that the trainer builds (decay on matrices, none on
    gains) against AdamW written out in float64 whose stored moments are rounded to BF16 after each
    update (the step itself uses the unrounded ones, report section 3.3.3: only the stored moments are
    BF16), over 5 steps of fixed gradients spanning 3 decades; and the run's checkpoint holds BF16
    moments.

    Bounds, element by element, carried from step to step (u32 = 2^-24, ulp16(x) <= 2^-7 |x|):
    - FP32 vs float64 arithmetic moves each new moment by <= 4 u32 (|old| + |g| or g^2); the old
      stored moment's difference enters times beta;
    - rounding two values that differ by d to BF16 gives values that differ by <= d + ulp16 (one
      rounding "flips" at most);
    - the step moves p by lr r, r = m_hat / (sqrt(v_hat) + eps): |dr| from the moments' differences is
      bounded by evaluating r at the worst corner (|m| + dm, v - dv), plus ~8 u32 |r| of rounding;
      p's own roundings add ~3 u32 (|p| + lr |r|).
    Flips are rare (a value must fall within FP32 rounding of a BF16 midpoint), so the stored moments
    also equal the oracle's exactly in all but a handful of elements: a rounding other than to nearest,
    or none, differs in about half."""
    from dsv3.train.optim import build_optimizer
    import torch.distributed.checkpoint as dcp

    generator = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(0.1 * torch.randn(64, 48, generator=generator))
    module.gain = torch.nn.Parameter(1 + 0.1 * torch.randn(48, generator=generator))
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    optimizer = build_optimizer(module, lr, (b1, b2), eps, wd, "bfloat16", torch.device("cpu"))
    u32 = 2.0 ** -24
    oracle = {}
    for name, p in module.named_parameters():
        zeros = torch.zeros_like(p, dtype=torch.float64)
        oracle[name] = {"p": p.detach().double(), "m": zeros, "v": zeros, "dp": zeros, "dm": zeros, "dv": zeros,
                        "decay": wd if p.dim() >= 2 else 0.0}
    agree = elements = 0
    for step in range(1, 6):
        for name, p in module.named_parameters():
            scale = 10 ** (-3 * torch.rand(p.shape, generator=generator))
            p.grad = scale * torch.randn(p.shape, generator=generator)
        optimizer.step()
        for name, p in module.named_parameters():
            o, g = oracle[name], p.grad.double()
            m = b1 * o["m"] + (1 - b1) * g
            v = b2 * o["v"] + (1 - b2) * g * g
            dm = b1 * o["dm"] + 4 * u32 * (o["m"].abs() + g.abs())
            dv = b2 * o["dv"] + 4 * u32 * (o["v"] + g * g)
            c1, c2 = 1 - b1 ** step, 1 - b2 ** step
            r = (m / c1) / ((v / c2).sqrt() + eps)
            worst = ((m.abs() + dm) / c1) / (((v - dv).clamp_min(0) / c2).sqrt() + eps)
            dr = worst - r.abs() + 8 * u32 * r.abs()
            o["p"] = o["p"] * (1 - lr * o["decay"]) - lr * r
            o["dp"] = o["dp"] * (1 - lr * o["decay"]) + lr * dr + 3 * u32 * (o["p"].abs() + lr * r.abs())
            o["m"], o["v"] = bf16(m), bf16(v)
            o["dm"] = dm + 2.0 ** -7 * (m.abs() + dm)
            o["dv"] = dv + 2.0 ** -7 * (v + dv)
            state = optimizer.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
            for key, moment in (("exp_avg", "m"), ("exp_avg_sq", "v")):
                stored = state[key].double()
                excess = (stored - o[moment]).abs() - o["d" + moment]
                assert excess.max() <= 0, f"step {step} {key} of {name}: {excess.max().item():.3g} beyond the bound"
                agree += int((stored == o[moment]).sum())
                elements += stored.numel()
            excess = (p.detach().double() - o["p"]).abs() - o["dp"]
            assert excess.max() <= 0, f"step {step} {name}: {excess.max().item():.3g} beyond the bound"
    assert agree >= 0.99 * elements, f"{elements - agree} of {elements} stored moments differ from BF16 rounding"

    trainer(tmp_path, "train.steps=1", "train.adam_state_dtype=bfloat16", "train.eval_batches=1").run()
    metadata = dcp.FileSystemReader(str(tmp_path / "checkpoints" / "step_00000001")).read_metadata()
    moments = {k: m.properties.dtype for k, m in metadata.state_dict_metadata.items()
               if k.startswith("optimizer.") and k.endswith(("exp_avg", "exp_avg_sq"))}
    assert moments and set(moments.values()) == {torch.bfloat16}, moments  # the default is FP32


def test_environment_is_untouched_by_signals(tmp_path, monkeypatch):
    """The handlers are the trainer's only while it runs, and W&B's mode goes to wandb.init, not
    into the environment: a WANDB_MODE set before (to "dryrun", W&B's old name for offline, which
    the trainer never writes) is still there after an offline run."""
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    before = signal.getsignal(signal.SIGTERM)
    trainer(tmp_path, "train.steps=1", "train.eval_batches=1", "train.wandb.mode=offline",
            "train.wandb.project=dsv3-test").run()
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.environ.get("WANDB_MODE") == "dryrun"
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # W&B did run


def test_kill_during_a_save_leaves_the_previous_checkpoint_chosen(tmp_path):
    """A real `kill -9` while DCP writes step 4 (a model large enough for the write to take a
    while): the torn step_00000004.tmp is ignored and step 2 is resumed."""
    big = ["model.dim=512", "model.inter_dim=1024", "model.vocab_size=16384", "model.n_routed_experts=16",
           "model.moe_inter_dim=256", "train.steps=6", "train.checkpoint_every=2"]
    process = start(tmp_path, *big)
    torn = tmp_path / "checkpoints" / "step_00000004.tmp"
    wait_for(torn, process)
    process.kill()
    process.wait()
    assert torn.exists() and not (tmp_path / "checkpoints" / "step_00000004").exists()
    again = trainer(tmp_path, *big)
    history = again.run()
    assert history[0]["step"] == 3  # resumed from step 2
    assert not torn.exists()  # the next save cleared it
    assert [p.name for p in again.checkpointer.complete()][0] == "step_00000006"


def test_compile_setting_compiles_each_block_only_where_asked(tmp_path):
    """auto: eager on the CPU (compiling costs more than it saves there); on: every block, MTP's
    included, gets torch.compile. (That a compiled step equals the eager one is tests/test_gpu.py's.)"""
    auto = trainer(tmp_path / "auto", "train.steps=1")
    assert not auto.compiled and all(b._compiled_call_impl is None for b in auto.model.blocks())
    on = trainer(tmp_path / "on", "train.steps=1", "train.compile=on")
    assert len(on.model.blocks()) == 3  # 2 layers + 1 MTP block
    assert all(b._compiled_call_impl is not None for b in on.model.blocks())
    with pytest.raises(ValueError, match="train.compile must be auto, on or off"):
        trainer(tmp_path / "bad", "train.steps=1", "train.compile=yes")


def test_cuda_graphs_setting_is_refused_where_blocks_cannot_be_graphed(tmp_path):
    """train.cuda_graphs=true replays compiled blocks on a CUDA device: asked for on the CPU or with
    eager blocks, the run stops with one sentence naming the setting, before any file is written."""
    with pytest.raises(ValueError, match=r"train.cuda_graphs=true needs a CUDA device; this run is on cpu"):
        trainer(tmp_path / "cpu", "train.steps=1", "train.compile=on", "train.cuda_graphs=true")
    with pytest.raises(ValueError, match=r"train.cuda_graphs=true .* cannot run with train.compile=off"):
        trainer(tmp_path / "eager", "train.steps=1", "train.compile=off", "train.cuda_graphs=true")
    assert not (tmp_path / "cpu").exists() and not (tmp_path / "eager").exists()


def test_cuda_graph_steps_of_several_micro_batches_add_gradients_into_buffers_of_their_own(tmp_path):
    """The passes of train.cuda_graphs (run here on eager CPU blocks: the bookkeeping, not the
    graphs). A graph's gradient outputs live in memory its next replay overwrites: with two
    micro-batches every .grad exists before the first backward reaches it, for backward to add
    into, and the gradients equal the plain passes' exactly; with one, backward keeps its own
    tensor as .grad, as without graphs (no extra pass over the gradients)."""
    from dsv3.parallel.runtime import Runtime
    from dsv3.train.engine import Unpipelined

    t = trainer(tmp_path, "train.steps=1")
    batches = [torch.randint(t.cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    params = [p for p in t.model.parameters() if p.requires_grad]

    def step(passes, batches) -> tuple[list[bool], list[torch.Tensor]]:
        """Whether the first parameter had a .grad each time backward reached it, and the gradients."""
        for p in params:
            p.grad = None
        seen = []
        hook = params[0].register_hook(lambda grad: seen.append(params[0].grad is not None))
        passes.train_step(batches, 0.3)
        hook.remove()
        return seen, [p.grad.clone() for p in params]

    plain, graphs = Unpipelined(t.model, Runtime(), t.device), Unpipelined(t.model, Runtime(), t.device, cuda_graphs=True)
    seen_plain, want = step(plain, batches)
    seen_graphs, got = step(graphs, batches)
    assert seen_plain == [False, True] and seen_graphs == [True, True]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert step(graphs, batches[:1])[0] == [False]


def test_batch_ramp_runs_the_scheduled_micro_batches(tmp_path):
    """train.schedule.batch_ramp_start: the global batch grows linearly from 2 to 8 sequences over the
    first half of a 1280-token run, read before each step from the tokens trained so far and rounded
    down to whole micro-batches of 2 (report section 4.2's ramp, scaled), then stays at 8. The metrics
    record that batch and its tokens at every step, and the loader has handed out exactly those
    sequences (the final checkpoint's data position), so the steps really ran that many micro-batches."""
    import torch.distributed.checkpoint as dcp

    seq_len, total, start, end, full, micro = 32, 1280, 2, 0.5, 8, 2
    expected, tokens = [], 0
    while tokens < total:  # the ramp, written out
        p = tokens / total
        size = full if p >= end else max(micro, int(start + (full - start) * p / end) // micro * micro)
        expected.append(size)
        tokens += size * seq_len
    assert expected == [2, 2, 2, 2, 4, 4, 6, 8, 8, 8]
    history = trainer(tmp_path, "train.steps=0", f"train.tokens={total}", f"train.global_batch_size={full}",
                      f"train.schedule.batch_ramp_start={start}", f"train.schedule.batch_ramp_end={end}",
                      "train.eval_batches=1").run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in history] == list(range(1, len(expected) + 1))
    assert [r["batch_size"] for r in records] == expected
    assert [r["tokens"] for r in records] == [seq_len * sum(expected[:i + 1]) for i in range(len(expected))]
    state = {"trainer": {"loader": {"samples_seen": -1}}}
    dcp.load(state, checkpoint_id=str(tmp_path / "checkpoints" / f"step_{len(expected):08d}"))
    assert state["trainer"]["loader"]["samples_seen"] == sum(expected)
