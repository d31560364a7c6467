"""One run: a (model, task, protocol) combination over the task's samples, for one method or for
several at once (``methods=[...]``: one shared prefill per sample, see ``harness.engine.shared``).
Every method gets its own results folder; a re-run skips the samples a folder already has."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf

import methods
from harness import config
from harness.config import schema  # noqa: F401  (registers the typed configs with Hydra)
from harness.engine.generate import RUN_DECODE_MODES, check_decode, generate
from harness.engine.models import (
    check_hub_access,
    check_model_config,
    context_window,
    is_chat_model,
    load_model,
    model_identity,
    resolved_source,
)
from harness.engine.shared import generate_many
from harness.protocol import generation_rules
from harness.protocol.prompting import check_protocol, encode, encode_parts, use_chat_template
from harness.run import distributed, identity, progress, results
from harness.run.rows import (  # kept_file: also runner.kept_file, where a run's kept positions are
    append_row,
    check_transformed,
    compression_fields,
    kept_file,  # noqa: F401
    prompt_input,
    result_row,
    save_positions,
    transform_fields,
    transform_groups,
    transform_key,
    transformed_for,
)
from harness.tasks import Sample, get_task

log = logging.getLogger(__name__)


_MODEL: dict = {}


def _cached_model(model_yaml: str, on_tokenizer=None):
    """One model per process: a multirun over methods loads it once. ``on_tokenizer`` runs before the
    weights load (or on the cached model's tokenizer)."""
    if model_yaml not in _MODEL:
        _MODEL.clear()
        _MODEL[model_yaml] = load_model(OmegaConf.create(model_yaml), on_tokenizer=on_tokenizer)
    elif on_tokenizer is not None:
        on_tokenizer(_MODEL[model_yaml].tokenizer)
    return _MODEL[model_yaml]


def run_searchpath() -> list[str]:
    """The config directories of the running Hydra app besides the shipped one (``--config-dir``,
    ``hydra.searchpath``), so that later lookups see the user's configs too; [] outside an app."""
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return []
    return [f"{s.schema}://{s.path}" for s in HydraConfig.get().runtime.config_sources
            if s.schema == "file" and s.provider not in ("main", "hydra")]


def method_configs(cfg: DictConfig, searchpath: list[str] | None = None) -> list[dict]:
    """The methods of this run as knob dicts: ``cfg.method``, or every name in ``cfg.methods`` (each
    composed as ``method=<name>`` over the config search path, typed, under this run's protocol)
    at every budget in ``cfg.budgets`` and every ratio in ``cfg.compression_ratios`` (FullKV once), with
    ``cfg.method_overrides`` applied to all. ``searchpath``:
    the user's config directories (default: the running Hydra app's, ``run_searchpath``)."""
    names = cfg.methods
    if not names:
        return [OmegaConf.to_container(cfg.method, resolve=True)]
    searchpath = run_searchpath() if searchpath is None else searchpath
    config.check_not_shadowing(searchpath)
    choices = config.group_options("method", searchpath)
    out = []
    for name in names:
        eviction, _, transform = str(name).partition("+")
        for part in filter(None, (eviction, transform)):
            if part not in choices:
                where = f" (in {name!r})" if part != name else ""
                raise methods.ConfigError(f"methods: unknown method {part!r}{where}; choose from {choices}, or "
                                          "<eviction>+<transform> such as snapkv+dynakv")
        composed = config.plain(config.compose([f"method={eviction}"], searchpath=searchpath)).method
        node = OmegaConf.create({"protocol": cfg.protocol, "method": composed})
        knobs = OmegaConf.to_container(node.method, resolve=True)
        if transform:
            knobs.update(stacked_transform(cfg, name, eviction, transform, knobs, searchpath))
        if cfg.method_overrides:
            if not isinstance(cfg.method_overrides, DictConfig):
                raise methods.ConfigError(f"method_overrides={cfg.method_overrides!r} must map knobs to values; fix: "
                                          "\"method_overrides={granularity: kv_head}\"")
            overrides = OmegaConf.to_container(cfg.method_overrides, resolve=True)
            if not knobs.get("transform") and not overrides.get("transform"):   # transform knobs: for those with one
                overrides = {k: v for k, v in overrides.items() if not str(k).startswith("transform_")}
            knobs.update(overrides)
        if isinstance(knobs["budget"], bool) or not isinstance(knobs["budget"], int):
            raise methods.ConfigError(f"{name}: budget={knobs['budget']!r} must be an integer (from "
                                      "method_overrides or the method's config)")
        if knobs["name"] == "fullkv" or not (cfg.budgets or cfg.compression_ratios):   # FullKV, a transform alone
            out.append(knobs)
            continue
        out += [{**knobs, "budget": int(b), "compression_ratio": None} for b in cfg.budgets or []]
        out += [{**knobs, "compression_ratio": r} for r in cfg.compression_ratios or []]
    return out


def stacked_transform(cfg: DictConfig, name: str, eviction: str, transform: str, knobs: dict,
                      searchpath: list[str]) -> dict:
    """The knobs ``<eviction>+<transform>`` (``snapkv+dynakv``) adds to the eviction method's: the transform
    config's ``transform*`` knobs and ``granularity=layer`` (the same kept tokens in every KV head, the paper's
    global token eviction: one latent vector per token serves all heads; ``method_overrides`` may set another).
    ConfigError when the first part is not an eviction method or the second has no transform."""
    from methods.base import TRANSFORM_FIELDS
    composed = config.plain(config.compose([f"method={transform}"], searchpath=searchpath)).method
    extra = OmegaConf.to_container(OmegaConf.create({"protocol": cfg.protocol, "method": composed}).method, resolve=True)
    if not extra.get("transform"):
        raise methods.ConfigError(f"methods: {name!r}: {transform!r} is not a K/V transform (pca_uniform, svd_weights, "
                                  "energy, dynakv); fix: <eviction>+<transform>, e.g. snapkv+dynakv")
    if knobs.get("transform") or knobs["name"] == "fullkv":
        raise methods.ConfigError(f"methods: {name!r}: {eviction!r} is not an eviction method to stack a transform on; "
                                  f"fix: snapkv+{transform}, pyramidkv+{transform}, ... or {transform} alone")
    return {**{f: extra.get(f) for f in TRANSFORM_FIELDS}, "granularity": "layer"}


def checked_config(cfg: DictConfig) -> DictConfig:
    """The plain config (``config.plain``) with its settings and model config checked and the model's
    ``source: auto`` and ``name: null`` resolved (``models.resolved_source``): the start of ``plan``
    and of ``describe_job``. Raises ``methods.ConfigError``."""
    cfg = config.plain(cfg)
    check_settings(cfg)
    check_model_config(cfg.model)
    cfg.model.update(resolved_source(OmegaConf.to_container(cfg.model, resolve=True)))
    return cfg


def describe_job(cfg: DictConfig, searchpath: list[str] | None = None) -> dict:
    """What a job will run (``kvh run --cfg job``), resolved: the settings without the ``method`` block
    where ``methods=[...]`` replaces it, the model with its source and name resolved, and ``runs``:
    each method's knobs as built (derived knobs included) with its results folder. Raises
    ``methods.ConfigError`` for a config that cannot run (the checks of composition and of the methods'
    knobs; data and model files are checked by the run itself)."""
    cfg = checked_config(cfg)
    runs = []
    for knobs in method_configs(cfg, searchpath):
        knobs = dict(knobs)
        compressor = methods.build(knobs.pop("name"), **knobs)
        runs.append({"folder": str(run_folder(cfg, compressor)), "method": {"name": compressor.name,
                                                                          **compressor.knobs()}})
    shown = OmegaConf.to_container(cfg, resolve=True)
    if cfg.methods:
        del shown["method"]
    return {**shown, "runs": runs}


def build_compressors(cfg: DictConfig) -> list[methods.KVCompressor]:
    compressors = []
    for knobs in method_configs(cfg):
        knobs = dict(knobs)
        compressors.append(methods.build(knobs.pop("name"), **knobs))
    return compressors


def check_loaded_commit(cfg: DictConfig, job: Plan, lm) -> None:
    """A hub model's commit, known for sure only once loaded: it must be the one the stored identity
    has (a hub repository updated between sessions is refused); an unknown one is filled in."""
    commit = lm.info.get("commit")
    if cfg.model.source != "hub" or commit is None:
        return
    for key, ident in job.identities.items():
        weights = ident["model"]["weights"]
        stored = (job.stored[key] or {}).get("identity", {}).get("model", {}).get("weights", {}).get("commit")
        if stored is not None and stored != commit:
            raise methods.ConfigError(f"{job.folders[key]} was made from {weights['name_or_path']} at commit {stored}, "
                                      f"but this run loaded commit {commit}; fix: model.revision={stored} to resume, "
                                      "or resume=new")
        weights["commit"] = commit


def run_folder(cfg: DictConfig, compressor: methods.KVCompressor) -> Path:
    """``<results_dir>/<task>/<model>/<protocol>/<method knobs>``: every component a checked name, and
    the whole path inside ``results_dir`` (ConfigError otherwise)."""
    name = results.run_name({"name": compressor.name, **compressor.knobs()})
    root = Path(str(cfg.results_dir)).expanduser()
    parts = [identity.check_name("task.name", cfg.task.name), identity.check_name("model.name", cfg.model.name),
             identity.check_name("protocol.name", cfg.protocol.name), identity.check_name(
                 "method folder", name, "method knob values (e.g. a text knob) without such characters")]
    return identity.inside(root.joinpath(*parts), root)


def task_samples(task, task_cfg, lm, chat: bool, truncation: str = "middle",
                 special_tokens: str = "text") -> list[Sample]:
    """The task's samples, with lengths measured on the model input the runner will build."""
    return task.build_samples(task_cfg, lm.tokenizer, _counter(task, lm, chat, special_tokens),
                              max_input_tokens=lm.max_input_tokens, truncation=truncation)


@dataclass
class Plan:
    """What a run will do, decided and checked before the model loads."""
    task: object
    compressors: list
    folders: dict          # id(compressor) -> results folder
    identities: dict       # id(compressor) -> run identity
    stored: dict           # id(compressor) -> the stored manifest it resumes, or None
    model_identity: dict
    cfg: DictConfig        # the plain, checked config (``config.plain``) the run works on
    transform_files: dict = dataclasses.field(default_factory=dict)   # id(compressor) -> its checkpoint file
    transforms: dict = dataclasses.field(default_factory=dict)        # transform_key -> built transforms (loaded)


def check_settings(cfg: DictConfig) -> None:
    """The ranges of the top-level settings (their types and closed sets are the schema's:
    ``harness.config.schema.RunConfig``); each a ConfigError naming the value and the fix."""
    from harness.tasks import checks
    checks.positive_int("limit", cfg.limit, allow_none=True)
    check_decode(cfg.decode, cfg.decode_batch, RUN_DECODE_MODES)
    value = cfg.decode_prompts
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise methods.ConfigError(f"decode_prompts={value!r} must be a positive integer (the samples decode=continuous "
                                  "prefills and decodes together); fix: e.g. decode_prompts=64")
    share = cfg.decode_window_memory
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise methods.ConfigError(f"decode_window_memory={share!r} must be a number between 0 and 1 (the share of the "
                                  "available GPU memory one decode=continuous window's caches may hold); fix: e.g. "
                                  "decode_window_memory=0.5")
    if cfg.threads is not None:
        checks.positive_int("threads", cfg.threads)
    timeout = cfg.distributed_timeout_s
    if timeout is not None and timeout <= 0:
        raise methods.ConfigError(f"distributed_timeout_s={timeout:g} must be a positive number of seconds (or null: "
                                  f"{distributed.DEFAULT_TIMEOUT_S})")
    for key in ("budgets", "compression_ratios", "method_overrides"):
        if cfg[key] and not cfg.methods:   # they act on methods=[...] only; alone they would be ignored
            raise methods.ConfigError(f"{key} applies to the methods of methods=[...], and this run has none (it "
                                      f"runs method={cfg.method.name}); fix: methods=[{cfg.method.name}] {key}=..., "
                                      "or set the method's own knobs (method.budget=...)")
    if not str(cfg.results_dir or "").strip():
        raise methods.ConfigError("results_dir is empty; fix: results_dir=<folder>")


def check_dtype(cfg: DictConfig, model_identity: dict) -> None:
    """A protocol dtype that the model config overrides (a model yaml with a fixed ``dtype``) is
    reported: the model runs in its own dtype, which the manifest records."""
    wanted = cfg.protocol.dtype
    if wanted not in ("auto", None) and wanted != model_identity["dtype"]:
        log.warning("protocol.dtype=%s, but model.dtype=%s (model %s): the model runs in %s; the manifest records "
                    "%s. Fix, if %s was meant: model.dtype=%s", wanted, cfg.model.dtype, cfg.model.name,
                    model_identity["dtype"], model_identity["dtype"], wanted, wanted)


def check_model_dtype(compressors, dtype) -> None:
    """Each method's ``check_model_dtype`` on the model's resolved ``dtype``, before the model loads (e.g. H2O's
    ``scorer=fused`` refuses float16): ``methods.ConfigError`` naming the fix."""
    for c in compressors:
        c.check_model_dtype(str(dtype))


def plan(cfg: DictConfig) -> Plan:
    """Every check that needs no model: the typed schema, settings, method knobs, model source,
    protocol, task data, folder names, and each folder's run identity against the stored one
    (ConfigError, or OmegaConf's ValidationError for a bad type or choice)."""
    cfg = checked_config(cfg)
    compressors = build_compressors(cfg)        # bad knobs fail here, before any model loads
    check_hub_access(cfg.model)
    if cfg.model.max_input_tokens is None and cfg.model.get("context_window") is None:   # grids checked against it
        cfg.model.context_window = context_window(cfg.model)
        if cfg.model.context_window is None:
            log.warning("model.max_input_tokens is null and %s's context window is not known before it loads (a hub "
                        "model not cached yet, a package): prompt lengths are not checked against it", cfg.model.name)
    generation_rules.check(cfg.protocol)
    check_protocol(cfg.protocol, cfg.model)
    task = get_task(cfg.task.name)
    task.validate(cfg)
    model_ident = model_identity(cfg.model)
    check_dtype(cfg, model_ident)
    check_model_dtype(compressors, model_ident["dtype"])
    data_ident = task.data_identity(cfg)
    folders, identities, stored = {}, {}, {}
    files = transform_files(cfg, compressors)
    for c in compressors:
        base = run_folder(cfg, c)
        identities[id(c)] = identity.run_identity(cfg, {"name": c.name, **c.knobs()}, model_ident, data_ident)
        if id(c) in files:   # the checkpoint's content, not its path, is what the numbers depend on
            identities[id(c)]["method"]["transform_checkpoint_sha256"] = results.file_sha256(files[id(c)])
        folders[id(c)], stored[id(c)] = identity.resolve_folder(base, identities[id(c)], cfg.resume)
        if folders[id(c)] != base:
            log.info("%s: resume=new -> %s", c.method_name, folders[id(c)])
    if len(set(folders.values())) != len(folders):
        names = [results.run_name({"name": c.name, **c.knobs()}) for c in compressors]
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise methods.ConfigError(f"methods/budgets give the same run {repeated} twice (one results folder); fix: "
                                  "name each method and budget once")
    return Plan(task, compressors, folders, identities, stored, model_ident, cfg, files)


def transform_files(cfg: DictConfig, compressors: list) -> dict:
    """id(compressor) -> the checkpoint file of its transform (``auto``: the one shipped for the model), checked
    before the model loads (ConfigError naming the fix when it is missing or not a DynaKV checkpoint)."""
    from harness.dynakv import checkpoint
    out = {}
    for c in compressors:
        if c.transform is not None and c.transform_checkpoint:
            out[id(c)] = checkpoint.resolve(c.transform_checkpoint, cfg.model.name)
            _, gates, manifest = checkpoint.load(out[id(c)])
            if c.transform == "dynakv" and not gates:
                raise methods.ConfigError(f"transform=dynakv needs trained gates, and {out[id(c)]} holds only PCA "
                                          "bases (from `kvh dynakv calibrate`); fix: `kvh dynakv train --init` it, "
                                          "or method=pca_uniform / method=energy with it")
            checkpoint.check_model(out[id(c)], manifest, cfg.model)
    return out


def build_transforms(job: Plan, model) -> None:
    """Each distinct transform of the run, built on the loaded model (``harness.dynakv.checkpoint``), into
    ``job.transforms``."""
    from harness.dynakv.checkpoint import transforms_for
    for c in job.compressors:
        key = transform_key(c)
        if key is not None and key not in job.transforms:
            job.transforms[key] = transforms_for(c.knobs(), model, job.transform_files.get(id(c)))
            log.info("%s: K/V transform %s on %d layers", c.method_name, results.transform_name(c.knobs()),
                     len(job.transforms[key]))


def lock_folder(folder: Path, stack: contextlib.ExitStack) -> None:
    """Hold ``<folder>/.run.lock`` for the rest of the run: a second run on the same folder fails at
    once (ConfigError) instead of writing the same samples beside this one."""
    from filelock import FileLock, Timeout
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".run.lock"), timeout=0)
    try:
        stack.enter_context(lock)
    except Timeout:
        raise methods.ConfigError(f"another run is writing to {folder} (it holds {folder / '.run.lock'}); fix: wait for "
                                  "it to finish, or resume=new for a sibling folder") from None


