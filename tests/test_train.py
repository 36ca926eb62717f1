"""The tiny recipe end to end: pinned first losses (guards against silent numeric drift), a real
fall of the loss on the synthetic chain, and `make train`'s command on the embedded corpus."""
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dsv3.train.config import compose
from dsv3.train.loop import Trainer

# The first five total losses of `dsv3-train data=synthetic` (tiny model and schedule, seed 0), CPU.
# A change to model math, init, data or optimizer moves them; update only for an intended change.
GOLDEN_LOSSES = [9.01344, 9.00979, 8.99478, 8.96434, 8.93797]


def tiny_run(tmp_path, *overrides, stop_after=None):
    cfg = compose([f"train.run_dir={tmp_path}", "train.device=cpu", "data=synthetic", "train.wandb.mode=disabled",
                   "train.eval_every=0", "train.checkpoint_every=0", *overrides])
    trainer = Trainer(OmegaConf.to_object(cfg))
    trainer.total_steps = stop_after or trainer.total_steps
    return trainer.run()


def test_golden_losses_of_the_tiny_recipe(tmp_path):
    history = tiny_run(tmp_path, stop_after=5)  # the first steps of the recipe's 300-step schedule
    assert [r["loss"] for r in history] == pytest.approx(GOLDEN_LOSSES, abs=2e-4)


def test_tiny_recipe_learns_the_synthetic_chain(tmp_path):
    history = tiny_run(tmp_path, "train.steps=120")
    start, end = history[0]["main_loss"], sum(r["main_loss"] for r in history[-10:]) / 10
    assert start == pytest.approx(6.93, abs=0.05)  # ln(1024): uniform over the vocabulary
    assert end < 2.3  # the chain's floor is ln(4) = 1.39
    assert all(r["grad_norm"] > 0 for r in history)


def test_make_train_command_on_the_embedded_corpus(tmp_path):
    """`make train` runs `dsv3-train` with no overrides: prepare the stdlib corpus, train 300 steps.
    Its time on 2 cores is a benchmark figure (benchmarks/RESULTS.md), not a test bound."""
    result = subprocess.run([sys.executable, "-m", "dsv3.train", f"train.run_dir={tmp_path / 'run'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 300
    assert records[0]["main_loss"] == pytest.approx(6.93, abs=0.05)
    assert sum(r["main_loss"] for r in records[-20:]) / 20 < 5.0  # 4.23 when measured
    assert records[-1]["val_loss"] < 5.3 and 0 < records[-1]["val_bpb"] < 3.5  # 4.50 and 2.72
