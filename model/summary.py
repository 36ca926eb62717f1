"""Size a recipe without allocating it: ``python -m dsv3.model.summary model=v3_671b``.

Prints one ``name: value`` per line. Parameter counts are exact; FLOPs are model FLOPs per trained
token (forward + backward) at ``data.seq_len``, the main model's and what MTP adds.
"""
import sys

from omegaconf import OmegaConf

from dsv3.model.config import ModelConfig
from dsv3.model.counting import count


def summary_lines(cfg: ModelConfig, seq_len: int) -> list[str]:
    counts = count(cfg, seq_len)
    return [
        f"total_params: {counts.total_params}",
        f"activated_params: {counts.activated_params}",
        f"mtp_params: {counts.mtp_params}",
        f"mtp_activated_params: {counts.mtp_activated_params}",
        f"seq_len: {seq_len}",
        f"gflop_per_token: {counts.flop_per_token / 1e9:.6g}",
        f"mtp_gflop_per_token: {counts.mtp_flop_per_token / 1e9:.6g}",
    ]


def describe(error: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the bad key and value; show both."""
    cause = error.__cause__
    return f"{error}\n{cause}" if cause is not None and str(cause) not in str(error) else str(error)


USAGE = """\
usage: python -m dsv3.model.summary [OVERRIDE ...]

Sizes a recipe's model without allocating it: exact parameter counts (total, activated, MTP) and
model FLOPs per trained token at data.seq_len, one "name: value" per line. The arguments are Hydra
overrides, the same as dsv3-train's (python -m dsv3.train --help lists the config groups and fields).

example:
  python -m dsv3.model.summary model=v3_671b data.seq_len=4096
"""


def main(argv: list[str] | None = None) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from dsv3.train.config import compose

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