def run(cfg: DictConfig, lm=None) -> list[dict]:
    """Run (or resume) the configured job; returns one summary per method (also in scores.json).
    ``lm``: an already loaded model (``load_model``'s ``LoadedModel``, e.g. the benchmark's) to run on
    instead of loading ``cfg.model``; it must be what ``cfg.model`` describes: the run checks its name, attention
    backend, dtype and commit against the config's (RuntimeError), the rest (weights, stop tokens) is the
    caller's word."""
    job = plan(cfg)
    cfg = job.cfg
    with contextlib.ExitStack() as locks:
        if distributed.world()[0] == 0:
            for folder in job.folders.values():
                lock_folder(folder, locks)
        return _run(cfg, job, locks, lm)


def _run(cfg: DictConfig, job: Plan, locks: contextlib.ExitStack, lm=None) -> list[dict]:
    """The run after ``plan``: samples (checked before the weights load), the model (``lm``, where given,
    instead), the folders' manifests, one generation per (sample, method) not yet done, then the scores
    (rank 0)."""
    distributed.init(cfg.distributed_timeout_s)
    rank, world = distributed.world()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    built: dict = {}
    if lm is None:
        log.info("loading model %s (source %s)", cfg.model.name, cfg.model.source)   # every check above ran first
        lm = _cached_model(OmegaConf.to_yaml(cfg.model, resolve=True),
                           lambda tokenizer: built.update(build_samples(cfg, job, locks, tokenizer)))
    else:   # a model loaded by the caller: the same checks on its tokenizer and dtype, and it must be cfg.model's
        wanted = {"name": cfg.model.name, "attn_implementation": cfg.model.get("attn_implementation") or "sdpa"}
        given = {"name": lm.name, "attn_implementation": lm.info.get("attn_implementation")}
        if wanted != given:
            raise RuntimeError(f"run(cfg, lm): the model given is {given}, the config's {wanted}; pass the model "
                               "loaded from cfg.model (or no lm)")
        built.update(build_samples(cfg, job, locks, lm.tokenizer))
    if lm.info["dtype"] != job.model_identity["dtype"]:
        raise RuntimeError(f"model {cfg.model.name} loaded in {lm.info['dtype']}, not the {job.model_identity['dtype']} "
                           "its config resolves to; the run identity would be wrong")
    check_loaded_commit(cfg, job, lm)
    build_transforms(job, lm.model)
    if rank == 0:   # invalid lines go to <file>.bad before anyone counts what is done
        for folder in job.folders.values():
            for path in list(folder.glob("*.jsonl")) + results.part_files(folder):
                results.quarantine(path)
    distributed.barrier()
    done = {id(c): set(results.finished(job.folders[id(c)])) for c in job.compressors}
    all_samples = built["samples"]
    write_manifests(cfg, job, lm, built["chat"], all_samples, done)
    generate_rows(cfg, job, lm, built["chat"], all_samples[rank::world], built["digests"], done)
    distributed.barrier()
    if rank != 0:
        return []
    return finish(cfg, job, [(s.group, s.id) for s in all_samples])


