"""Writing a run's files so that a kill, a full disk or a flipped byte never costs what was written
before: whole-file writes go through a temporary name and a rename, checkpoints carry a checksum of
every file, and a full disk becomes one sentence instead of a traceback."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"


class WriteFailed(OSError):
    """A file of the run could not be written; the message says which, why, and what was cleaned
    up. The run stops (exit code 2) and can be resumed once the cause is gone."""


class DiskFull(WriteFailed):
    """No space left where the run writes."""


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException) -> bool:
    """True if `error` or anything it wraps (DCP collects each rank's exception) is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_atomically(path: Path, text: str) -> None:
    """`path` holds either its old content or `text`, whatever happens during the write."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Records the size and sha256 of every file under `folder` in folder/manifest.json (hashed in
    threads: hashlib releases the GIL, so large checkpoints hash at disk speed)."""
    files = _files(folder)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(sha256, files))
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}
    write_atomically(folder / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify_manifest(folder: Path) -> str | None:
    """None if every file of folder/manifest.json is there with its recorded size and sha256, else a
    sentence naming the first file that is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"{manifest} does not parse ({error})"
    for name, entry in entries.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {entry['bytes']} were written"
        if sha256(path) != entry["sha256"]:
            return f"{path} does not match the checksum recorded when it was written"
    extra = {str(p.relative_to(folder)) for p in _files(folder)} - set(entries)
    if extra:
        return f"{folder / sorted(extra)[0]} was not part of the checkpoint when it was written"
    return None
