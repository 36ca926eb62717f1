"""Fill-in-the-middle (report section 4.1), applied per document before packing.

A FIM document is cut at two random character positions into prefix, middle and suffix, each
tokenised on its own, and laid out as
  PSM: <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <eos>
  SPM: <|fim_begin|> <|fim_hole|> suffix <|fim_end|> prefix middle <eos>
(SPM is the "joint" variant of Bavarian et al. 2022: prefix and middle stay one contiguous text).
Every other document is its tokens followed by <eos>. Whether and where a document is cut is a
function of (seed, document index) alone, so the result does not depend on num_proc.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from .tokenizer import SpecialIds


def fim_plan(text: str, seed: int, index: int, fim_rate: float, spm_rate: float):
    """None for a plain document, else (cut_a, cut_b, spm) with 0 <= cut_a <= cut_b <= len(text)."""
    rng = np.random.default_rng([seed, index])
    if fim_rate == 0 or rng.random() >= fim_rate:
        return None
    cut_a, cut_b = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    return cut_a, cut_b, bool(rng.random() < spm_rate)


def encode_documents(texts: list[str], indices: list[int], tokenizer: Tokenizer, special: SpecialIds,
                     seed: int, fim_rate: float, spm_rate: float) -> tuple[list[list[int]], list[bool]]:
    """Token ids (EOS included) and a FIM flag for each document, in one batched encode call."""
    plans = [fim_plan(text, seed, index, fim_rate, spm_rate) for text, index in zip(texts, indices)]
    pieces = []
    for text, plan in zip(texts, plans):
        if plan is None:
            pieces.append(text)
        else:
            cut_a, cut_b, _ = plan
            pieces += [text[:cut_a], text[cut_a:cut_b], text[cut_b:]]
    encoded = iter(e.ids for e in tokenizer.encode_batch(pieces, add_special_tokens=False))
    documents = []
    for plan in plans:
        if plan is None:
            documents.append(next(encoded) + [special.eos])
            continue
        prefix, middle, suffix = next(encoded), next(encoded), next(encoded)
        if plan[2]:
            tokens = [special.fim_begin, special.fim_hole, *suffix, special.fim_end, *prefix, *middle]
        else:
            tokens = [special.fim_begin, *prefix, special.fim_hole, *suffix, special.fim_end, *middle]
        documents.append(tokens + [special.eos])
    return documents, [plan is not None for plan in plans]