def build_samples(cfg: DictConfig, job: Plan, locks: contextlib.ExitStack, tokenizer) -> dict:
    """The task's samples, built with the tokenizer before the weights load (settings only the tokenizer
    can judge fail early): stop tokens exist, ids are unique, and every folder's finished rows were made
    from these very samples (else refused, or ``resume=new`` moves to a sibling folder). Returns
    ``{"chat": bool, "samples": [Sample], "digests": {(group, id): sha256}}``."""
    for token in cfg.model.extra_stop_tokens or []:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise methods.ConfigError(f"model.extra_stop_tokens: {token!r} is not a token of {cfg.model.name}'s "
                                      f"tokenizer ({cfg.model.name_or_path or cfg.model.path}); fix: the exact token "
                                      "text, or model.extra_stop_tokens=[]; for a model of your own use model=custom, "
                                      "which takes the stop tokens from the model's own tokenizer and generation config")
    view = SimpleNamespace(tokenizer=tokenizer, max_input_tokens=cfg.model.max_input_tokens,
                           chat_template=is_chat_model(cfg.model.chat_template, tokenizer))
    if cfg.model.chat_template is None:
        log.info("model.chat_template=null: %s's tokenizer %s a chat template, so it runs as a %s model (set "
                 "model.chat_template=true or false to decide)", cfg.model.name,
                 "has" if view.chat_template else "has no", "chat" if view.chat_template else "base")
    chat = use_chat_template(cfg.protocol.chat_template, view.chat_template, tokenizer)
    samples = task_samples(job.task, cfg.task, view, chat, cfg.protocol.truncation, cfg.protocol.prompt_special_tokens)
    if cfg.limit:
        samples = samples[: int(cfg.limit)]
    digests = {(s.group, s.id): identity.sample_digest(s) for s in samples}
    if len(digests) != len(samples):
        seen, repeated = set(), []
        for s in samples:
            (repeated.append(s.id) if (s.group, s.id) in seen else seen.add((s.group, s.id)))
        raise methods.ConfigError(f"task {cfg.task.name}: sample id(s) {sorted(set(repeated))[:5]} occur twice (two "
                                  "grid points give the same id, e.g. repeated lengths or depths); fix: give each "
                                  "length and depth once")
    check_compression(cfg, job, samples, tokenizer, chat)
    for c in job.compressors:   # finished rows must have been made from these samples
        rows = results.finished(job.folders[id(c)])
        if identity.conflicts(rows, digests):
            if cfg.resume != "new":
                identity.check_samples(job.folders[id(c)], rows, digests)
            base = run_folder(cfg, c)
            folder, stored = identity.resolve_folder(
                base, job.identities[id(c)], "new",
                reject=lambda f: bool(identity.conflicts(results.finished(f), digests)))
            log.info("%s: resume=new -> %s (the earlier folders hold other samples)", c.method_name, folder)
            job.folders[id(c)], job.stored[id(c)] = folder, stored
            if distributed.world()[0] == 0:
                lock_folder(folder, locks)
    return {"chat": chat, "samples": samples, "digests": digests}


