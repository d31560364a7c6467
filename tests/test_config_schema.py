"""The typed configs: every closed set and every typed setting of every config group is rejected at
composition (before anything loads), with an error naming the key, the value and the choices; the
shipped configs compose and become the same plain config the runner always saw."""

import dataclasses
import enum
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
from harness import config
from harness.config import schema
from harness.engine.models import ModelConfig, model_config

ROOT = Path(__file__).resolve().parents[1]
TASK_OF = {"passkey": schema.PasskeyConfig, "needle": schema.NeedleConfig, "longbench": schema.LongBenchConfig}


def typed_fields(node: type, prefix: str):
    """``(dotted key, python type or enum, nested)`` for every field of a schema dataclass."""
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if typing.get_origin(kind) is typing.Union:                   # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if dataclasses.is_dataclass(kind):
            yield from typed_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", kind


def cases():
    """(group choices, key, bad value, expected words) for every enum, int, float and bool setting."""
    out = []
    groups = [([], schema.RunConfig, ""), ([], ModelConfig, "model."), ([], schema.ProtocolConfig, "protocol.")]
    groups += [([f"task={name}"], node, "task.") for name, node in TASK_OF.items()]
    groups += [([f"method={name}"], schema.method_schema(name), "method.") for name in methods.REGISTRY]
    for choices, node, prefix in groups:
        for key, kind in typed_fields(node, prefix):
            if key in ("model", "protocol", "task", "method"):
                continue
            if isinstance(kind, type) and issubclass(kind, enum.Enum):
                out.append((choices, key, "not_a_choice", [key, "not_a_choice", *kind.__members__]))
            elif kind in (int, float):
                out.append((choices, key, "abc", [key, "abc", "an integer" if kind is int else "a number"]))
            elif kind is bool:
                out.append((choices, key, "maybe", [key, "maybe", "true or false"]))
    return out


CASES = cases()


def test_the_cases_cover_every_group_and_closed_set():
    keys = {key for _, key, _, _ in CASES}
    assert {"decode", "resume", "model.source", "model.dtype", "model.attn_implementation", "protocol.pooling",
            "protocol.granularity", "protocol.h2o_variant", "protocol.truncation", "protocol.chat_template",
            "protocol.prompt_special_tokens", "task.haystack", "task.needle", "task.depth_grid.kind",
            "method.pooling", "method.granularity", "method.variant", "method.budget", "method.m",
            "task.context_range.step", "wandb"} <= keys
    assert len(CASES) > 60


@pytest.mark.parametrize("choices,key,value,words", CASES, ids=[f"{c[0][0] if c[0] else ''}:{c[1]}" for c in CASES])
def test_a_bad_value_fails_at_composition(choices, key, value, words):
    with pytest.raises((HydraException, OmegaConfBaseException)) as error:
        config.plain(config.compose([*choices, f"{key}={value}"]))
    message = config.describe(error.value)
    for word in words:
        assert word.lower() in message.lower(), (word, message)


def test_shipped_configs_compose_and_stay_plain():
    """Every option of every group composes; the plain config has text, not enum members, and keeps its
    interpolations (what manifests and run identities have always recorded)."""
    for group in config.GROUPS:
        options = config.group_options(group)
        assert options, group
        for option in options:
            cfg = config.plain(config.compose([f"{group}={option}"]))
            container = OmegaConf.to_container(cfg, resolve=True)
            # model=custom names itself after what it loads (harness.engine.models.model_name)
            if group == "method" and container[group].get("transform"):   # a K/V transform alone, on FullKV
                assert container[group]["name"] == "fullkv" and container[group]["transform"] == option
                continue
            assert container[group]["name"] == (None if option == "custom" else option)
            flat = str(container)
            assert "<" not in flat or "eot_id" in flat or "end_of_turn" in flat, flat   # no <Enum.member: ...>
    cfg = config.plain(config.compose(["method=snapkv", "protocol=dynamickv_paper"]))
    assert cfg.method.pooling == "maxpool" and type(cfg.method.pooling) is str
    assert OmegaConf.to_container(cfg.method)["window_size"] == "${protocol.window_size.snapkv}"
    assert cfg.method.window_size == 32


def test_method_schema_defaults_are_the_methods_own():
    for name, cls in methods.REGISTRY.items():
        node = OmegaConf.to_container(OmegaConf.structured(schema.method_schema(name)), enum_to_str=True)
        assert node.pop("name") == name
        assert node == {f.name: f.default for f in dataclasses.fields(cls)}, name


