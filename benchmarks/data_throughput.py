"""Data pipeline throughput on this machine, printed as one table:

1. prepare: the embedded corpus (this Python's stdlib sources) from raw files to a finished store
   with a freshly trained BPE, timed end to end and per stage, in tokens per second.
2. loader: shuffled windows of `--seq-len` + 1 tokens from the memory-mapped store, in tokens
   per second, against what one GPU consumes (`--gpu-tokens-per-s`, e.g. from model_step.py).

Usage: python benchmarks/data_throughput.py [--num-proc 2] [--seq-len 4096] [--gpu-tokens-per-s N]
       python benchmarks/data_throughput.py --smoke   (the first 40 stdlib files, a 300-token BPE, seconds)
"""
import argparse
import logging
import os
import tempfile
import time

from dsv3.data import prepare as prep
from dsv3.data.config import DataConfig
from dsv3.data.loader import TokenLoader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu-tokens-per-s", type=float, default=0.0)
    parser.add_argument("--max-documents", type=int, default=0, help="read only the first N files (0: all)")
    parser.add_argument("--loader-seconds", type=float, default=3.0)
    parser.add_argument("--smoke", action="store_true", help="a slice of the corpus and a tiny BPE, seconds")
    args = parser.parse_args()
    if args.smoke:
        args.num_proc, args.vocab_size, args.seq_len, args.max_documents, args.loader_seconds = 1, 300, 64, 40, 0.3
    logging.basicConfig(level=logging.WARNING)
    print(f"# {os.cpu_count()} cores, num_proc {args.num_proc}" + (", smoke" if args.smoke else ""))

    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(source="stdlib", vocab_size=args.vocab_size, num_proc=args.num_proc, cache_dir=cache,
                         max_documents=args.max_documents)
        start = time.perf_counter()
        dataset, _ = prep.read_source(cfg)
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        prep.train_bpe(prep._training_texts(dataset, cfg), cfg.vocab_size)
        bpe_s = time.perf_counter() - start
        start = time.perf_counter()
        store = prep.prepare(cfg, seed=0, path=prep.store_path(cfg, seed=0))
        total_s = time.perf_counter() - start  # read + BPE + tokenise + write, as `make train` does it
        tokens = sum(s["tokens"] for s in store.meta["splits"].values())
        megabytes = sum(s["bytes"] for s in store.meta["splits"].values()) / 1e6

        loader = TokenLoader(store.split("train"), args.seq_len, seed=0)
        loader.next_batch(args.batch)
        batches, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.loader_seconds:
            loader.next_batch(args.batch)
            batches += 1
        loader_tps = batches * args.batch * args.seq_len / (time.perf_counter() - start)

    print(f"| {'stage':<48} | {'seconds':>8} | {'tokens/s':>12} |")
    print(f"| corpus: {megabytes:.1f} MB, {tokens / 1e6:.2f}M tokens, vocab {args.vocab_size:<7} | | |")
    print(f"| {'read files':<48} | {read_s:8.2f} | |")
    print(f"| {'train BPE':<48} | {bpe_s:8.2f} | |")
    print(f"| {'prepare end to end (read, BPE, tokenise, write)':<48} | {total_s:8.2f} | {tokens / total_s:12.0f} |")
    print(f"| {f'loader, {args.batch} x {args.seq_len + 1} shuffled windows':<48} | | {loader_tps:12.0f} |")
    if args.gpu_tokens_per_s:
        print(f"| {'loader / one GPU step of the recipe':<48} | | {loader_tps / args.gpu_tokens_per_s:11.0f}x |")


if __name__ == "__main__":
    main()
