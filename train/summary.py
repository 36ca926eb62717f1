"""``python -m dsv3.train.summary [OVERRIDE ...]``: a recipe's parameters and FLOPs, nothing allocated."""
import sys

USAGE = """\
usage: python -m dsv3.train.summary [OVERRIDE ...]

Sizes a recipe's model without allocating it: exact parameter counts (total, activated, MTP) and
model FLOPs per trained token at data.seq_len, one "name: value" per line. The arguments are Hydra
overrides, the same as dsv3-train's (python -m dsv3.train --help lists the config groups and fields).

example:
  python -m dsv3.train.summary model=v3_671b data.seq_len=4096
"""


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from dsv3.model.summary import summary_lines
    from dsv3.train.config import compose, describe

    overrides = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE, end="")
        return 0
    try:
        cfg = compose(overrides)
        model_cfg = OmegaConf.to_object(cfg.model)
        seq_len = cfg.data.seq_len
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        print(f"error: {describe(error)}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(model_cfg, seq_len)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
