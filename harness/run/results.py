"""Results folders: one per run, named after the config; predictions appended one JSON line per
sample and flushed, so an interrupted run loses nothing finished and resumes where it stopped."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from methods.base import TRANSFORM_FIELDS, TRANSFORM_KNOBS, ConfigError

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
MANIFEST = "manifest.json"
SCORES = "scores.json"

_SHORT = {"query_head": "qh", "kv_head": "kvh", "layer": "layer"}
# knobs that change speed or memory, not which tokens are kept: recorded in the manifest, not the name
NOT_IN_NAME = {"query_chunk"}


def run_name(method: dict) -> str:
    """The results folder of a method: its knobs as set, e.g. ``snapkv_b256_w32_k7_maxpool_qh`` (with a
    ``compression_ratio``: ``snapkv_r0.5_w32_k7_maxpool_qh``, the budget being resolved per prompt) plus any
    method-specific knob (``variantcausal``...). StreamingLLM scores nothing, so its name has no kernel
    or pooling, and with ``sink_tokens`` set (its window is then ``budget - sink_tokens``, derived, not
    set) it names the sinks: ``streamingllm_b128_sink4_qh``; without, ``streamingllm_b128_w32_qh``."""
    knobs = dict(method)
    transform = {f: knobs.pop(f, None) for f in TRANSFORM_FIELDS}
    base = _eviction_name(knobs)
    if transform["transform"] is None:
        return base
    return transform_name(transform) if base == "fullkv" else f"{base}+{transform_name(transform)}"


def transform_name(knobs: dict) -> str:
    """The name part of a K/V transform (``methods.lowrank``): ``dynakv_tau0.1_<checkpoint stem>``,
    ``pca_uniform_rate0.5_<stem>``, ``svd_weights_rate0.3``, ``energy_eta0.9_<stem>`` (``auto``: the checkpoint
    shipped for the model)."""
    name = knobs["transform"]
    knob = TRANSFORM_KNOBS[name]
    parts = [name, f"{knob.removeprefix('transform_')}{knobs[knob]:g}"]
    checkpoint = knobs.get("transform_checkpoint")
    if checkpoint:
        parts.append(Path(str(checkpoint)).name.removesuffix(".safetensors"))
    return "_".join(parts)


def _eviction_name(knobs: dict) -> str:
    name = knobs.pop("name")
    if name == "fullkv":
        return "fullkv"
    ratio = knobs.pop("compression_ratio", None)
    size = f"b{knobs['budget']}" if ratio is None else f"r{ratio:g}"   # a ratio replaces the token budget
    if name == "streamingllm":
        sinks = knobs.get("sink_tokens")
        parts = [name, size, f"sink{sinks}" if sinks is not None else f"w{knobs['window_size']}",
                 _SHORT.get(knobs.get("granularity"), str(knobs.get("granularity")))]
        return "_".join(parts)
    knobs.pop("budget")
    parts = [name, size, f"w{knobs.pop('window_size')}", f"k{knobs.pop('kernel_size')}",
             knobs.pop("pooling"), _SHORT.get(knobs.get("granularity"), str(knobs.get("granularity")))]
    knobs.pop("granularity", None)
    for key, value in sorted(knobs.items()):
        if value is not None and key not in NOT_IN_NAME:
            parts.append(f"{key}{value}".replace("_", ""))
    return "_".join(str(p) for p in parts)


def find_runs(roots, marker: str = PREDICTIONS, also: str | None = None) -> list[Path]:
    """Run folders at or below ``roots``, each once: folders holding ``marker`` (and ``also``)."""
    found = set()
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"results folder {str(root)!r} does not exist")
        for path in root.rglob(marker):
            folder = path.parent.resolve()
            if also is None or (folder / also).is_file():
                found.add(folder)
            else:
                log.warning("skipped %s: %s without %s", folder, marker, also)
    return sorted(found)


def predictions_file(folder: Path, group: str | None = None) -> Path:
    """``predictions.jsonl``, or ``<group>.jsonl`` for tasks that split a run by dataset (LongBench)."""
    return Path(folder) / (f"{group}.jsonl" if group else PREDICTIONS)


def valid_row(row) -> bool:
    """A finished sample's row: a JSON object with an ``id`` and a numeric ``score``."""
    return (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("score"), (int, float))
            and not isinstance(row.get("score"), bool))


def jsonl_lines(data: bytes) -> list[bytes]:
    """The lines of a JSONL file: split on ``\\n`` only (``str.splitlines`` would also split inside a
    row at U+2028, U+2029 or U+0085, which ``json.dumps(ensure_ascii=False)`` writes unescaped)."""
    return [line for line in data.split(b"\n") if line.strip()]


def parse_rows(path: Path) -> tuple[list[dict], list[bytes]]:
    """The valid rows of one predictions file and its invalid lines, as bytes (corrupt JSON or UTF-8,
    a line cut short by an interruption, a row without ``id`` or ``score``)."""
    rows, bad = [], []
    for line in jsonl_lines(Path(path).read_bytes()):
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            bad.append(line)
            continue
        if valid_row(row):
            rows.append(row)
        else:
            bad.append(line)
    return rows, bad


