"""Where training tokens come from, and how raw text becomes them."""
from dataclasses import dataclass


@dataclass
class DataConfig:
    # "stdlib": this Python's own standard-library sources (the embedded corpus);
    # "synthetic": a seeded Markov chain over the model's vocabulary, nothing prepared;
    # a path: a .txt/.jsonl/.json/.parquet file or a folder of them;
    # anything else: a Hugging Face dataset name (cached, or downloaded when online).
    source: str = "stdlib"
    seq_len: int = 128  # tokens per training sequence (each sample holds seq_len + 1)
    # Tokenizer: a tokenizer.json path, or "" to train a byte-level BPE of `vocab_size` on the corpus.
    tokenizer: str = ""
    vocab_size: int = 1024
    tokenizer_train_bytes: int = 64_000_000  # BPE training reads at most this much text
    text_field: str = "text"  # the column holding the text, for jsonl/parquet/hub sources
    # A text file (.txt, .py, ...) holding a NUL byte is taken for binary, since text never holds one,
    # and refused; true reads it anyway. Either way undecodable UTF-8 bytes become U+FFFD and are
    # counted (meta.json's replaced_bytes), so text in another encoding only warns.
    allow_binary: bool = False
    hf_split: str = "train"  # the split read from a hub dataset
    hf_subset: str = ""  # the hub dataset's configuration name, where it has several
    max_documents: int = 0  # read at most this many documents (0: all); for quick runs
    validation_fraction: float = 0.02  # documents (files, for stdlib) hashed into the validation split
    # Fill-in-the-middle, per training document, before packing (report section 4.1)
    fim_rate: float = 0.1
    fim_spm_rate: float = 0.0  # of the FIM documents, the share in SPM rather than PSM order
    num_proc: int = 2  # tokenisation processes
    cache_dir: str = "data_cache"  # prepared stores live here, one folder per distinct setting
    store: str = ""  # an explicit prepared store to use instead of one under cache_dir
    synthetic_branching: int = 4  # successors per token in the synthetic chain

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}.")
        check(self.vocab_size >= 256 + 8, f"data.vocab_size={self.vocab_size} is below the 256 bytes "
              "plus special tokens that a byte-level BPE needs.")
        check(0 <= self.fim_rate <= 1, f"data.fim_rate must lie in [0, 1], got {self.fim_rate}.")
        check(0 <= self.fim_spm_rate <= 1, f"data.fim_spm_rate must lie in [0, 1], got {self.fim_spm_rate}.")
        check(0 <= self.validation_fraction < 1,
              f"data.validation_fraction must lie in [0, 1), got {self.validation_fraction}.")
        check(self.num_proc >= 1, f"data.num_proc must be >= 1, got {self.num_proc}.")
        check(self.max_documents >= 0, f"data.max_documents must be >= 0, got {self.max_documents}.")
        check(self.synthetic_branching > 0,
              f"data.synthetic_branching must be positive, got {self.synthetic_branching}.")
