"""The typed schema of every config group, registered in Hydra's ConfigStore.

Composition itself rejects a misspelt key, a value of the wrong type (``method.budget=abc``) or a
value outside a closed set (``protocol.pooling=meanpool``): OmegaConf names the key, the value and,
for a closed set, the choices. Range and cross-field rules (``budget > window_size``, existing data
paths) stay with the code that owns them (``methods``' ``validate``, each task's ``validate``) and also
run before any model loads.

Closed sets are enums built from the tuples their owners already use (``methods.base.POOLINGS``,
``harness.engine.models.SOURCES``, ...): one definition per set. Defaults: a group's schema holds the
default of every optional key (the YAML files set what differs); method knobs default to their
method's dataclass fields.

Registered names (all referenced from the YAML defaults lists):

* ``schema``: the top-level run settings (``conf/config.yaml``), with ``model`` and ``protocol``
  typed (``harness.engine.models.ModelConfig``, which the engine also applies to a partial model config
  given to it directly, and ``ProtocolConfig``);
* ``schema/method/<name>``: one per registered ``KVCompressor`` (its knobs, typed), which
  ``conf/method/<name>.yaml`` lists first in its defaults (``- /schema/method/<name>@_here_``);
* ``schema/task/<name>``: one per task (``PasskeyConfig``, ``NeedleConfig``, ``LongBenchConfig``), likewise.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
from harness.engine.generate import RUN_DECODE_MODES
from harness.engine.models import AttentionBackend, Dtype, ModelConfig, ModelSource
from harness.protocol.prompting import CHAT_MODES, COMPRESSION_SCOPES, SPECIAL_TOKEN_MODES, TRUNCATION_MODES
from harness.ruler.essays import SPLITTERS as SENTENCE_SPLITTERS
from harness.ruler.fitting import VERSIONS as RULER_VERSIONS
from harness.ruler.tasks import RULER_13
from harness.run.progress import MODES as PROGRESS_MODES
from harness.tasks.haystack import KINDS as HAYSTACK_KINDS
from harness.tasks.needle import DEPTH_GRID_KINDS
from harness.tasks.needle import PRESETS as NEEDLE_PRESETS

#: the enum of each closed set, by its tuple of values (the model's own come from harness.engine.models)
_ENUMS: dict[tuple, type[enum.Enum]] = {tuple(e.__members__): e for e in (ModelSource, Dtype, AttentionBackend)}


def closed_set(name: str, values) -> type[enum.Enum]:
    """The enum of a tuple of allowed values (one class per tuple, shared by every field that uses it;
    member names are the values themselves)."""
    values = tuple(values)
    if values not in _ENUMS:
        _ENUMS[values] = enum.Enum(name, {v: v for v in values})
    return _ENUMS[values]


Pooling = closed_set("Pooling", methods.base.POOLINGS)
Granularity = closed_set("Granularity", methods.base.GRANULARITIES)
H2OVariant = closed_set("H2OVariant", methods.REGISTRY["h2o"].choices["variant"])
H2OScorer = closed_set("H2OScorer", methods.REGISTRY["h2o"].choices["scorer"])
ChatTemplate = closed_set("ChatTemplate", CHAT_MODES)
Truncation = closed_set("Truncation", TRUNCATION_MODES)
SpecialTokens = closed_set("SpecialTokens", SPECIAL_TOKEN_MODES)
CompressionScope = closed_set("CompressionScope", COMPRESSION_SCOPES)
RulerVersion = closed_set("RulerVersion", RULER_VERSIONS)
SentenceSplitter = closed_set("SentenceSplitter", SENTENCE_SPLITTERS)

Decode = closed_set("Decode", RUN_DECODE_MODES)
Resume = closed_set("Resume", ("auto", "new"))   # resume=: harness.run.identity.resolve_folder
Progress = closed_set("Progress", PROGRESS_MODES)
Haystack = closed_set("Haystack", HAYSTACK_KINDS)
NeedleKind = closed_set("NeedleKind", tuple(NEEDLE_PRESETS))
DepthGridKind = closed_set("DepthGridKind", DEPTH_GRID_KINDS)


@dataclass
class ProtocolConfig:
    """``conf/protocol/*.yaml``: every knob of a reference protocol that changes numbers (DESIGN.md)."""
    name: str = MISSING
    dtype: Dtype = Dtype.auto                      # type: ignore[valid-type]
    chat_template: ChatTemplate = ChatTemplate.auto   # type: ignore[valid-type]
    chat_template_skip: Optional[List[str]] = None   # datasets sent without the template (LongBench pred.py)
    truncation: Truncation = Truncation.middle     # type: ignore[valid-type]
    prompt_special_tokens: SpecialTokens = SpecialTokens.text   # type: ignore[valid-type]
    compression_scope: CompressionScope = CompressionScope.prompt   # type: ignore[valid-type]
    kernel_size: int = 7
    pooling: Pooling = Pooling.maxpool             # type: ignore[valid-type]
    granularity: Granularity = Granularity.query_head   # type: ignore[valid-type]
    window_size: Dict[str, int] = field(default_factory=dict)   # per method name
    streamingllm_sink_tokens: Optional[int] = None
    h2o_variant: H2OVariant = H2OVariant.causal    # type: ignore[valid-type]
    h2o_scorer: H2OScorer = H2OScorer.reference    # type: ignore[valid-type]   # methods/h2o.py: reference | fused
    dynamickv_radio_max: Any = 10.0                # a number; untyped so that 5 stays 5 (see _PYTHON_TYPES)
    # entries are text (a token or a symbol); untyped so that a number is refused, not read as its digits
    stop_tokens: Dict[str, List[Any]] = field(default_factory=lambda: {"default": ["model"]})
    min_new_tokens: Dict[str, int] = field(default_factory=lambda: {"default": 0})


@dataclass
class RunConfig:
    """``conf/config.yaml``: the run settings; ``task`` and ``method`` are typed by their own option's
    schema (``schema/task/<name>``, ``schema/method/<name>``)."""
    model: ModelConfig = MISSING
    protocol: ProtocolConfig = MISSING
    task: Any = MISSING
    method: Any = MISSING
    results_dir: str = "results"
    limit: Optional[int] = None
    methods: Optional[List[str]] = None
    budgets: Optional[List[int]] = None
    compression_ratios: Optional[List[Any]] = None   # with methods: one run per ratio (numbers; method.compression_ratio)
    method_overrides: Any = None                   # with methods: {knob: value} applied to every method
    wandb: bool = True
    wandb_project: str = "kv-harness"
    wandb_group: Optional[str] = None              # null: the Hydra run/sweep folder's name (wandb_log.default_group)
    wandb_dir: str = "${results_dir}"              # wandb writes <wandb_dir>/wandb/; WANDB_DIR, where set, wins
    wandb_tags: List[str] = field(default_factory=list)
    save_kept_positions: bool = False
    decode: Decode = Decode.batched                # type: ignore[valid-type]
    cuda_graphs: bool = True
    decode_batch: int = 16
    decode_prompts: int = 64                       # decode=continuous: samples per window
    decode_window_memory: float = 0.5              # decode=continuous, GPU: share of available memory a window's caches may hold
    decode_compile: bool = False
    threads: Optional[int] = None
    resume: Resume = Resume.auto                   # type: ignore[valid-type]
    distributed_timeout_s: Optional[float] = None
    debug: bool = False
    progress: Progress = Progress.auto             # type: ignore[valid-type]  # harness.run.progress


@dataclass
class GridRange:
    start: int = 1000
    stop: int = 8000
    step: int = 1000


@dataclass
class DepthGrid:
    kind: DepthGridKind = DepthGridKind.linear     # type: ignore[valid-type]
    count: int = 10


@dataclass
class PasskeyConfig:
    """``conf/task/passkey.yaml`` (``harness.tasks.passkey``)."""
    name: str = "passkey"
    haystack: Haystack = Haystack.synthetic        # type: ignore[valid-type]
    haystack_dir: Optional[str] = None
    context_lengths: List[int] = field(default_factory=lambda: [2048])
    depths: List[Any] = field(default_factory=lambda: [10, 50, 90])   # percents (int or float)
    samples_per_cell: int = 1
    max_new_tokens: int = 12
    seed: int = 0


@dataclass
class NeedleConfig:
    """``conf/task/needle.yaml`` (``harness.tasks.needle``)."""
    name: str = "needle"
    needle: NeedleKind = NeedleKind.san_francisco  # type: ignore[valid-type]
    haystack: Haystack = Haystack.synthetic        # type: ignore[valid-type]
    haystack_dir: Optional[str] = None
    context_lengths: Optional[List[int]] = None
    context_range: GridRange = field(default_factory=GridRange)
    depths: Optional[List[Any]] = None             # percents (int or float)
    depth_grid: DepthGrid = field(default_factory=DepthGrid)
    buffer: int = 200
    max_new_tokens: int = 30
    stop_strings: List[str] = field(default_factory=lambda: ["\n"])
    seed: int = 0


@dataclass
class LongBenchConfig:
    """``conf/task/longbench.yaml`` (``harness.tasks.longbench``)."""
    name: str = "longbench"
    data_dir: Optional[str] = None
    config_dir: Optional[str] = None
    config_commit: str = MISSING
    hub_repo: str = "THUDM/LongBench"
    hub_revision: str = "main"
    datasets: List[str] = MISSING
    limit: Optional[int] = None
    max_new_tokens: Optional[int] = None


@dataclass
class RulerConfig:
    """``conf/task/ruler.yaml`` (``harness.tasks.ruler``)."""
    name: str = "ruler"
    tasks: List[str] = field(default_factory=lambda: list(RULER_13))
    context_lengths: List[int] = field(default_factory=lambda: [4096])
    samples_per_task: int = 500
    seed: int = 42
    generator_version: RulerVersion = RulerVersion.ruler_head   # type: ignore[valid-type]
    haystack_dir: Optional[str] = None
    squad_path: Optional[str] = None
    hotpotqa_path: Optional[str] = None
    sentence_splitter: SentenceSplitter = SentenceSplitter.auto   # type: ignore[valid-type]
    max_new_tokens: Optional[int] = None           # null: each task's own (RULER's tokens_to_generate)


@dataclass
class PerplexityConfig:
    """``conf/task/perplexity.yaml`` (``harness.tasks.perplexity``)."""
    name: str = "perplexity"
    text_path: Optional[str] = None
    label: Optional[str] = None
    context_length: int = 1024
    stride: int = 512
    max_tokens: Optional[int] = None
    bos: Optional[bool] = None                     # null: as the tokenizer does by default


TASK_SCHEMAS = {"passkey": PasskeyConfig, "needle": NeedleConfig, "longbench": LongBenchConfig, "ruler": RulerConfig,
                "perplexity": PerplexityConfig}
#: a float knob stays untyped (Any): OmegaConf would turn 5 into 5.0, and the run folder's name with it
#: (``radiomax5`` -> ``radiomax5.0``: an existing folder would no longer be found); the method checks it
_PYTHON_TYPES = {"int": int, "float": Any, "str": str, "bool": bool}


@functools.cache
def method_schema(name: str) -> type:
    """The schema of one registered method: ``name`` plus its dataclass fields, typed (a knob with
    ``choices`` as an enum), each defaulting to the method's own default."""
    cls = methods.REGISTRY[name]
    fields = [("name", str, field(default=name))]
    for f in dataclasses.fields(cls):
        text = str(f.type) if not isinstance(f.type, type) else f.type.__name__
        optional = text.endswith(" | None")
        kind = _PYTHON_TYPES[text.removesuffix(" | None")]
        default = f.default
        if f.name in cls.choices:
            kind = closed_set(f.name.title(), cls.choices[f.name])
            default = kind[default]
        if optional:
            kind = Optional[kind]
        fields.append((f.name, kind, field(default=default)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


_REGISTERED = False


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    store = ConfigStore.instance()
    store.store(name="schema", node=RunConfig)
    for name in methods.REGISTRY:
        store.store(group="schema/method", name=name, node=method_schema(name))
    for name, node in TASK_SCHEMAS.items():
        store.store(group="schema/task", name=name, node=node)
    _REGISTERED = True


register()   # on import: the YAML defaults lists name these schemas, so they must exist before any composition


def _schema_of(group: str, name: str):
    if group == "method":
        return method_schema(name) if name in methods.REGISTRY else None
    return TASK_SCHEMAS.get(name)


def validate(cfg: DictConfig) -> None:
    """Check ``cfg.method`` and ``cfg.task`` against the schema of their ``name`` (a user's own YAML that
    lists no ``/schema/<group>/<name>`` default is checked too), refuse a key that no schema has (Hydra's
    ``+key=value`` adds one even to a typed config: ``+protocol.kernal_size=5`` would be ignored), and
    resolve every interpolation once so that an interpolated value of the wrong type fails here. Raises
    OmegaConf's ``ValidationError`` (key, value, choices) or ``methods.ConfigError`` (an unknown method or
    task name, an unknown key)."""
    check_keys(cfg)
    for group in ("method", "task"):
        node = cfg.get(group)
        if node is None:
            continue
        schema = _schema_of(group, str(node.get("name")))
        if schema is None:
            known = sorted(methods.REGISTRY) if group == "method" else sorted(TASK_SCHEMAS)
            raise methods.ConfigError(f"{group}.name={node.get('name')!r} is not one of {known}; fix: a "
                                      f"{group} config whose name is one of them")
        if OmegaConf.get_type(node) is not schema and not OmegaConf.is_missing(cfg, group):
            try:
                OmegaConf.merge(OmegaConf.structured(schema), node)
            except OmegaConfBaseException as error:   # the key as the user writes it: method.pooling
                error.full_key = f"{group}.{getattr(error, 'full_key', '') or ''}".rstrip(".")
                raise
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_untyped(cfg)


def check_untyped(cfg: DictConfig) -> None:
    """What the schema leaves untyped so that a value keeps its written form (float knobs: ``5`` stays
    ``5``) is checked here: the protocol's number, and the run's method built once with its knobs, so that
    its own checks (a float knob's type, ``budget > window_size``) also fail at composition."""
    protocol = cfg.get("protocol")
    if isinstance(protocol, DictConfig) and "dynamickv_radio_max" in protocol:
        value = protocol.dynamickv_radio_max
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise methods.ConfigError(f"protocol.dynamickv_radio_max={value!r} must be a number; fix: e.g. "
                                      "protocol.dynamickv_radio_max=10.0")
    node = cfg.get("method")
    if isinstance(node, DictConfig) and not cfg.get("methods"):
        knobs = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
        methods.build(knobs.pop("name"), **knobs)


def _fields(node: type) -> set[str]:
    return {f.name for f in dataclasses.fields(node)}


def check_keys(cfg: DictConfig) -> None:
    """Every key of the run settings, model, protocol, task and method (nested settings included) is one
    its schema declares; ``methods.ConfigError`` naming the unknown key and the known ones otherwise."""
    _check_keys(cfg, RunConfig, "")
    for group in ("method", "task"):
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            _check_keys(node, _schema_of(group, str(node.get("name"))), f"{group}.")


def _check_keys(node, schema, prefix: str) -> None:
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(node.keys()) - set(fields))
    if unknown:
        raise methods.ConfigError(f"{prefix}{unknown[0]} is not a setting (misspelt, or added with +); the "
                                  f"settings{' of ' + prefix.rstrip('.') if prefix else ''} are {sorted(fields)}; "
                                  "fix: remove it or use one of them")
    hints = typing.get_type_hints(schema)
    for key, kind in hints.items():
        if key in node and dataclasses.is_dataclass(kind):   # model, protocol, context_range, depth_grid
            _check_keys(node[key], kind, f"{prefix}{key}.")


def _flat(node: type, prefix: str) -> dict[str, object]:
    """A schema's defaults as flat dotted keys (enums as names; required keys left out)."""
    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict) and value and key not in _OPEN_DICTS:
                yield from walk(value, f"{path}{key}.")
            elif value != "???":
                yield f"{path}{key}", value
    return dict(walk(OmegaConf.to_container(OmegaConf.structured(node), enum_to_str=True), prefix))


#: settings that are maps of their own (kept whole, not walked into)
_OPEN_DICTS = ("config", "window_size", "stop_tokens", "min_new_tokens", "method_overrides")


@functools.cache
def defaults() -> dict[str, object]:
    """Every schema default of the run settings, the model, the protocol and the tasks as a flat
    ``{"model.seed": 0, "task.buffer": 200, "decode": "batched", ...}`` (enums as names): a key that a
    stored run identity lacks means this value (``identity.differences``). A task key counts where
    every task that has it agrees on its default."""
    out = {k: v for k, v in _flat(RunConfig, "").items() if k.split(".")[0] not in ("model", "protocol")}
    out |= _flat(ModelConfig, "model.") | _flat(ProtocolConfig, "protocol.")
    out["method.compression_ratio"] = None     # the knob every method gained with budgets as ratios
    for knob in methods.base.TRANSFORM_FIELDS:   # and with the K/V transforms (DynaKV)
        out[f"method.{knob}"] = None
    per_task = [_flat(node, "task.") for node in TASK_SCHEMAS.values()]
    for key in set().union(*per_task):
        values = [flat[key] for flat in per_task if key in flat]
        if all(v == values[0] for v in values):
            out[key] = values[0]
    return out
