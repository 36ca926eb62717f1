"""``python -m dsv3.train [overrides]`` and ``dsv3-train [overrides]``: train a recipe.

Hydra composes ``recipes/config.yaml`` (default model: tiny) with the overrides, checks every key
and type against the schema in ``dsv3.train.config``, and hands the typed config to the loop.
"""
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv3.train.config import RECIPES, register

register()


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dsv3.train.loop import train

    try:
        config = OmegaConf.to_object(cfg)  # runs every config dataclass's checks on the final values
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    train(config)


if __name__ == "__main__":
    main()