def read_predictions(folder: Path) -> list[dict]:
    """The finished samples of a run (every ``*.jsonl`` of its folder). Invalid lines are not rows;
    ``quarantine`` moves them aside (and their samples run again)."""
    rows = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        rows += parse_rows(path)[0]
    return rows


def file_group(path: Path) -> str | None:
    """The sample group a predictions or part file holds (``qasper.jsonl.rank1.part`` -> ``qasper``;
    ``predictions.jsonl`` -> None)."""
    name = Path(path).name.split(".rank")[0]
    return None if name == PREDICTIONS else name.removesuffix(".jsonl")


def cache_root() -> Path:
    """The harness's cache directory (``$KV_HARNESS_CACHE``, else ``~/.cache/kv-harness``): GGUF dense
    copies, memoised sha256s, LongBench downloads."""
    return Path(os.environ.get("KV_HARNESS_CACHE", Path.home() / ".cache" / "kv-harness"))


def part_files(folder: Path) -> list[Path]:
    """A data-parallel run's per-rank files (``<file>.rank<r>.part``) not yet merged (``distributed.merge``)."""
    return sorted(Path(folder).glob("*.part"))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def finished(folder: Path) -> dict[tuple[str | None, str], dict]:
    """Every finished row of a run folder (its ``*.jsonl`` files and any part files of a data-parallel
    run), keyed by (group, sample id): ids are unique within a group only (LongBench's ``samsum`` and
    ``samsum_e`` share ids)."""
    rows = {}
    for path in sorted(Path(folder).glob("*.jsonl")) + part_files(folder):
        for row in parse_rows(path)[0]:
            rows.setdefault((file_group(path), row["id"]), row)
    return rows


def quarantine(path: Path) -> int:
    """Move the invalid lines of a predictions file to ``<file>.bad`` (appended) and rewrite the file
    with the valid rows only (written aside, then renamed). Returns how many lines moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    rows, bad = parse_rows(path)
    if not bad and (not data or data.endswith(b"\n")):
        return 0
    if bad:
        with Path(str(path) + ".bad").open("ab") as f:
            f.write(b"".join(line + b"\n" for line in bad))
            f.flush()
            os.fsync(f.fileno())
    tmp = Path(str(path) + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    if bad:
        log.warning("%s: %d invalid line(s) moved to %s.bad; their samples run again", path, len(bad), path.name)
    return len(bad)


def in_sample_order(folder: Path, order: dict[tuple, int]) -> int:
    """Put the rows of each predictions file of ``folder`` in the task's sample order (``order``: (group, id) ->
    position), where they are not: ``decode=continuous`` appends rows as they finish. Only the lines of samples
    in ``order`` move, among the places they hold (other lines, e.g. rows of an earlier, larger grid, stay
    where they are); the lines themselves are kept byte for byte, the file rewritten aside and renamed over
    it. Returns how many files were rewritten."""
    rewritten = 0
    for path in sorted(Path(folder).glob("*.jsonl")):
        group = file_group(path)
        lines = jsonl_lines(path.read_bytes())
        keys = []
        for line in lines:
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            keys.append(order.get((group, row["id"])) if valid_row(row) else None)
        places = [k for k, key in enumerate(keys) if key is not None]
        ranked = sorted(places, key=lambda k: keys[k])
        if ranked == places:
            continue
        out = list(lines)
        for place, source in zip(places, ranked):
            out[place] = lines[source]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(b"".join(line + b"\n" for line in out))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        rewritten += 1
    return rewritten


class PredictionWriter:
    def __init__(self, folder: Path, group: str | None = None, suffix: str = ""):
        self.path = Path(str(predictions_file(folder, group)) + suffix)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        quarantine(self.path)   # a line cut by a kill, or corrupted: moved aside, so appends stay valid JSONL

    def append(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data, indent: int = 2) -> None:
    """Write JSON atomically: a temporary file in the same folder, flushed, then renamed over ``path``."""
    path = Path(path)
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class ResultFileError(ValueError):
    """A results file that cannot be read; the message names the file and what is wrong."""


def read_json(path: Path):
    """Parse a JSON file; a ``ResultFileError`` naming the file, line and column if it is not valid."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ResultFileError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                              "re-run the step that writes it, or delete it") from None
    except UnicodeDecodeError as error:
        raise ResultFileError(f"{path}: not UTF-8 text ({error.reason}); re-run the step that writes it") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the module docstring's layout and shows every option's default."""


def configure_logging(level: int = logging.INFO) -> None:
    """Once per command (a no-op where logging is configured, e.g. by Hydra for ``kvh run``): records
    of ``level`` and above to stderr as ``LEVEL name: message``; primary output (tables, JSON, written
    paths) is printed to stdout by the commands themselves."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_cli(main) -> None:
    """Run a command-line ``main`` with logging configured (``configure_logging``): a user error (a
    message given to ``SystemExit``, an unreadable results file, a missing folder, a ``ConfigError``) prints one
    ``error:`` line and exits with code 2."""
    configure_logging()
    try:
        main()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            text = exit_.code
            print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr)
            sys.exit(2)
        raise
    except (ResultFileError, FileNotFoundError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def package_version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Git commit, package versions and hardware, for the manifest."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "packages": {p: package_version(p) for p in ("torch", "transformers", "hydra-core", "numpy")},
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "gpu": gpu}
