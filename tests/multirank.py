"""Runs a function on N real gloo ranks (spawned processes) and collects what each returns."""
import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world_size: int, tmp_path: Path, *args) -> list:
    """fn(rank, world_size, *args) on each rank, with the default process group initialised."""
    out_dir = tmp_path / f"ranks-{fn.__name__}-{world_size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        mp.spawn(_entry, args=(world_size, free_port(), str(out_dir), fn, args), nprocs=world_size, join=True)
    except Exception as error:
        errors = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.error")))
        raise AssertionError(f"a rank failed:\n{errors}") from error
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
