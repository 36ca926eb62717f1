"""Every command the README shows runs as written. The CPU ones run here, shortened by overrides
(two steps, a slice of the corpus, placeholders such as DIR or /data/code made real); the others
are listed below with why they cannot run on a CPU-only machine, so a new README command is either
run or explained."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

NOT_ON_CPU = {
    "make train": "the whole default run: tests/test_train.py runs its exact command",
    "make test": "the test suite itself",
    "python3 -m venv .venv && .venv/bin/pip install torch": "downloads torch from the PyTorch index",
    "dsv3-train model=small schedule=v3": "model=small at 4096 tokens needs a GPU",
    "torchrun --standalone --nproc-per-node 4 -m dsv3.train model=small": "model=small on 4 GPUs",
    "dsv3-launch local model=small": "model=small on the GPUs of this machine",
    "dsv3-launch slurm cluster=mycluster": "submits to a real cluster: tests/test_launch.py submits to one",
    "python -m dsv3.train model=small precision=fp8": "cuBLASLt FP8 needs a Hopper GPU",
    "python -m dsv3.train.prepare data=files data.source=Salesforce/wikitext": "downloads from the hub",
}


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks, continuation lines joined, comments dropped."""
    commands, in_block = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block or not line.strip() or line.lstrip().startswith("#"):
            continue
        line = line.split("  #")[0].rstrip()
        if commands and commands[-1].endswith("\\"):
            commands[-1] = commands[-1][:-1].rstrip() + " " + line.strip()
        elif line.startswith("$ "):
            commands.append(line[2:])
        elif not re.match(r"^[a-z_]+: ", line):  # not a line of shown output
            commands.append(line)
    return commands


def not_on_cpu(command: str) -> str | None:
    return next((why for prefix, why in NOT_ON_CPU.items() if command.startswith(prefix)
                 and (prefix != "make train" or command == "make train")), None)


def shown_output(command: str) -> list[str]:
    """The output lines the README prints under `$ command`."""
    lines = README.read_text().splitlines()
    start = lines.index(f"$ {command}") + 1
    return lines[start:lines.index("```", start)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder the commands run in: relative run dirs and the data cache land here; the
    placeholders exist (a code folder, a jsonl file, a tokenizer with FIM sentinels)."""
    work = tmp_path_factory.mktemp("readme")
    (work / "code").mkdir()
    for i in range(30):
        (work / "code" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 20)
    (work / "corpus.jsonl").write_text("".join(f'{{"content": "document {i}: " }}\n'.replace('" }', f'{"word " * i}" }}')
                                              for i in range(1, 40)))
    prepared = subprocess.run([sys.executable, "-m", "dsv3.train.prepare", "data.max_documents=60"], cwd=work,
                              capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr
    store = next((work / "data_cache").glob("stdlib-*"))
    (work / "tokenizer.json").write_bytes((store / "tokenizer.json").read_bytes())
    return work


def runnable(command: str, work: Path) -> list[str]:
    """The README command as an argument list for this machine, shortened."""
    command = (command.replace("/data/code", str(work / "code")).replace("corpus.jsonl", str(work / "corpus.jsonl"))
               .replace("/models/DeepSeek-V3/tokenizer.json", str(work / "tokenizer.json"))
               .replace("train.steps=N", "train.steps=2").replace("train.run_dir=DIR", "train.run_dir=runs/dir"))
    args = shlex.split(command)
    if args[:2] == ["make", "train"]:  # the Makefile's recipe: $(BIN)/dsv3-train $(ARGS)
        assert "$(BIN)/dsv3-train $(ARGS)" in (ROOT / "Makefile").read_text()
        args = ["dsv3-train", *shlex.split(args[2].split("=", 1)[1])]
    if args[0].endswith("dsv3-train"):
        args = [sys.executable, "-m", "dsv3.train", *args[1:]]
    elif args[0] == "python":
        args = [sys.executable, *args[1:]]
    elif args[0] == "torchrun":
        args = [sys.executable, "-m", "torch.distributed.run", *args[1:]]
    elif args[0] == "dsv3-launch":
        args = [sys.executable, "-m", "dsv3.launch", *args[1:]]
    trains = "dsv3.train" in args or (args[2:3] == ["local"] and "dsv3.launch" in args)
    if trains and "--cfg" not in args:
        args = [a for a in args if not a.startswith(("train.steps=", "train.tokens="))]
        args += ["train.steps=2", "train.eval_every=0", "train.wandb.mode=disabled", "data.max_documents=60"]
    if "dsv3.train.prepare" in args:
        args += ["data.max_documents=60", "data.num_proc=1"]
    return args


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15 and all(not_on_cpu(c) for c in COMMANDS if c.startswith("make test"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if not not_on_cpu(c)])
def test_readme_command_runs(command, workdir):
    result = subprocess.run(runnable(command, workdir), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    if f"$ {command}" in README.read_text():  # the README shows its output: it must be what it prints
        assert result.stdout.splitlines() == shown_output(command)
