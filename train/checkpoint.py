"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, complete or absent.

    <run_dir>/checkpoints/step_00000100/   one DCP checkpoint (model, optimizer, trainer state),
                                           its config.yaml and manifest.json (size and sha256 of
                                           every file, checked before it is loaded)
    <run_dir>/checkpoints/latest           the newest complete checkpoint's name, written last
    <run_dir>/checkpoints/unusable/        checkpoints that could not be loaded or were superseded,
                                           moved here (never deleted) with the reason in the name

A checkpoint is written to ``step_N.tmp`` and renamed when DCP has finished and the manifest is
written, so a process killed mid-save leaves only a ``.tmp`` folder, which resuming ignores and the
next save removes; a failed save (a full disk) removes its ``.tmp`` at once. After each save the
newest ``keep`` complete checkpoints are kept, the one just written always among them: that
rotation is the only place anything of a run is deleted.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dsv3.parallel.runtime import Runtime

from .storage import (MANIFEST, DiskFull, WriteFailed, free_bytes, is_disk_full, verify_manifest, write_atomically,
                      write_manifest)

log = logging.getLogger("dsv3.train")

STEP_DIR = re.compile(r"^step_(\d{8})$")
CONFIG = "config.yaml"

# DCP warns that it runs without a process group; a one-process run is meant to.
QUIET = ".*process group.*|.*single process.*|.*torch.distributed.*"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def tensor_bytes(state) -> int:
    """Bytes of the tensors in a nested state dict: about what DCP writes for it."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    return 0


def first_line(error: BaseException) -> str:
    """The message of `error` in one line (DCP's carry every rank's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if isinstance(error, CheckpointException) and lines else (lines[0] if lines else repr(error))


class Checkpointer:
    def __init__(self, directory: Path, keep: int, runtime: Runtime, asynchronous: bool = False):
        """Every rank of `runtime` writes its shards; the first rank alone hashes, renames, rotates
        and updates `latest`."""
        self.directory = Path(directory)
        self.keep = keep
        self.asynchronous = asynchronous
        self.runtime = runtime
        self.is_main = runtime.is_main
        self.pending: tuple[Future, Path, Path] | None = None
        self.needed = 0  # bytes the checkpoint being written takes, about
        self.publisher = ThreadPoolExecutor(max_workers=1) if asynchronous else None
        # An asynchronous save finishes DCP's collectives from a background thread: on a group of
        # its own, so that they never interleave with the next steps' collectives on the default
        # group (which deadlocks them both).
        self.save_group = runtime.background_group() if asynchronous else None

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=step_of, reverse=True)

    # --- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state: dict, config: str) -> None:
        """Writes `state` as checkpoint `step`, with `config` (the run's YAML) beside it. With
        asynchronous saving, DCP stages the tensors to host memory before this returns and writes
        them in the background. A write that fails (a full disk) removes what it wrote and raises
        one sentence."""
        self.wait()
        if self.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):  # left by a process killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self.runtime.barrier()
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f"{final.name}.tmp"
        self.needed = int(1.05 * self.runtime.sum_over_ranks(tensor_bytes(state))) + 2**20  # + pickled metadata
        if free_bytes(self.directory) < self.needed:  # refused before a byte is written
            raise DiskFull(f"No space left on the device of {self.directory} for checkpoint {final.name}: it needs "
                           f"about {self.needed / 2**20:.0f} MiB, {free_bytes(self.directory) / 2**20:.0f} MiB "
                           "are free; nothing was written.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUIET)
            try:
                if self.asynchronous:
                    written = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.save_group)
                    # The first rank publishes as soon as the write is done, not at the next save.
                    self.pending = (self.publisher.submit(self._publish_when_written, written, tmp, final, config)
                                    if self.is_main else written), tmp, final
                    return
                dcp.save(state, checkpoint_id=str(tmp))
                if self.is_main:
                    self._publish(tmp, final, config)
            except BaseException as error:
                self._fail(error, tmp, final)
        self.runtime.barrier()  # no rank goes on before the checkpoint is complete

    def wait(self) -> None:
        """Blocks until a background save has finished; raises its error as `save` would."""
        if self.pending is None:
            return
        (future, tmp, final), self.pending = self.pending, None
        try:
            future.result()
        except BaseException as error:
            self._fail(error, tmp, final)
        self.runtime.barrier()

    def _publish_when_written(self, written: Future, tmp: Path, final: Path, config: str) -> None:
        written.result()
        self._publish(tmp, final, config)

    def _fail(self, error: BaseException, tmp: Path, final: Path) -> None:
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error
        # Not every writer reports ENOSPC as such (torch.save's zip writer reports a bad position).
        if is_disk_full(error) or free_bytes(self.directory) < self.needed:
            raise DiskFull(f"No space left on the device of {self.directory} while writing checkpoint "
                           f"{final.name}; removed the partial write {tmp.name}.") from None
        raise WriteFailed(f"Writing checkpoint {final.name} into {self.directory} failed ({first_line(error)}); "
                      f"removed the partial write {tmp.name}.") from None

    def _publish(self, tmp: Path, final: Path, config: str) -> None:
        write_atomically(tmp / CONFIG, config)
        write_manifest(tmp)
        if final.exists():  # never the case unless a folder was put there by hand
            self.move_aside(final, "replaced")
        os.replace(tmp, final)
        write_atomically(self.directory / "latest", final.name + "\n")
        for old in [p for p in self.complete() if p != final][self.keep - 1:]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)

    # --- loading ---------------------------------------------------------------------------------

    def saved_config(self, path: Path) -> str | None:
        config = path / CONFIG
        return config.read_text() if config.is_file() else None

    def verify(self, path: Path) -> None:
        """Raises ValueError naming the first file of `path` that is missing, truncated or changed
        since it was written. The first rank reads the files; every rank gets its verdict."""
        problem = None
        if self.is_main:
            if not (path / ".metadata").is_file():
                problem = f"{path} has no .metadata, so it is not a complete DCP checkpoint"
            elif (path / MANIFEST).is_file():
                problem = verify_manifest(path)
            else:
                log.warning("checkpoint %s predates checksums; loading it unverified", path)
        problem = self.runtime.from_main(problem)
        if problem:
            raise ValueError(problem)

    def load(self, path: Path, state: dict) -> None:
        """Loads checkpoint `path` into `state` in place; raises if it is incomplete or corrupt."""
        self.verify(path)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUIET)
            try:
                dcp.load(state, checkpoint_id=str(path))
            except CheckpointException as error:  # a BaseException carrying each rank's traceback
                raise ValueError(f"{path} cannot be read: {first_line(error)}") from None

    def move_aside(self, path: Path, reason: str) -> Path:
        """Moves checkpoint `path` to unusable/<name>.<reason>-<time> (first rank; every rank
        returns the new path). Nothing is deleted."""
        aside = self.directory / "unusable" / f"{path.name}.{reason}-{time.strftime('%Y%m%dT%H%M%S')}"
        if self.is_main:
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside)
            latest = self.directory / "latest"
            newest = self.complete()
            if newest:
                write_atomically(latest, newest[0].name + "\n")
            elif latest.exists():
                latest.unlink()
        self.runtime.barrier()
        return aside
