"""``python -m dsv3.train.prepare [OVERRIDE ...]``: prepare a recipe's token store ahead of a run."""
import logging
import sys

USAGE = """\
usage: python -m dsv3.train.prepare [OVERRIDE ...]

Prepares the token store a run would read (tokenizer, FIM, packing), once, under data.cache_dir,
and prints its path and split sizes. The arguments are Hydra overrides, the same as dsv3-train's
(python -m dsv3.train --help lists the config groups and fields).

examples:
  python -m dsv3.train.prepare                  # the embedded corpus, as make train uses it
  python -m dsv3.train.prepare data=files data.source=/data/code data.vocab_size=32768 data.num_proc=16
"""


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dsv3.data.prepare import open_store
    from dsv3.train.config import compose, describe

    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE, end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = compose(overrides)
        data_cfg = OmegaConf.to_object(cfg.data)
        store = open_store(data_cfg, cfg.seed)
    except (HydraException, OmegaConfBaseException, ValueError, FileNotFoundError) as error:
        print(f"error: {describe(error)}", file=sys.stderr)
        return 2
    print(f"store: {store.path}")
    print(f"vocab_size: {store.vocab_size}")
    for name, split in store.meta["splits"].items():
        print(f"{name}: {split['tokens']} tokens, {split['documents']} documents, {split['bytes']} bytes, "
              f"{split['fim_documents']} FIM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
