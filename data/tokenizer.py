"""Tokenizers: a byte-level BPE trained locally in seconds, or any Hugging Face ``tokenizer.json``
(DeepSeek-V3's works unchanged). Special tokens are found by their usual spellings."""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

log = logging.getLogger("dsv3.data")

# What a trained tokenizer calls its special tokens, in this order.
SPECIAL_TOKENS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>",
                  "fim_begin": "<|fim_begin|>", "fim_hole": "<|fim_hole|>", "fim_end": "<|fim_end|>"}
# Other spellings found in released tokenizers: DeepSeek's (fullwidth bars), GPT-2's, StarCoder's.
KNOWN_SPELLINGS = {
    "bos": ["<｜begin▁of▁sentence｜>", "<s>"],
    "eos": ["<｜end▁of▁sentence｜>", "<|endoftext|>", "</s>"],
    "fim_begin": ["<｜fim▁begin｜>", "<fim_prefix>"],
    "fim_hole": ["<｜fim▁hole｜>", "<fim_suffix>"],
    "fim_end": ["<｜fim▁end｜>", "<fim_middle>"],
}


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    bos: int | None
    fim_begin: int | None
    fim_hole: int | None
    fim_end: int | None

    @property
    def has_fim(self) -> bool:
        return None not in (self.fim_begin, self.fim_hole, self.fim_end)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (every byte is a token, so nothing is ever unknown) with our special tokens.
    Logs the text it was trained on and the time taken when done."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    read = 0

    def counted():
        nonlocal read
        for text in texts:
            read += len(text.encode("utf-8"))
            yield text

    began = time.monotonic()
    tokenizer.train_from_iterator(counted(), trainer)
    log.info("trained a byte-level BPE of %d tokens on %.1f MB of text in %.1f s",
             tokenizer.get_vocab_size(), read / 1e6, time.monotonic() - began)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.tokenizer={path}: no such file.")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # the tokenizers library raises a bare Exception on a bad file
        raise ValueError(f"data.tokenizer={path} is not a readable tokenizer.json: {error}") from None


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def special_ids(tokenizer: Tokenizer, name: str) -> SpecialIds:
    """The ids of EOS (required), BOS and the three FIM sentinels (optional) in `tokenizer`."""
    found = {}
    for role, ours in SPECIAL_TOKENS.items():
        ids = [tokenizer.token_to_id(s) for s in [ours, *KNOWN_SPELLINGS[role]]]
        found[role] = next((i for i in ids if i is not None), None)
    if found["eos"] is None:
        spellings = ", ".join([SPECIAL_TOKENS["eos"], *KNOWN_SPELLINGS["eos"]])
        raise ValueError(f"Tokenizer {name} has no end-of-text token (looked for {spellings}).")
    return SpecialIds(**found)