def check_compression(cfg: DictConfig, job: Plan, samples: list[Sample], tokenizer, chat: bool) -> None:
    """Before the weights load: every sample can be split as ``protocol.compression_scope`` asks, and every
    method's ``compression_ratio`` leaves a workable budget on every sample's compressed part (ConfigError
    naming the sample otherwise). Nothing to check for the whole prompt under token budgets."""
    scope = cfg.protocol.compression_scope
    ratios = [c for c in job.compressors if c.compression_ratio is not None and not c.is_noop]
    if scope == "prompt" and not ratios:
        return
    skip = set(cfg.protocol.chat_template_skip or [])
    for sample in samples:
        try:
            ids, compressed = encode_parts(sample, tokenizer, chat and sample.dataset not in skip, "cpu",
                                           cfg.protocol.prompt_special_tokens, scope)
        except ValueError as error:
            raise methods.ConfigError(f"task {cfg.task.name}: {error}") from None
        for c in ratios:
            try:
                c.resolved(compressed)
            except methods.ConfigError as error:
                raise methods.ConfigError(f"sample {sample.id} ({compressed} compressed tokens): {error}") from None


def write_manifests(cfg: DictConfig, job: Plan, lm, chat: bool, all_samples: list[Sample], done: dict) -> None:
    """Each method's ``manifest.json`` (rank 0): a fresh folder's full record, or a resumed folder's
    record with this session added; logs how many samples each folder already has."""
    rank, world = distributed.world()
    skip = set(cfg.protocol.chat_template_skip or [])
    session = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "config": OmegaConf.to_container(cfg, resolve=True), "environment": results.environment(),
               "world_size": world, "samples": len(all_samples)}
    manifest = {"config": session["config"], "model": lm.info, "dtype": lm.info["dtype"], "chat_template": chat,
                "stop_token_ids": lm.stop_token_ids, "stop_tokens": lm.tokenizer.convert_ids_to_tokens(lm.stop_token_ids),
                "environment": session["environment"],
                "samples": len(all_samples), "shared_prefill": len(job.compressors) > 1,
                "generation": {dataset or "default": {
                    "stop_token_ids": generation_rules.stop_ids(cfg.protocol, dataset, lm),
                    "min_new_tokens": generation_rules.min_new_tokens(cfg.protocol, dataset),
                    "chat_template": chat and dataset not in skip} for dataset in {s.dataset for s in all_samples}}}
    if job.task.checksums is not None:
        manifest["data_sha256"] = job.task.checksums(cfg.task)
    if job.task.environment is not None:
        manifest["scorer"] = job.task.environment()
    if job.task.records is not None:
        manifest["generated"] = job.task.records(all_samples)
    mine = all_samples[rank::world]
    for c in job.compressors:
        folder = job.folders[id(c)]
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            stored = job.stored[id(c)]
            if stored is not None:   # the same identity: keep the first session's record, add this one
                record = {**stored, "identity": identity.merged(stored["identity"], job.identities[id(c)]),
                          "sessions": [*stored.get("sessions", []), session]}
            else:
                record = {**manifest, "world_size": world, "method": {"name": c.name, **c.knobs()},
                          "identity": job.identities[id(c)], "sessions": [session]}
            results.write_json(folder / results.MANIFEST, record)
        finished = sum((s.group, s.id) in done[id(c)] for s in mine)
        log.info("%s: %d of %d samples already done -> %s", c.method_name, finished, len(mine), folder)


