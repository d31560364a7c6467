"""Hydra entry point: ``python -m harness model=smollm2_135m task=passkey method=snapkv method.budget=256``."""

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from harness import distributed
from harness.run import run
from methods import ConfigError

log = logging.getLogger("harness")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg)
    except (ConfigError, FileNotFoundError) as error:
        log.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        distributed.finish()
    for line in summary:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
