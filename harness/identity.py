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

Settings that cannot change a number do not block: ``limit``, ``wandb``, ``decode_batch``,
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
import re
from pathlib import Path

from omegaconf import OmegaConf

from methods import ConfigError

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "new")
#: top-level settings that cannot change a number
NOT_IDENTITY = ("results_dir", "limit", "wandb", "wandb_project", "decode_batch", "threads",
                "save_kept_positions", "methods", "budgets", "method_overrides", "method", "resume",
                "debug", "distributed_timeout_s", "hydra")
#: model settings that cannot change a number (where the weights come from is in ``weights``)
MODEL_NOT_IDENTITY = ("name", "device_map", "dense_cache", "path", "package", "file", "hub_id", "name_or_path",
                      "revision", "dtype", "device", "chat_template_file")
#: task settings that select samples (the grid) or say where data lives (checksummed instead)
TASK_NOT_IDENTITY = ("name", "data_dir", "config_dir", "haystack_dir", "limit", "datasets", "context_lengths",
                     "context_range", "depths", "depth_grid", "samples_per_cell")
#: keys (dotted prefixes) where an entry present on one side only is not a difference
OPEN_SETS = ("task.data.",)
#: names that become path components: letters, digits and ``_ . + = -``, not starting with a dot
SAFE_NAME = re.compile(r"^[A-Za-z0-9_+=-][A-Za-z0-9_.+=-]*$")


def check_name(what: str, value) -> str:
    """``value`` if it can be a single path component (no separator, no ``..``), else ConfigError."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text) or ".." in text:
        raise ConfigError(f"{what}={text!r} becomes a folder name and may hold only letters, digits and _ . + = - "
                          f"(no '/', no '..', not starting with '.'); fix: {what}=<such a name>")
    return text


def inside(folder: Path, root: Path) -> Path:
    """``folder`` if it resolves to a path under ``root``, else ConfigError (a name escaped the results)."""
    resolved, base = Path(folder).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"{folder} resolves to {resolved}, outside results_dir={str(root)!r}; a name in the "
                          "config must not lead out of the results folder")
    return Path(folder)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_digest(sample) -> str:
    """sha256 (first 16 hex digits) of what a sample puts into the model and scores against."""
    parts = [sample.prompt, sample.answer_prefix, list(sample.answers), int(sample.max_new_tokens), sample.dataset]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def run_identity(cfg, knobs: dict, model_identity: dict, data_identity: dict) -> dict:
    """The settings a folder's numbers depend on (see the module docstring).

    ``knobs``: the method's knobs (``{"name": ..., **compressor.knobs()}``); ``model_identity``: the
    resolved dtype, device type and weights fingerprint (``models.model_identity``); ``data_identity``:
    the task's data checksums (``task.data_identity``)."""
    from harness import results
    config = OmegaConf.to_container(cfg, resolve=True)
    ident = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    ident["model"] = {k: v for k, v in config["model"].items() if k not in MODEL_NOT_IDENTITY} | model_identity
    ident["task"] = {k: v for k, v in config["task"].items() if k not in TASK_NOT_IDENTITY} | {"data": data_identity}
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
    key is missing), keys under ``OPEN_SETS`` compared only where both sides have them."""
    old, new = flatten(stored), flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if any(key.startswith(p) for p in OPEN_SETS) and (key not in old or key not in new):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            out.append((key, a, b))
    return out


def has_rows(folder: Path) -> bool:
    from harness import results
    return bool(results.finished(folder))


def resolve_folder(base: Path, ident: dict, mode: str) -> tuple[Path, dict | None]:
    """The folder this run writes to, and the stored manifest it resumes (None: a fresh folder).

    ``mode``: ``auto`` (resume ``base`` if its identity matches, else refuse) or ``new`` (the first of
    ``base``, ``base.2``, ``base.3``... that is empty or has this identity). Raises ConfigError."""
    from harness import results
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
        if not diff:
            return folder, stored
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:8])
        more = f" (and {len(diff) - 8} more)" if len(diff) > 8 else ""
        problems.append(f"{folder} holds results of other settings: {shown}{more}")
    raise ConfigError(problems[0] + ". Resuming would mix two configs in one run; fix: resume=new (write a sibling "
                      f"folder {base.name}.2, ...), or delete the folder, or run with the stored settings")


def check_samples(folder: Path, rows: dict, digests: dict) -> None:
    """Refuse finished rows whose sample (same group and id) now has other content. ``rows`` and
    ``digests`` are keyed by (group, id) (``results.finished``)."""
    changed = [key[1] for key, row in rows.items() if key in digests and row.get("sample_sha256") != digests[key]]
    if changed:
        raise ConfigError(f"{folder}: {len(changed)} finished sample(s) were made from other prompts than the ones "
                          f"this config builds under the same id ({', '.join(map(str, changed[:5]))}"
                          f"{', ...' if len(changed) > 5 else ''}); a grid or data change moved them. Resuming would "
                          "mix two configs; fix: resume=new, or delete the folder")