def generate_rows(cfg: DictConfig, job: Plan, lm, chat: bool, samples: list[Sample], digests: dict,
                  done: dict) -> None:
    """Generate and append one row per (sample, method) not yet done: one prompt encoding and, for
    several methods, one shared prefill per sample (``generate_many``); rows flushed as they come. A
    progress bar counts (sample, method) generations of this rank, starting at those already done.
    ``decode=continuous``: the rows of ``decode_prompts`` samples at a time decoded together
    (``harness.run.windows``), except for tasks scored without generating and models over several devices."""
    rank, world = distributed.world()
    writers: dict[tuple, results.PredictionWriter] = {}
    total = len(samples) * len(job.compressors)
    initial = sum((s.group, s.id) in done[id(c)] for s in samples for c in job.compressors)
    bar = progress.progress_bar(total, initial, cfg.progress, rank, world, desc=f"{cfg.task.name} {cfg.model.name}")
    warned = [False]   # the special-token warning, once per run
    with bar, progress.redirected(bar):
        if cfg.decode == "continuous" and job.task.evaluate is None:
            from harness.run import windows
            if windows.usable(lm):
                windows.generate_windows(cfg, job, lm, chat, samples, digests, done, writers, warned, bar)
                return
        for sample in samples:
            todo = [c for c in job.compressors if (sample.group, sample.id) not in done[id(c)]]
            if todo:
                bar.set_postfix_str(sample.id)   # the sample at work, shown while a long one runs
                generate_sample(cfg, job, lm, chat, sample, todo, digests[(sample.group, sample.id)], writers, warned)
                bar.update(len(todo))


