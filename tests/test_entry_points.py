"""The commands users run, as subprocesses through real Hydra composition."""
import json
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dsv3.train.config import compose

RECIPES = ["tiny", "small", "v2_lite_16b", "v2_236b", "v3_671b"]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_into_a_valid_model(name):
    cfg = compose([f"model={name}"])
    model_cfg = OmegaConf.to_object(cfg.model)
    assert model_cfg.n_layers > 0


def test_summary_prints_named_values():
    result = run("-m", "dsv3.train.summary", "model=v3_671b")
    assert result.returncode == 0, result.stderr
    values = dict(line.split(": ") for line in result.stdout.strip().splitlines())
    assert int(values["total_params"]) == 671026404352
    assert int(values["activated_params"]) == 37552282624
    assert int(values["mtp_params"]) == 11610067968
    assert float(values["gflop_per_token"]) == pytest.approx(250.45, abs=0.01)


@pytest.mark.parametrize("module, usage", [
    ("dsv3.train.prepare", "usage: python -m dsv3.train.prepare"),
    ("dsv3.train.summary", "usage: python -m dsv3.train.summary"),
    ("dsv3.train", "Configuration groups"),
    ("dsv3.train.plot", "usage:"),
    ("dsv3.launch", "usage: dsv3-launch"),
    ("dsv3.parallel.schedules", "usage:"),
    ("dsv3.launch.allocation", "usage: python -m dsv3.launch.allocation"),
])
def test_every_entry_point_answers_help(module, usage, tmp_path):
    """--help prints usage and exits 0, without composing a recipe or writing anything."""
    result = run("-m", module, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert usage in result.stdout
    assert not list(tmp_path.iterdir())


def test_every_console_script_answers_help(tmp_path):
    """The scripts setup.py installs answer --help too, run as a user runs them from the venv."""
    usages = {"dsv3-train": "Configuration groups", "dsv3-launch": "usage: dsv3-launch"}
    scripts = {e.name for e in distribution("dsv3").entry_points if e.group == "console_scripts"}
    assert scripts == set(usages)
    for name, usage in usages.items():
        result = subprocess.run([str(Path(sys.executable).parent / name), "--help"], capture_output=True,
                                text=True, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr
        assert usage in result.stdout, name
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, message", [
    ("model.no_such_key=1", "Could not override 'model.no_such_key'"),
    ("model.dim=wide", "Value 'wide' of type 'str' could not be converted to Integer"),
    ("model=no_such_recipe", "Could not find 'model/no_such_recipe'"),
    ("model.score_func=relu", "model.score_func must be 'sigmoid' or 'softmax'"),
])
def test_bad_overrides_fail_at_start_with_one_clear_message(override, message, tmp_path):
    summary = run("-m", "dsv3.train.summary", override)
    assert summary.returncode == 2 and message in summary.stderr
    train = run("-m", "dsv3.train", override, f"train.run_dir={tmp_path}/run")
    assert train.returncode != 0 and message in train.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_entry_point_prepares_the_corpus_and_writes_metrics(tmp_path):
    """The default recipe end to end on a slice of the embedded corpus."""
    run_dir = tmp_path / "run"
    result = run("-m", "dsv3.train", "train.steps=3", f"train.run_dir={run_dir}", "data.max_documents=100",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("loss", "main_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s", "max_violation"):
        assert all(isinstance(r[key], float) for r in records), key
    assert (run_dir / "config.yaml").exists()  # the resolved recipe, kept with the run
    assert len(list((tmp_path / "data_cache").glob("stdlib-*/meta.json"))) == 1
