"""Where training tokens come from."""
from dataclasses import dataclass


@dataclass
class DataConfig:
    source: str = "synthetic"  # "synthetic": a seeded Markov chain over the vocabulary
    seq_len: int = 128  # tokens per training sequence (each sample holds seq_len + 1)
    synthetic_branching: int = 4  # successors per token in the synthetic chain

    def __post_init__(self) -> None:
        if self.source != "synthetic":
            raise ValueError(f"data.source={self.source!r} is unknown; the available source is 'synthetic'.")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be positive, got {self.seq_len}.")
        if self.synthetic_branching <= 0:
            raise ValueError(f"data.synthetic_branching must be positive, got {self.synthetic_branching}.")