def generate_sample(cfg: DictConfig, job: Plan, lm, chat: bool, sample: Sample, todo: list, digest: str,
                    writers: dict, warned: list) -> None:
    """One sample for the methods in ``todo``: encode, generate (one shared prefill for several), append
    each method's row (``writers``: open prediction files by (method, group)), and log one line with
    every method's score."""
    if job.task.evaluate is not None:     # scored without generating (perplexity)
        evaluated(cfg, job, lm, sample, todo, digest, writers)
        return
    # decode=continuous comes here for a model over several devices only (windows.usable): batched, which decodes
    # such a model on the plain path
    fast = {"decode": "batched" if cfg.decode == "continuous" else cfg.decode, "cuda_graphs": bool(cfg.cuda_graphs),
            "compile": bool(cfg.decode_compile)}
    prompt = prompt_input(cfg, lm, chat, sample, warned)
    input_ids, compressed, stops, min_new, stop_strings = (prompt.input_ids, prompt.compressed, prompt.stops,
                                                           prompt.min_new_tokens, prompt.stop_strings)
    scope = cfg.protocol.compression_scope
    log.debug("%s: %d prompt tokens, up to %d new, %d method(s)", sample.id, input_ids.shape[1],
              sample.max_new_tokens, len(todo))
    start = time.perf_counter()
    split = {"compressed_tokens": compressed}
    results_by = {}
    groups = []
    for key, group in transform_groups(todo):
        # under a split scope each method's appended question is transformed on its own cache: such a group
        # runs one method at a time, so that the log's calls after the prefill are that method's
        one_by_one = key is not None and compressed < input_ids.shape[1]
        groups += [(key, [c]) for c in group] if one_by_one else [(key, group)]
    for key, group in groups:
        with transformed_for(job, lm, key) as tlog:
            if len(group) == 1:
                outs = [generate(lm.model, lm.tokenizer, input_ids, group[0], sample.max_new_tokens, stops,
                                 stop_strings, min_new, **fast, **split)]
            else:
                outs = generate_many(lm.model, lm.tokenizer, input_ids, group, sample.max_new_tokens, stops,
                                     stop_strings, min_new, max_batch=int(cfg.decode_batch), **fast, **split)
        for row, (c, out) in enumerate(zip(group, outs)):
            extra = {} if tlog is None else transform_fields(lm, tlog, out.report, compressed, input_ids.shape[1],
                                                             row, len(out.token_ids) - 1, job.transforms[key],
                                                             c.transform)
            results_by[id(c)] = (out, extra)
    elapsed = time.perf_counter() - start
    scores = []
    for c in todo:
        out, extra = results_by[id(c)]
        row = result_row(job.task, sample, out, elapsed / len(todo), c) | {"sample_sha256": digest,
                                                                      **compression_fields(c, compressed, scope),
                                                                      **extra}
        if cfg.save_kept_positions and out.report is not None:
            save_positions(job.folders[id(c)], sample.id, out.report)
        append_row(job, c, sample, row, writers)
        scores.append(f"{job.folders[id(c)].name}={100 * row['score']:.1f}")   # 0-100, as scores.json
        log.debug("%s %s: %r", job.folders[id(c)].name, sample.id, out.text[:80])
    name = f"{sample.group}/{sample.id}" if sample.group else sample.id
    log.info("%s (%d tokens, %.1f s): %s", name, input_ids.shape[1], elapsed, ", ".join(scores))


