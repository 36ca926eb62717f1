"""The token store: what ``prepare`` writes and the loader memory-maps.

    <store>/meta.json            format, tokenizer hash and vocabulary, special ids, FIM settings,
                                 and per split: tokens, documents, UTF-8 bytes, shard files
    <store>/tokenizer.json       the tokenizer that made it
    <store>/<split>/NNNNN.bin    uint32 token ids; the shards of a split form one stream
    <store>/<split>/documents.npy  int64 start offset of every document in that stream, then the end

Documents are joined back to back, each ending in EOS; training windows run across them (no
cross-document attention mask, as DeepSeek-V3 trains). A store is written under a temporary name
and renamed when complete, so a folder with a meta.json is always whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = 1
DTYPE = np.uint32


class SplitWriter:
    """Appends documents to one split, rolling over to a new shard every `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory = directory
        self.split = split
        self.shard_tokens = shard_tokens
        (directory / split).mkdir(parents=True)
        self.shards: list[str] = []
        self.file = None
        self.in_shard = 0
        self.tokens = 0
        self.document_starts: list[np.ndarray] = []

    def write(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """values: the concatenated ids of consecutive documents of `lengths` tokens each."""
        starts = self.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        self.document_starts.append(np.asarray(starts, dtype=np.int64))
        values = values.astype(DTYPE, copy=False)
        while len(values):
            if self.file is None or self.in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(values), self.shard_tokens - self.in_shard)
            values[:take].tofile(self.file)
            self.in_shard += take
            self.tokens += take
            values = values[take:]

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self.shards.append(name)
        self.file = open(self.directory / name, "wb")
        self.in_shard = 0

    def close(self) -> dict:
        if self.file is not None:
            self.file.close()
        starts = np.concatenate([*self.document_starts, [self.tokens]]).astype(np.int64)
        np.save(self.directory / self.split / "documents.npy", starts)
        return {"tokens": int(self.tokens), "documents": int(len(starts) - 1), "shards": self.shards}


class SplitStream:
    """One split as a single read-only stream of token ids over its memory-mapped shards."""

    def __init__(self, root: Path, name: str, meta: dict):
        self.name = name
        self.meta = meta
        self.shards = []
        for shard in meta["shards"]:
            path = root / shard
            if not path.is_file():
                raise FileNotFoundError(f"Data store {root} is corrupt: shard {path} is missing.")
            self.shards.append(np.memmap(path, dtype=DTYPE, mode="r"))
        self.shard_starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.shard_starts[-1])
        if self.n_tokens != meta["tokens"]:
            raise ValueError(f"Data store {root} is corrupt: split {name!r} holds {self.n_tokens} tokens, "
                             f"its meta.json says {meta['tokens']}.")
        self.document_starts = np.load(root / name / "documents.npy", mmap_mode="r")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream, across shard boundaries."""
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        parts = []
        while start < stop:
            shard, offset = self.shards[first], start - self.shard_starts[first]
            take = min(stop - start, len(shard) - offset)
            parts.append(shard[offset:offset + take])
            start += take
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class TokenStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a complete data store (it has no meta.json); "
                                    "run `python -m dsv3.train.prepare` to make one.")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"Data store {self.path} is corrupt: meta.json does not parse ({error}).") from None
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"Data store {self.path} has format {self.meta.get('format')}, "
                             f"this version reads format {FORMAT}; prepare it again.")
        self.splits = {name: SplitStream(self.path, name, split) for name, split in self.meta["splits"].items()}

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def tokenizer_sha256(self) -> str:
        return self.meta["tokenizer_sha256"]

    def split(self, name: str) -> SplitStream:
        if name not in self.splits:
            raise KeyError(f"Data store {self.path} has no {name!r} split (it has {sorted(self.splits)}).")
        return self.splits[name]
