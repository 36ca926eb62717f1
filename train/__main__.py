"""``python -m dsv3.train [overrides]`` and ``dsv3-train [overrides]``: train a recipe.

Hydra composes ``recipes/config.yaml`` (default model: tiny) with the overrides, checks every key
and type against the schema in ``dsv3.train.config``, and hands the typed config to the loop.
Bad input (an impossible setting, a missing file) ends the run with one sentence and exit code 2;
HYDRA_FULL_ERROR=1 shows the traceback as well.
"""
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv3.train.config import RECIPES, register

register()


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dsv3.train.loop import train

    try:
        train(OmegaConf.to_object(cfg))  # to_object runs every config dataclass's checks
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
