"""The resumable, rank-sharded loader over a token store split.

Sample w of an epoch is the window of seq_len + 1 tokens starting at token w * seq_len, so
consecutive windows share one token (the last target of one is the first input of the next) and
an epoch covers the stream once. The global order of samples is a pure function of (seed, epoch):
epoch e visits its windows in a pseudo-random permutation keyed by both, built as a Feistel
network so that it needs no memory however many windows there are.

Each step takes the next `global_batch_size` samples of that order; data-parallel rank r takes
the r-th contiguous slice of them. The batch size may change from step to step (the recipe's
batch-size ramp): the order of samples does not depend on how it is cut into batches. The state
is one number, the samples consumed by all ranks together.
"""
from __future__ import annotations

import numpy as np
import torch

from .store import SplitStream

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A keyed pseudo-random permutation of range(n) evaluated pointwise, in O(1) memory."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        self.n = n
        self.half_bits = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # domain 4^half_bits >= n
        self.mask = np.uint64((1 << self.half_bits) - 1)
        seed = np.uint64(key % 2**64)
        self.round_keys = [_mix(np.array([seed + np.uint64(r)], dtype=np.uint64))[0] for r in range(self.ROUNDS)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half_bits), x & self.mask
        for round_key in self.round_keys:
            left, right = right, left ^ (_mix(right ^ round_key) & self.mask)
        return (left << np.uint64(self.half_bits)) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = self._encrypt(index.astype(np.uint64))
            outside = out >= self.n
            while outside.any():  # cycle-walk back into range(n); ends because _encrypt permutes
                out[outside] = self._encrypt(out[outside])
                outside = out >= self.n
        return out.astype(np.int64)


def rank_share(samples_seen: int, global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first global sample, count) that `rank` reads of the batch that starts at `samples_seen`:
    the rank-th contiguous slice, so ranks are disjoint and together complete."""
    if global_batch_size % world_size:
        raise ValueError(f"The global batch of {global_batch_size} sequences does not split evenly over "
                         f"{world_size} data-parallel ranks.")
    local = global_batch_size // world_size
    return samples_seen + rank * local, local


class TokenLoader:
    def __init__(self, split: SplitStream, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.split = split
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"data.seq_len={seq_len} needs at least {seq_len + 1} tokens, but the "
                             f"{split.name!r} split holds {split.n_tokens}.")
        self.samples_seen = 0
        self._orders: dict[int, FeistelPermutation] = {}

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.n_windows

    def window_starts(self, samples: np.ndarray) -> np.ndarray:
        """Token offsets of the global samples `samples` (indices into the infinite order)."""
        epochs, within = np.divmod(samples, self.n_windows)
        if self.shuffle:
            for epoch in np.unique(epochs):
                order = self._orders.get(int(epoch))
                if order is None:
                    order = self._orders[int(epoch)] = FeistelPermutation(self.n_windows, self.seed * 1_000_003 + int(epoch))
                selected = epochs == epoch
                within[selected] = order(within[selected])
        return within * self.seq_len

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        """This rank's (global_batch_size / world_size, seq_len + 1) token ids of the next step."""
        first, local = rank_share(self.samples_seen, global_batch_size, self.rank, self.world_size)
        starts = self.window_starts(np.arange(first, first + local, dtype=np.int64))
        batch = np.stack([self.split.read(s, s + self.seq_len + 1) for s in starts]).astype(np.int64)
        self.samples_seen += global_batch_size
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seq_len": self.seq_len, "seed": self.seed,
                "n_windows": self.n_windows, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seq_len", "seed", "n_windows", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(f"The loader state was saved with {key}={state[key]}, but this run has "
                                 f"{key}={mine[key]}; resuming would not continue the same data order.")
        self.samples_seen = int(state["samples_seen"])
