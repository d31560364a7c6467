"""Hydra entry point: ``python -m harness model=smollm2_135m task=passkey method=snapkv method.budget=256``.

A user error (a setting, a data file or a results folder that cannot work) exits with code 2 and one
message naming the value, what is allowed and the fix; a traceback appears only for bugs, or with
``debug=true`` (or ``KV_HARNESS_DEBUG=1``)."""

import json
import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from harness import distributed
from harness.results import ResultFileError
from harness.run import run
from methods import ConfigError

log = logging.getLogger("harness")
USER_ERRORS = (ConfigError, FileNotFoundError, ResultFileError)


def report_error(error: BaseException) -> None:
    """The message once on stderr, and in the job's log file (Hydra's file handler) for the record."""
    print(f"error: {error}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    debug = bool(cfg.get("debug", False)) or os.environ.get("KV_HARNESS_DEBUG", "") not in ("", "0")
    try:
        summary = run(cfg)
    except USER_ERRORS as error:
        if debug:
            raise
        report_error(error)
        sys.exit(2)
    finally:
        distributed.finish()
    for line in summary:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
