"""``kvh``: the harness's one command.

    kvh run model=smollm2_135m task=passkey method=snapkv method.budget=256   (the Hydra app)
    kvh score results/longbench/llama3/.../snapkv...    (LongBench's official scorer on a folder)
    kvh table [FOLDERS] [--out DIR]                     (the paper-style table, or each task's table)
    kvh heatmap FOLDERS --out DIR                       (Needle-in-a-Haystack heatmaps)
    kvh kept-plot FOLDER --out DIR                      (kept tokens per layer)
    kvh report FOLDERS [--out DIR]                      (one table of any task's scores)
    kvh ruler-table ROOTS [--format csv] [--out FILE]   (RULER tables by method, task, length; anchors)
    kvh ruler-heatmap ROOTS --out FILE.png              (RULER: task x length heatmap, one panel per method)
    kvh merge SOURCES --into DEST                       (runs made in pieces, e.g. one per length, as one)
    kvh bench [--out DIR] ...                           (what each method costs and saves, GPU)
    kvh dynakv calibrate|train|ranks ...                (DynaKV: PCA bases, gate training, ranks per token)

``kvh <subcommand> --help`` lists each one's options with their defaults (``kvh run --help``: Hydra's
config groups and the composed config). ``python -m harness ...`` is the same command; ``python -m
harness model=...`` (no subcommand) runs, as before.

A user error (a setting, a data file or a results folder that cannot work) exits with code 2 and one
``error:`` line naming the value, what is allowed and the fix; a traceback appears only for bugs, or
with ``debug=true`` (or ``KV_HARNESS_DEBUG=1``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys

#: subcommand -> the module whose ``main(argv)`` it runs (``run`` is the Hydra app below)
TOOLS = {
    "score": "harness.longbench.score",
    "table": "harness.report.table",
    "heatmap": "harness.report.heatmap",
    "kept-plot": "harness.report.kept_plot",
    "report": "harness.report.summary",
    "ruler-table": "harness.report.ruler_table",
    "ruler-heatmap": "harness.report.ruler_heatmap",
    "merge": "harness.run.merge",
    "bench": "harness.bench.speed",
    "dynakv": "harness.dynakv.cli",
}
SUBCOMMANDS = ("run", *TOOLS)
log = logging.getLogger("harness")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "a user's input cannot work" (one line, exit 2), not a bug."""
    from harness.run.results import ResultFileError  # harness.longbench.score.ScoreError is one
    from methods import ConfigError
    return ConfigError, FileNotFoundError, ResultFileError


