"""``python -m dsv3.train [overrides]`` and ``dsv3-train [overrides]``: train a recipe.

Hydra composes ``recipes/config.yaml`` (default model: tiny) with the overrides, checks every key
and type against the schema in ``dsv3.train.config``, and hands the typed config to the loop.
Bad input (an impossible setting, a missing file, a run directory that holds another run) and a
full disk end the run with one sentence and exit code 2; HYDRA_FULL_ERROR=1 shows the traceback
as well. Under torchrun the first rank prints the sentence, and every rank leaves it in the error
file torchrun reads, so its failure summary names the cause too.
"""
import json
import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from dsv3.train.config import RECIPES, register
from dsv3.train.storage import WriteFailed

register()


def report(error: BaseException) -> None:
    message = f"error: {error}"
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with open(error_file, "w") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)


@hydra.main(config_path=str(RECIPES), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from dsv3.train.loop import train

    logging.raiseExceptions = False  # a log file on a full disk must not bury the one sentence in tracebacks
    try:
        train(OmegaConf.to_object(cfg))  # to_object runs every config dataclass's checks
    except (ValueError, FileNotFoundError, WriteFailed) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        report(error)
        if os.environ.get("RANK", "0") != "0":  # torchrun stops every rank at the first exit:
            time.sleep(3)  # let the first rank, which prints the sentence, be that one
        sys.exit(2)


if __name__ == "__main__":
    main()