def evaluated(cfg: DictConfig, job: Plan, lm, sample: Sample, todo: list, digest: str, writers: dict) -> None:
    """A sample of a task scored without generating (``Task.evaluate``): one row per method in ``todo``."""
    for key, group in transform_groups(todo):
        start = time.perf_counter()
        with transformed_for(job, lm, key) as tlog:
            fields = job.task.evaluate(cfg.task, lm, sample)
        if tlog is not None:
            check_transformed(tlog, job.transforms[key])
            fields |= {"kv_retain_rate": round(tlog.retain_rate(), 6), "kv_retain_rate_k": round(tlog.retain_rate("k"), 6),
                       "kv_retain_rate_v": round(tlog.retain_rate("v"), 6)}
        for c in group:
            row = {"id": sample.id, **sample.meta, **fields, "seconds": round(time.perf_counter() - start, 3),
                   "sample_sha256": digest}
            append_row(job, c, sample, row, writers)
        log.info("%s %s: %s", sample.id, group[0].name if key is None else results.transform_name(group[0].knobs()),
                 ", ".join(f"{k}={v:.4g}" for k, v in fields.items() if isinstance(v, float)))


def finish(cfg: DictConfig, job: Plan, sample_keys: list[tuple]) -> list[dict]:
    """Rank 0, after every rank is done: merge the part files, summarise each folder (``scores.json``),
    the task's final scores (LongBench's ``result.json``), W&B. Returns one summary per method. A
    folder whose scores its W&B run already has (``wandb_log.up_to_date``) is not logged again."""
    summaries = []
    for c in job.compressors:
        folder = job.folders[id(c)]
        order = {key: k for k, key in enumerate(sample_keys)}
        distributed.merge(folder, order)
        if cfg.decode == "continuous":   # rows were appended as they finished: put them back in sample order
            results.in_sample_order(folder, order)
        summary = summarize(folder, c.method_name, job.task.finalize)   # LongBench: datasets, averages
        if cfg.wandb and summary["samples"]:
            log_to_wandb(cfg, folder, c, summary)
        summaries.append(summary)
    return summaries


