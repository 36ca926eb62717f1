"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, complete or absent.

    <run_dir>/checkpoints/step_00000100/   one DCP checkpoint (model, optimizer, trainer state)
    <run_dir>/checkpoints/latest           the newest complete checkpoint's name, written last

A checkpoint is written to ``step_N.tmp`` and renamed when DCP has finished, so a process killed
mid-save leaves only a ``.tmp`` folder, which resuming ignores and the next save removes. The
newest K complete checkpoints are kept.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

log = logging.getLogger("dsv3.train")

STEP_DIR = re.compile(r"^step_(\d{8})$")


# DCP warns that it runs without a process group; a one-process run is meant to.
QUIET = ".*process group.*|.*single process.*|.*torch.distributed.*"


class Checkpointer:
    def __init__(self, directory: Path, keep: int, asynchronous: bool = False, runtime=None):
        """runtime: the parallel runtime of a multi-rank run (None for one process). Every rank
        writes its shards; the first rank alone cleans up, renames and updates `latest`."""
        self.directory = Path(directory)
        self.keep = keep
        self.asynchronous = asynchronous
        self.runtime = runtime
        self.is_main = runtime is None or runtime.is_main
        self.pending: Future | None = None

    def complete(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, step: int, state: dict) -> None:
        """Writes `state` as checkpoint `step`. With asynchronous saving, DCP stages the tensors
        to host memory before this returns and writes them in the background."""
        self.wait()
        if self.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("*.tmp"):  # left by a process killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f"{final.name}.tmp"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUIET)
            if self.asynchronous:
                self.pending = dcp.async_save(state, checkpoint_id=str(tmp))
                if self.is_main:
                    self.pending.add_done_callback(lambda future: future.exception() or self._publish(tmp, final))
            else:
                dcp.save(state, checkpoint_id=str(tmp))
                if self.is_main:
                    self._publish(tmp, final)
                self._barrier()  # no rank goes on before the checkpoint is complete

    def _barrier(self) -> None:
        if self.runtime is not None:
            self.runtime.barrier()

    def wait(self) -> None:
        """Blocks until a background save has finished (and raises its error, if any)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
            self._barrier()

    def _publish(self, tmp: Path, final: Path) -> None:
        os.replace(tmp, final)
        pointer = self.directory / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.directory / "latest")
        for old in self.complete()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)

    def load(self, path: Path, state: dict) -> None:
        """Loads checkpoint `path` into `state` in place; raises if it is incomplete or corrupt."""
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} has no .metadata, so it is not a complete DCP checkpoint")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=QUIET)
            try:
                dcp.load(state, checkpoint_id=str(path))
            except CheckpointException as error:  # a BaseException carrying each rank's traceback
                last_line = [line for line in str(error).splitlines() if line.strip()][-1].strip()
                raise ValueError(f"{path} cannot be read: {last_line}") from None
