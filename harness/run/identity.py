"""Run identity: what a results folder's numbers depend on, so a resume never mixes two configs.

A run folder is named after the method's knobs only (``results.run_name``); everything else that can
change a number (the model and its weights, the dtype it runs in, the attention backend, the task's
settings and data, the protocol, the decode path, the torch and transformers versions) is the
folder's *identity*, stored in its ``manifest.json``. Before the model loads, the runner compares the
stored identity with the one the new config gives:

* identical: the run resumes (the manifest keeps its first session and gains a ``sessions`` entry);
* different: the run is refused with the differing keys and the two ways on (``resume=new`` writes a
  sibling folder ``<name>.2``, ``.3``, ...; or delete the folder);
* a folder with finished rows but no manifest (or one from before run identity): refused the same way.

Settings that cannot change a number do not block: ``limit``, ``wandb``, ``decode_batch``, ``decode_prompts``, ``decode_window_memory``,
``threads``, ``save_kept_positions``, the folders data are read from (their content is checksummed
instead), and the sample grid (context lengths, depths, LongBench's dataset list): a grid that grows
adds samples. Because one sample id can then stand for another prompt (passkey's keys are drawn in
grid order), every row also stores ``sample_sha256``, a digest of the model input's parts; a finished
row whose digest differs from the current sample with the same id is refused too (after the samples
are built, before any is run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from harness.config import schema
from methods import ConfigError

log = logging.getLogger(__name__)

RESUME_MODES = tuple(schema.Resume.__members__)   # auto | new
#: top-level settings that cannot change a number
NOT_IDENTITY = ("results_dir", "limit", "progress", "wandb", "wandb_project", "wandb_group", "wandb_dir", "wandb_tags",
                "decode_batch", "decode_prompts", "decode_window_memory", "threads", "save_kept_positions", "methods", "budgets", "compression_ratios", "method_overrides", "method",
                "resume", "debug", "distributed_timeout_s", "hydra")
#: model settings that cannot change a number (where the weights come from is in ``weights``)
MODEL_NOT_IDENTITY = ("name", "device_map", "dense_cache", "path", "package", "file", "hub_id", "name_or_path",
                      "revision", "dtype", "device", "chat_template_file", "context_window")
#: task settings that select samples (the grid) or say where data come from (their content is checksummed)
TASK_NOT_IDENTITY = ("name", "data_dir", "config_dir", "haystack_dir", "limit", "datasets", "context_lengths",
                     "context_range", "depths", "depth_grid", "samples_per_cell", "hub_repo", "hub_revision",
                     "config_commit", "tasks", "samples_per_task", "squad_path", "hotpotqa_path", "text_path",
                     "label", "max_tokens")
#: protocol settings that only feed method knobs (their resolved values are in ``method``) or the dtype
#: (resolved in ``model.dtype``)
PROTOCOL_NOT_IDENTITY = ("window_size", "kernel_size", "pooling", "granularity", "streamingllm_sink_tokens",
                         "h2o_variant", "h2o_scorer", "dynamickv_radio_max", "dtype")
#: decode settings without effect on the CPU
GPU_ONLY = ("cuda_graphs", "decode_compile")
#: keys (dotted prefixes) where an entry present on one side only is not a difference
OPEN_SETS = ("task.data.",)
#: keys whose value None means "not known before the model loads" (checked after loading instead)
UNKNOWN_IF_NONE = ("model.weights.commit",)
#: names that become path components: letters, digits and ``_ . + = -``, not starting with a dot
SAFE_NAME = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*$")


def check_name(what: str, value, fix: str | None = None) -> str:
    """``value`` if it can be a single path component (no separator, no ``..``), else ConfigError."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{what}={text!r} becomes a folder name and may hold only letters, digits and _ . + = - "
                          f"(no '/', no '..', not starting with '.'); fix: {fix or what + '=<such a name>'}")
    return text


def inside(folder: Path, root: Path) -> Path:
    """``folder`` if it resolves to a path under ``root``, else ConfigError (a name escaped the results)."""
    # lexical, not resolve(): a results tree laid out through symbolic links stays valid
    resolved, base = Path(os.path.normpath(os.path.abspath(folder))), Path(os.path.normpath(os.path.abspath(root)))
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{folder} lies outside results_dir={str(root)!r} ({resolved}); fix: the names that form "
                          "the path (model.name, protocol.name, task.name) must be plain names without '..' or '/'")
    return Path(folder)


