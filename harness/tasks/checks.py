"""Checks of task settings, run before the model loads. Each raises ``methods.ConfigError`` with the
setting, the value, what is allowed and the fix."""

from __future__ import annotations

from omegaconf import ListConfig

from methods import ConfigError


def _plain(values):
    return list(values) if isinstance(values, ListConfig) else values


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(what: str, value, allow_none: bool = False) -> int | None:
    """``value`` as an int >= 1 (None passes with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        allowed = "a positive integer" + (" or null" if allow_none else "")
        raise ConfigError(f"{what}={value!r} must be {allowed}; fix: e.g. {what}=10"
                          + (f" (or {what}=null for all)" if allow_none else ""))
    return value


def int_list(what: str, values, minimum: int = 1, maximum: int | None = None, maximum_why: str = "") -> list[int]:
    """A non-empty list of ints in ``[minimum, maximum]``."""
    values = _plain(values)
    if _is_int(values):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{what}={values!r} must be a non-empty list of integers; fix: e.g. {what}=[1000,2000]")
    for value in values:
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{what}: {value!r} must be an integer >= {minimum}; fix: e.g. {what}=[1000,2000]")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{what}: {value} is more than {maximum}{maximum_why}; fix: lengths up to {maximum}, "
                              "or a model with a longer context")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what}={list(values)} repeats a value (each gives the same samples); fix: each value once")
    return list(values)


def percent_list(what: str, values) -> list[float]:
    """A non-empty list of numbers in ``[0, 100]``."""
    values = _plain(values)
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ConfigError(f"{what}={values!r} must be a non-empty list of percents; fix: e.g. {what}=[0,50,100]")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
            raise ConfigError(f"{what}: {value!r} must be a number from 0 to 100; fix: e.g. {what}=[0,50,100]")
    if len({f"{float(v):g}" for v in values}) != len(values):
        raise ConfigError(f"{what}={list(values)} repeats a depth (sample ids use it); fix: each depth once")
    return [float(v) for v in values]


def model_limit(cfg) -> tuple[int | None, str]:
    """The model's maximum input and the phrase an error cites: ``model.max_input_tokens``, or where
    that is null the context window its files declare (``model.context_window``, filled in by the
    runner's plan), or None."""
    limit = cfg.model.max_input_tokens
    if limit:
        return int(limit), f" (model.max_input_tokens of {cfg.model.name})"
    window = cfg.model.get("context_window")
    if window:
        return int(window), (f" (the context window of {cfg.model.name}, from its files; model.max_input_tokens=N "
                             "sets another limit)")
    return None, ""
