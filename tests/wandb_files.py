"""Reads what a W&B offline run file (run-<id>.wandb) holds, as `wandb sync` would upload it.

The file is W&B's 7-byte header followed by a LevelDB log: 32 KiB blocks of chunks, each with a
CRC (4 bytes), a length (2) and a kind (1: a whole record, 2/3/4: first/middle/last part), and
each record a protobuf `Record`."""
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    position, parts = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0 and length == 0:
            position += left
            continue
        parts += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def history_steps(path: Path) -> list[int]:
    return [r.history.step.num for r in records(path) if r.WhichOneof("record_type") == "history"]
