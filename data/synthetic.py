"""A synthetic token source with structure to learn: a fixed random Markov chain.

Every token has `branching` equally likely successors drawn once from the seed, so a model that
learns the chain reaches a loss of ln(branching) nats, far below the ln(vocab) of random tokens.
Batches are a pure function of (seed, step, micro-batch): a resumed run sees the same data.
"""
import math

import torch


class MarkovTokens:
    def __init__(self, vocab_size: int, branching: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.successors = torch.randint(vocab_size, (vocab_size, branching), generator=generator)
        self.seed = seed

    @property
    def entropy(self) -> float:
        """The chain's entropy per token in nats: the loss floor a perfect model reaches."""
        return math.log(self.successors.shape[1])

    def batch(self, batch_size: int, seq_len: int, step: int, micro_batch: int = 0) -> torch.Tensor:
        """(batch_size, seq_len + 1) token ids: inputs are [:, :-1], targets [:, 1:]."""
        stream = (self.seed * 1_000_003 + step) * 1_000_003 + micro_batch
        generator = torch.Generator().manual_seed(stream % 2**63)
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=generator)
        choices = torch.randint(self.successors.shape[1], (batch_size, seq_len), generator=generator)
        for i in range(seq_len):
            tokens[:, i + 1] = self.successors[tokens[:, i], choices[:, i]]
        return tokens
