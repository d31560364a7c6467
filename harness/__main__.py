"""Hydra entry point: ``python -m harness model=smollm2_135m task=passkey method=snapkv method.budget=256``.

A user error (a setting, a data file or a results folder that cannot work) exits with code 2 and one
message naming the value, what is allowed and the fix; a traceback appears only for bugs, or with
``debug=true`` (or ``KV_HARNESS_DEBUG=1``)."""

import json
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from harness import distributed
from harness.results import ResultFileError
from harness.run import run
from methods import ConfigError

log = logging.getLogger("harness")
USER_ERRORS = (ConfigError, FileNotFoundError, ResultFileError)   # harness.score.ScoreError is a ResultFileError


def report_error(error: BaseException) -> None:
    """The message once on stderr, and in the job's log file (Hydra's file handler) for the record."""
    print(f"error: {error}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "task", "method", "protocol")


def check_group_choices(argv: list[str]) -> str | None:
    """A config-group choice on the command line (``model=nope``) that has no ``conf/<group>/*.yaml``:
    the error message (Hydra's own would exit with code 1 and a long explanation), else None."""
    if any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath", "+hydra.searchpath"))
           for a in argv):
        return None   # configs may come from elsewhere: Hydra judges
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in GROUPS and re.fullmatch(r"[A-Za-z0-9_.-]+", value or ""):
            choices = sorted(p.stem for p in (CONF / key).glob("*.yaml"))
            if value not in choices:
                return (f"{key}={value!r} is not one of {choices}; fix: {key}=<one of them>, or add "
                        f"conf/{key}/{value}.yaml")
    return None


#: command-line flags after which Hydra itself must judge the arguments (another config source, a sweep,
#: a help or inspection mode)
HYDRA_MODES = ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion",
               "-sc", "--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--resolve", "--package",
               "-p", "--experimental-rerun")


def check_overrides(argv: list[str]) -> str | None:
    """Compose the config from the command line once, as Hydra will: an override Hydra cannot apply (a
    misspelt key, an unknown group option, a malformed value) becomes one message (Hydra would exit with
    code 1 and a paragraph). None when it composes, or when Hydra must judge (sweeps, other config
    sources, help)."""
    if any(a.split("=")[0] in HYDRA_MODES or "hydra.searchpath" in a for a in argv):
        return check_group_choices(argv)
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=list(argv))
    except (HydraException, OmegaConfBaseException) as error:
        problem = check_group_choices(argv)
        if problem:
            return problem
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return " ".join(lines[:2]) + " (python -m harness --cfg job shows the composed config)"
    return None


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
    if distributed.world()[1] > 1:   # a torchrun worker: end with the launcher, even during start-up
        distributed.watch_launcher()
    problem = check_overrides(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
