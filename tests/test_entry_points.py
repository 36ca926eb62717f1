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


# Published sizes in billions, each with one unit of its last digit: DeepSeek-V3 report (671B total,
# 37B activated per token), DeepSeek-V2 paper (236B / 21B; V2-Lite 15.7B / 2.4B). The papers do not
# say whether they round or truncate (V2-Lite's 2.45B reads as 2.4B, V3's 36.6B as 37B), so the
# check allows a whole unit of the last digit, not half of one.
PUBLISHED = {"v3_671b": ((671, 1), (37, 1)), "v2_236b": ((236, 1), (21, 1)),
             "v2_lite_16b": ((15.7, 0.1), (2.4, 0.1))}


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_into_a_valid_model(name):
    """Every value of recipes/model/<name>.yaml reaches ModelConfig unchanged (nothing dropped,
    renamed or overridden by the composition), and the published recipes have the published sizes."""
    from dsv3.model import count
    from dsv3.train.config import RECIPES as RECIPE_DIR

    model_cfg = OmegaConf.to_object(compose([f"model={name}"]).model)
    written = OmegaConf.to_container(OmegaConf.load(RECIPE_DIR / "model" / f"{name}.yaml"))
    assert len(written) >= 20  # the whole shape is written out, not left to defaults
    for key, value in written.items():
        assert getattr(model_cfg, key) == value, key
    if name in PUBLISHED:
        (total, total_digit), (activated, activated_digit) = PUBLISHED[name]
        counts = count(model_cfg)
        assert counts.total_params / 1e9 == pytest.approx(total, abs=total_digit)
        # The published activated figures leave out the input embedding (a lookup, no product; with
        # it V2-Lite would have 2.66B): our count includes it (and the head, a product per token).
        lookup = model_cfg.vocab_size * model_cfg.dim
        assert (counts.activated_params - lookup) / 1e9 == pytest.approx(activated, abs=activated_digit)


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
