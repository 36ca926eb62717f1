"""A synthetic token source with structure to learn: a fixed random Markov chain.

Every token has `branching` equally likely successors drawn once from the seed, so a model that
learns the chain reaches a loss of ln(branching) nats, far below the ln(vocab) of random tokens.
It has the interface of TokenLoader: sample i of the global order is a pure function of
(seed, i), ranks take contiguous slices of each global batch, and the state is one number.
"""
import math

import numpy as np
import torch

from .loader import rank_share


class SyntheticLoader:
    def __init__(self, vocab_size: int, branching: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, held_out: bool = False):
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(vocab_size, (vocab_size, branching), generator=generator)
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.first_sample = 2**40 if held_out else 0  # held-out samples: the same chain, other draws
        self.samples_seen = 0

    @property
    def entropy(self) -> float:
        """The chain's entropy per token in nats: the loss floor a perfect model reaches."""
        return math.log(self.successors.shape[1])

    def samples(self, first: int, count: int) -> torch.Tensor:
        """Samples first .. first + count - 1 of the order, (count, seq_len + 1) token ids."""
        starts, choices = [], []
        for index in range(first, first + count):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.first_sample + index) % 2**63)
            starts.append(torch.randint(self.vocab_size, (1,), generator=generator))
            choices.append(torch.randint(self.successors.shape[1], (self.seq_len,), generator=generator))
        successors, choices = self.successors.numpy(), torch.stack(choices).numpy()
        tokens = np.empty((count, self.seq_len + 1), dtype=np.int64)
        tokens[:, 0] = torch.cat(starts).numpy()
        for i in range(self.seq_len):  # walk the chain, all samples at once
            tokens[:, i + 1] = successors[tokens[:, i], choices[:, i]]
        return torch.from_numpy(tokens)

    def next_batch(self, global_batch_size: int) -> torch.Tensor:
        """This rank's (global_batch_size / world_size, seq_len + 1) token ids of the next step."""
        first, local = rank_share(self.samples_seen, global_batch_size, self.rank, self.world_size)
        self.samples_seen += global_batch_size
        return self.samples(first, local)

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.samples_seen = int(state["samples_seen"])