def report_error(error: BaseException) -> None:
    """The message once on stderr, and in the job's log file (Hydra's file handler) for the record."""
    print(f"error: {error}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def user_searchpath(argv: list[str]) -> list[str]:
    """The user's config directories named on the command line (``--config-dir DIR``/``-cd DIR``,
    ``hydra.searchpath=[...]``), searched before the shipped configs."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            dirs += [d.strip().strip("'\"") for d in arg.split("=", 1)[1].strip("[]").split(",") if d.strip()]
    return dirs


def check_group_choices(argv: list[str]) -> str | None:
    """A config-group choice on the command line (``model=nope``) that no config directory has: the
    error message naming the choices (Hydra's own exits with code 1 and a paragraph), else None."""
    from harness import config
    extra = user_searchpath(argv)
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in config.GROUPS and re.fullmatch(r"[A-Za-z0-9_.-]+", value or ""):
            choices = config.group_options(key, extra)
            if value not in choices:
                return (f"{key}={value!r} is not one of {choices}; fix: {key}=<one of them>, or add "
                        f"{key}/{value}.yaml to a config directory (--config-dir DIR)")
    return None


#: command-line flags after which Hydra itself must judge the arguments (a sweep, help or inspection)
HYDRA_MODES = ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion",
               "-sc", "--config-path", "-cp", "--config-name", "-cn", "--resolve", "--package", "-p",
               "--experimental-rerun")


def config_overrides(argv: list[str]) -> list[str]:
    """The config overrides of a ``kvh run`` command line: without the config directories
    (``user_searchpath``'s flags) and ``--cfg``/``-c`` with its value or ``--resolve``."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--config-dir", "-cd", "--cfg", "-c"):
            skip = True
        elif arg != "--resolve" and not arg.startswith("--config-dir=") \
                and not arg.lstrip("+").startswith("hydra.searchpath="):
            overrides.append(arg)
    return overrides


def check_overrides(argv: list[str]) -> str | None:
    """Compose the config from the command line once, as Hydra will, and check it against the typed
    schema: a misspelt key, an unknown group option, a value of the wrong type or outside its choices
    becomes one message. None when it composes, or when Hydra must judge (sweeps, help)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from harness import config
    if any(a.split("=")[0] in HYDRA_MODES for a in argv):
        return check_group_choices(argv)
    overrides = config_overrides(argv)
    try:
        config.check_not_shadowing(user_searchpath(argv))
        config.plain(config.compose(overrides, searchpath=user_searchpath(argv)))
    except (HydraException, OmegaConfBaseException) as error:
        return check_group_choices(argv) or config.describe(error)
    except user_errors() as error:
        return str(error)
    return None


def show_job(argv: list[str]) -> None:
    """``kvh run --cfg job ...`` (``-c job``): the resolved settings and one entry per method and budget
    with its knobs as built and its results folder (``runner.describe_job``), as YAML; nothing runs.
    (Hydra's own ``--cfg job`` shows the composed config with interpolations and the default ``method``
    block that ``methods=[...]`` replaces; ``--cfg hydra``/``all`` still go to Hydra.)"""
    import yaml

    from harness import config
    from harness.run.runner import describe_job
    try:
        searchpath = user_searchpath(argv)
        shown = describe_job(config.compose(config_overrides(argv), searchpath=searchpath), searchpath)
    except user_errors() as error:
        report_error(error)
        sys.exit(2)
    print("# kvh run: what this command runs (settings resolved; runs: each method and budget, its knobs as "
          "built and its folder; a folder holding other settings is refused, or with resume=new the run takes a "
          "sibling <folder>.2, ...)")
    print(yaml.safe_dump(shown, sort_keys=False, allow_unicode=True), end="")


def run_app(argv: list[str]) -> None:
    """``kvh run``: check the command line, then hand it to the Hydra app (``--cfg job``: ``show_job``)."""
    from harness.run import distributed
    if distributed.world()[1] > 1:   # a torchrun worker: end with the launcher, even during start-up
        distributed.watch_launcher()
    cfg_flag = next((i for i, a in enumerate(argv) if a in ("--cfg", "-c")), None)
    if (cfg_flag is not None and argv[cfg_flag + 1:cfg_flag + 2] == ["job"]
            and not any(a in ("-m", "--multirun") for a in argv)):
        problem = check_overrides([a for i, a in enumerate(argv) if i not in (cfg_flag, cfg_flag + 1)])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        return show_job(argv)
    problem = check_overrides(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    hydra_main()


def _hydra_app():
    import hydra
    from omegaconf import DictConfig

    from harness import config

    @hydra.main(version_base="1.3", config_path=config.CONFIG_SOURCE, config_name="config")
    def app(cfg: DictConfig) -> None:
        from harness.run import distributed
        from harness.run.runner import run
        debug = bool(cfg.get("debug")) or os.environ.get("KV_HARNESS_DEBUG", "") not in ("", "0")
        try:
            summary = run(cfg)
        except user_errors() as error:
            if debug:
                raise
            report_error(error)
            sys.exit(2)
        finally:
            distributed.finish()
        for line in summary:
            print(json.dumps(line))
    return app


def hydra_main() -> None:
    from harness.config import schema
    schema.register()
    _hydra_app()()


def usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else "kvh run|score|table|heatmap|kept-plot|report|ruler-table|ruler-heatmap|merge|bench"


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``kvh <subcommand> ...``; with no subcommand (``kvh model=...``), ``run``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help") or not argv:
        print("usage: kvh <subcommand> [options]\n\n" + usage() +
              "\n\nkvh <subcommand> --help lists its options and defaults.")
        return
    command = argv[0]
    if command == "run":
        return run_app(argv[1:])
    if command in TOOLS:
        from harness.run import results
        module = importlib.import_module(TOOLS[command])
        if command == "score":
            results.configure_logging()
            sys.exit(module.main(argv[1:]))
        return results.run_cli(lambda: module.main(argv[1:]))
    if "=" in command or command.startswith("-"):
        return run_app(argv)   # python -m harness model=... (the command before subcommands)
    print(f"error: unknown subcommand {command!r}; choose one of {list(SUBCOMMANDS)} (kvh --help)", file=sys.stderr)
    sys.exit(2)
