"""Configuration: where the YAML configs are (``conf/``, shipped as the package ``harness.conf``), the
typed schema of every config group (``schema``), composition outside a Hydra app (``compose``) and the
plain config the runner works on (``plain``).

The configs are found through Hydra's package search path (``pkg://harness.conf``), so a wheel
installed anywhere runs them; a user's own config directories (``--config-dir DIR`` or
``hydra.searchpath=[file:///my/conf]``) add options to every group, for the run and for every lookup
the run makes later (``methods=[...]``). Hydra searches the shipped configs first, so a user file named
like a shipped one is refused (``check_not_shadowing``) rather than silently ignored.

May import: ``methods``, ``harness.engine`` / ``harness.protocol`` / ``harness.tasks`` (their tuples of
allowed values, the one source of each closed choice). Imported by ``harness.run`` and the CLI.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

#: the package that holds the YAML configs (``conf/`` of the checkout, mapped in pyproject.toml)
CONFIG_PACKAGE = "harness.conf"
CONFIG_SOURCE = f"pkg://{CONFIG_PACKAGE}"
#: config groups chosen on the command line (``model=llama3``)
GROUPS = ("model", "task", "method", "protocol")


def config_dir() -> Path:
    """The directory of the shipped configs (``conf/`` in a checkout, ``harness/conf`` in a wheel)."""
    return Path(str(importlib.resources.files(CONFIG_PACKAGE)))


def reference_dir() -> Path:
    """The published reference numbers (``results/reference/`` in a checkout, ``harness/reference`` in a
    wheel)."""
    return Path(str(importlib.resources.files("harness.reference")))


def search_dirs(extra: list[str] | tuple = ()) -> list[Path]:
    """Config directories: ``extra`` (a user's own, as ``file://`` URLs or paths), then the shipped one.
    (Hydra itself searches the shipped one first: ``check_not_shadowing`` refuses a user file that it
    would hide.)"""
    dirs = [Path(str(d).removeprefix("file://")).expanduser() for d in extra if not str(d).startswith("pkg://")]
    return [*dirs, config_dir()]


def group_options(group: str, extra: list[str] | tuple = ()) -> list[str]:
    """The YAML options of a config group over the search path (``method`` -> ``['dynamickv', ...]``)."""
    return sorted({p.stem for d in search_dirs(extra) for p in (d / group).glob("*.yaml")})


def check_not_shadowing(extra: list[str] | tuple = ()) -> None:
    """A user's config file named like a shipped one (``my_conf/method/snapkv.yaml``) would never be used:
    Hydra searches the shipped configs first. ``methods.ConfigError`` naming both files and the fix."""
    from methods import ConfigError
    shipped = config_dir()
    for folder in search_dirs(extra)[:-1]:
        for group in GROUPS:
            for path in sorted((folder / group).glob("*.yaml")):
                if (shipped / group / path.name).is_file():
                    raise ConfigError(f"{path} has the name of a shipped config ({group}={path.stem}), which Hydra "
                                      f"finds first, so yours would not be used; fix: give it another name "
                                      f"({group}/my_{path.stem}.yaml, then {group}=my_{path.stem})")


def compose(overrides: list[str] | tuple = (), searchpath: list[str] | tuple = ()) -> DictConfig:
    """The composed config for ``overrides``, as ``python -m harness`` would see it (typed; see ``plain``).
    ``searchpath``: a user's config directories (``file://`` URLs or paths), searched first. Raises Hydra's
    and OmegaConf's errors (a bad key, type or value) unchanged. Inside a running Hydra app it composes
    with that app's search path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from harness.config import schema
    schema.register()
    overrides = list(overrides)
    if searchpath:
        urls = [s if "://" in str(s) else f"file://{Path(s).expanduser().resolve()}" for s in searchpath]
        overrides.append(f"hydra.searchpath=[{','.join(urls)}]")
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name="config", overrides=overrides)
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def plain(cfg: DictConfig) -> DictConfig:
    """``cfg`` checked against the schema of each group (``schema.validate``), then as a plain config:
    closed choices as their names (``"maxpool"``, not an enum member), interpolations kept. What the
    runner, the manifests and the run identities see, the same as before typing. A bad type or choice
    raises ``methods.ConfigError`` with ``describe``'s message."""
    from omegaconf.errors import OmegaConfBaseException

    from harness.config import schema
    from methods import ConfigError
    try:
        schema.validate(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(describe(error)) from None
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))


def describe(error: BaseException) -> str:
    """One line for a composition or validation error (Hydra's or OmegaConf's): the key, the value and
    the allowed values or type, and the fix."""
    cause = error.__cause__ if error.__cause__ is not None else error
    text = str(cause)
    key = getattr(cause, "full_key", None) or (re.search(r"full_key: (\S+)", text) or [None, None])[1]
    first = text.splitlines()[0].strip() if text.strip() else str(error)
    match = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", first)
    if match and key:
        return f"{key}={match[1]!r} is not one of [{match[2]}]; fix: {key}=<one of them>"
    match = re.match(r"Value '(.*)' (?:of type '\w+' could not be converted to|is not a valid) (\w+)", first)
    if match and key:
        kind = {"bool": "true or false", "integer": "an integer", "float": "a number"}.get(match[2].lower(),
                                                                                         f"a {match[2].lower()}")
        return f"{key}={match[1]!r} must be {kind}; fix: {key}=<{kind}>"
    match = re.match(r"Key '(.*)' not in '(\w+)'|Key '(.*)' is not in struct", first)
    if match and key:
        return (f"{key} is not a setting (misspelt, or added with +); fix: remove it or use a setting that "
                f"kvh run --cfg job lists")
    match = re.match(r"Invalid value assigned: (\w+) is not a ListConfig", first)
    if match and key:
        return f"{key} must be a list, e.g. {key}=[a,b]; fix: put the value(s) in square brackets"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    where = f"{key}: " if key and key not in first else ""
    detail = first if cause is not error else " ".join(lines[:2])
    return f"{where}{detail} (kvh run --cfg job shows the composed config)"