def sample_digest(sample) -> str:
    """sha256 (first 16 hex digits) of what a sample puts into the model and scores against."""
    parts = [sample.prompt, sample.answer_prefix, list(sample.answers), int(sample.max_new_tokens), sample.dataset,
             sample.meta]   # meta: what the scorer reads (all_classes, length, depth, ...)
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg, knobs: dict, model_identity: dict, data_identity: dict) -> dict:
    """The settings a folder's numbers depend on (see the module docstring).

    ``knobs``: the method's knobs (``{"name": ..., **compressor.knobs()}``); ``model_identity``: the
    resolved dtype, device type and weights fingerprint (``models.model_identity``); ``data_identity``:
    the task's data checksums (``task.data_identity``)."""
    from harness.run import results
    config = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    if model_identity["device"] == "cpu":
        ident = {k: v for k, v in ident.items() if k not in GPU_ONLY}
    ident["model"] = {k: v for k, v in config["model"].items() if k not in MODEL_NOT_IDENTITY} | model_identity
    ident["task"] = {k: v for k, v in config["task"].items() if k not in TASK_NOT_IDENTITY} | {"data": data_identity}
    ident["protocol"] = {k: v for k, v in config["protocol"].items() if k not in PROTOCOL_NOT_IDENTITY}
    ident["method"] = {k: v for k, v in knobs.items() if k not in results.NOT_IN_NAME}
    ident["packages"] = {p: results.package_version(p) for p in ("torch", "transformers")}
    return ident


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def differences(stored: dict, current: dict) -> list[tuple[str, object, object]]:
    """``(key, stored value, current value)`` for every dotted key that differs ("<absent>" where a
    key is missing), keys under ``OPEN_SETS`` compared only where both sides have them. A key absent on
    one side whose value on the other is its schema default (``harness.config.schema.defaults``: an
    identity stored before the key had a default in the schema) is no difference."""
    old, new, default = flatten(stored), flatten(current), schema.defaults()
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key.startswith(p) for p in OPEN_SETS) and (key not in old or key not in new):
            continue
        if (key not in old or key not in new) and key in default and \
                (old if key in old else new)[key] == default[key]:
            continue
        if key in UNKNOWN_IF_NONE and (old.get(key) is None or new.get(key) is None):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            out.append((key, a, b))
    return out


def has_rows(folder: Path) -> bool:
    from harness.run import results
    return bool(results.finished(folder))


def resolve_folder(base: Path, ident: dict, mode: str, reject=None) -> tuple[Path, dict | None]:
    """The folder this run writes to, and the stored manifest it resumes (None: a fresh folder).

    ``mode``: ``auto`` (resume ``base`` if its identity matches, else refuse) or ``new`` (the first of
    ``base``, ``base.2``, ``base.3``... that is empty or has this identity and is not ``reject``ed:
    ``reject(folder)`` is true where finished rows conflict with this run's samples). Raises ConfigError."""
    from harness.run import results
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume={mode!r} is not one of {list(RESUME_MODES)}; fix: resume=auto (resume a folder "
                          "with the same settings, refuse otherwise) or resume=new (a sibling folder)")
    candidates = [base] if mode == "auto" else [base] + [base.with_name(f"{base.name}.{k}") for k in range(2, 1000)]
    problems = []
    for folder in candidates:
        manifest_path = folder / results.MANIFEST
        if not folder.exists() or not has_rows(folder):
            stored = results.read_json(manifest_path) if manifest_path.is_file() else None
            if stored is not None and stored.get("identity") not in (None, ident):
                log.info("%s: replacing the manifest of a run with no finished samples", folder)
            return folder, None
        if not manifest_path.is_file():
            problems.append(f"{folder} has finished samples but no {results.MANIFEST}, so the settings that made "
                            "them are unknown")
            continue
        stored = results.read_json(manifest_path)
        if "identity" not in stored:
            problems.append(f"{folder} was written by a harness without run identity (its manifest has no "
                            "'identity'), so its settings cannot be compared")
            continue
        diff = differences(stored["identity"], ident)
        if not diff and mode == "new" and reject is not None and reject(folder):
            problems.append(f"{folder} has the same settings, but finished samples made from other prompts")
            continue
        if not diff:
            return folder, stored
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        problems.append(f"{folder} holds results of other settings: {shown}{more}")
    raise ConfigError(problems[0] + ". Resuming would mix two configs in one run; fix: resume=new (write a sibling "
                      f"folder {base.name}.2, ...), or delete the folder, or run with the stored settings")


def merged(stored: dict, current: dict) -> dict:
    """``stored`` with the open-set entries (data files) and unknown values that only ``current`` has
    added, so that a dataset joining a run in a later session is checked from then on."""
    out = json.loads(json.dumps(stored))
    data = out.setdefault("task", {}).setdefault("data", {})
    for name, digest in current.get("task", {}).get("data", {}).items():
        data.setdefault(name, digest)
    weights = out.get("model", {}).get("weights", {})
    if isinstance(weights, dict) and weights.get("commit") is None:
        commit = current.get("model", {}).get("weights", {}).get("commit")
        if commit is not None:
            weights["commit"] = commit
    return out


def conflicts(rows: dict, digests: dict) -> list[tuple]:
    """(group, id) of finished rows whose sample now has other content (keys as ``results.finished``)."""
    return [key for key, row in rows.items() if key in digests and row.get("sample_sha256") != digests[key]]


def check_samples(folder: Path, rows: dict, digests: dict) -> None:
    """Refuse finished rows whose sample (same group and id) now has other content. ``rows`` and
    ``digests`` are keyed by (group, id) (``results.finished``)."""
    changed = [f"{g}/{i}" if g else i for g, i in conflicts(rows, digests)]
    if changed:
        raise ConfigError(f"{folder}: {len(changed)} finished sample(s) were made from other prompts than the ones "
                          f"this config builds under the same id ({', '.join(map(str, changed[:5]))}"
                          f"{', ...' if len(changed) > 5 else ''}); a grid or data change moved them. Resuming would "
                          "mix two configs; fix: resume=new, or delete the folder")