def test_a_user_method_file_without_the_schema_is_checked_too(tmp_path):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("name: snapkv\nbudget: 64\npooling: meanpool\n")
    cfg = config.compose(["method=mine"], searchpath=[str(tmp_path)])
    with pytest.raises(methods.ConfigError, match=r"method.pooling='meanpool' is not one of \[maxpool, avgpool\]"):
        config.plain(cfg)


def test_a_partial_model_config_is_completed_and_checked():
    cfg = model_config({"name": "x", "source": "random", "config": {"model_type": "llama"}})
    assert cfg.seed == 0 and cfg.tokenizer == "bytes" and cfg.dtype == "auto" and cfg.extra_stop_tokens == []
    with pytest.raises(methods.ConfigError, match=r"model\.source.*ftp.*hub"):
        model_config({"name": "x", "source": "ftp"})
    with pytest.raises(methods.ConfigError, match=r"model\.seed.*abc"):
        model_config({"name": "x", "source": "random", "seed": "abc"})


def test_identity_defaults_bridge_keys_a_stored_identity_lacks():
    """A folder stored before a setting had a schema default still resumes where it holds that default."""
    from harness.run.identity import differences
    stored = {"model": {"source": "random"}, "task": {"buffer": 200}}
    assert differences(stored, {"model": {"source": "random", "seed": 0, "config": None},
                                "task": {"buffer": 200}}) == []
    assert differences(stored, {"model": {"source": "random", "seed": 1}, "task": {"buffer": 200}}) == \
        [("model.seed", "<absent>", 1)]


def test_the_command_line_rejects_before_loading(tmp_path):
    """The whole path: ``kvh run`` with a bad choice exits 2 with one line, and no results folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "harness", "run", "model=tiny_llama", "protocol.pooling=meanpool",
                           f"results_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: protocol.pooling='meanpool' is not one of [maxpool, avgpool]; "
                     "fix: protocol.pooling=<one of them>"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, key", [("+protocol.kernal_size=5", "protocol.kernal_size"), ("+foo=1", "foo"),
                                           ("+method.foo=1", "method.foo"), ("+model.sed=1", "model.sed"),
                                           ("+task.depth_grid.kinds=linear", "task.depth_grid.kinds")])
def test_a_key_added_with_plus_that_no_schema_has_is_refused(override, key):
    """Hydra's ``+key=value`` adds a key even to a typed config; it would be ignored, so it is refused."""
    choices = ["task=needle"] if "depth_grid" in override else []
    with pytest.raises(methods.ConfigError, match=rf"^{re.escape(key)} is not a setting .*fix: remove it"):
        config.plain(config.compose([*choices, override]))


def test_a_user_file_named_like_a_shipped_one_is_refused(tmp_path):
    """Hydra finds the shipped configs first, so ``my_conf/method/snapkv.yaml`` would silently not be used."""
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "snapkv.yaml").write_text("name: snapkv\nbudget: 77\n")
    with pytest.raises(methods.ConfigError, match=r"snapkv.yaml has the name of a shipped config.*method=my_snapkv"):
        config.check_not_shadowing([str(tmp_path)])
    (tmp_path / "method" / "snapkv.yaml").rename(tmp_path / "method" / "my_snapkv.yaml")
    config.check_not_shadowing([str(tmp_path)])
    assert "my_snapkv" in config.group_options("method", [str(tmp_path)])


def test_a_float_knob_keeps_the_value_as_written():
    """``radio_max=5`` stays 5, not 5.0: the run folder's name (``radiomax5``) is what it was before typing."""
    from harness.run.results import run_name
    for override, text in (("protocol.dynamickv_radio_max=5", "radiomax5_"), ("protocol.dynamickv_radio_max=7.5",
                                                                                "radiomax7.5_")):
        cfg = config.plain(config.compose(["method=dynamickv", override]))
        knobs = OmegaConf.to_container(cfg.method, resolve=True)
        assert text in run_name(methods.build(knobs.pop("name"), **knobs).knobs() | {"name": "dynamickv"}) + "_"
    with pytest.raises(methods.ConfigError, match="radio_max='abc' must be a positive number"):
        methods.build("dynamickv", radio_max="abc")
    with pytest.raises(methods.ConfigError, match="radio_max=True must be a positive number"):
        methods.build("dynamickv", radio_max=True)