def _counter(task, lm, chat: bool, special_tokens: str = "text"):
    """``count_tokens(prompt_text, answer_prefix=task.answer_prefix) -> int``: the length of the model
    input the runner builds for that prompt (chat template, BOS and answer prefix included)."""
    def count_tokens(prompt_text: str, answer_prefix: str | None = None) -> int:
        prefix = task.answer_prefix if answer_prefix is None else answer_prefix
        probe = Sample(id="", prompt=prompt_text, answers=[], max_new_tokens=1, answer_prefix=prefix)
        return encode(probe, lm.tokenizer, chat, "cpu", special_tokens).shape[1]
    return count_tokens


def log_to_wandb(cfg: DictConfig, folder: Path, compressor, summary: dict) -> str | None:
    """W&B (``harness.report.wandb_log``): the folder's one W&B run, resumed on a re-run, in the job's group
    (``wandb_group``), job type = task, tagged with model, method, budget, protocol, decode path and
    ``wandb_tags``; config, scores, predictions, the result files as an artifact, the heatmap of a grid
    task. Offline without an API key, files in ``wandb_dir``; ``wandb=false`` turns it off. Returns the
    wandb run directory, or None (off, or wandb failed: one logged warning)."""
    if not cfg.wandb:
        return None
    from harness.report import wandb_log
    if wandb_log.up_to_date(folder):
        log.info("%s: its W&B run already has these scores, left as it was", folder.name)
        return None
    scores = summary.get("datasets") or {cfg.task.name: summary["score"]}
    rows = [{k: r.get(k) for k in ("id", "dataset", "pred", "answers", "score", "context_length", "depth")}
            for r in results.read_predictions(folder)]
    knobs = compressor.knobs()
    tags = [cfg.model.name, compressor.name, *([] if compressor.is_noop else [f"budget:{knobs['budget']}"]),
            f"protocol:{cfg.protocol.name}", f"decode:{cfg.decode}", *(cfg.get("wandb_tags") or [])]
    run_dir = wandb_log.log_run(folder, {**OmegaConf.to_container(cfg, resolve=True),
                               "method": {"name": compressor.name, **knobs}, "folder": str(folder)},
                      scores, [summary | {"folder": str(folder)}], rows, project=cfg.wandb_project,
                      group=cfg.get("wandb_group") or wandb_log.default_group(), job_type=cfg.task.name, tags=tags,
                      name=f"{cfg.model.name}/{folder.name}", wandb_dir=cfg.get("wandb_dir"))
    if run_dir:
        log.info("%s: W&B run in %s%s", folder.name, run_dir,
                 " (offline: `wandb sync <that folder>` uploads it)" if "offline-run" in str(run_dir) else "")
    return run_dir


def summarize(folder: Path, method: str, finalize=None) -> dict:
    """The summary of every finished sample in the folder, written to ``scores.json`` when there is at
    least one (a run with none never replaces a summary). A run with ``limit`` or a smaller grid than
    an earlier one (settings that cannot change a number) summarises the same rows as a full re-run:
    the folder's, as the reporters and LongBench's scorer read them.

    Always ``method``, ``folder`` and ``samples`` (how many are finished). Without ``finalize``
    (passkey, needle), or with no finished sample: ``score`` = 100 x the mean of the rows' ``score``
    over those samples (needle: word recall of the needle; passkey: share of keys found), NaN for none.
    With ``finalize`` (the task's final scorer, ``Task.finalize``): the fields it returns instead
    (LongBench: ``harness.longbench.score.summary_fields``, the official scores and both averages)."""
    rows = list(results.finished(folder).values())
    summary = {"method": method, "folder": str(folder), "samples": len(rows)}
    if finalize is None or not rows:
        mean = sum(r["score"] for r in rows) / len(rows) if rows else float("nan")
        summary["score"] = round(100 * mean, 2)
    else:
        summary |= finalize(folder)
    for key in ("kv_retain_rate", "kv_retain_rate_k", "kv_retain_rate_v", "kv_combined_rate"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:     # a K/V transform's realised rates, the mean over rows (0-1)
            summary[key] = round(sum(values) / len(values), 4)
    full = sum(r.get("kv_bytes_full") or 0 for r in rows)
    if full:
        latent = sum(r.get("kv_bytes_latent") or 0 for r in rows)
        summary["kv_bytes_ratio"] = round(latent / full, 4)
        summary["kv_bytes_ratio_with_metadata"] = round((latent + sum(r.get("kv_bytes_rank_metadata") or 0
                                                                       for r in rows)) / full, 4)
    if rows:
        results.write_json(Path(folder) / results.SCORES, summary)
    return summary
