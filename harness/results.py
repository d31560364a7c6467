"""Results folders: one per run, named after the config; predictions appended one JSON line per
sample and flushed, so an interrupted run loses nothing finished and resumes where it stopped."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PREDICTIONS = "predictions.jsonl"
MANIFEST = "manifest.json"
SCORES = "scores.json"

_SHORT = {"query_head": "qh", "kv_head": "kvh"}
# knobs that change speed or memory, not which tokens are kept: recorded in the manifest, not the name
_NOT_IN_NAME = {"query_chunk"}


def run_name(method: dict) -> str:
    """``snapkv_b256_w32_k7_maxpool_qh`` plus any method-specific knob (``sink4``...)."""
    knobs = dict(method)
    name = knobs.pop("name")
    if name == "fullkv":
        return "fullkv"
    parts = [name, f"b{knobs.pop('budget')}", f"w{knobs.pop('window_size')}", f"k{knobs.pop('kernel_size')}",
             knobs.pop("pooling"), _SHORT.get(knobs.get("granularity"), str(knobs.get("granularity")))]
    knobs.pop("granularity", None)
    for key, value in sorted(knobs.items()):
        if value is not None and key not in _NOT_IN_NAME:
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
                print(f"skipped {folder}: {marker} without {also}", file=sys.stderr)
    return sorted(found)


def predictions_file(folder: Path, group: str | None = None) -> Path:
    """``predictions.jsonl``, or ``<group>.jsonl`` for tasks that split a run by dataset (LongBench)."""
    return Path(folder) / (f"{group}.jsonl" if group else PREDICTIONS)


def read_predictions(folder: Path) -> list[dict]:
    """The finished samples of a run (every ``*.jsonl`` of its folder). A line cut short by an
    interruption is ignored (and rewritten when the sample runs again)."""
    rows = []
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class PredictionWriter:
    def __init__(self, folder: Path, group: str | None = None, suffix: str = ""):
        self.path = Path(str(predictions_file(folder, group)) + suffix)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()

    def _repair_tail(self) -> None:
        """Drop a trailing partial line left by a kill mid-write, so appends stay valid JSONL."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            self.path.write_bytes(data[: data.rfind(b"\n") + 1])

    def append(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, data) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    tmp.replace(path)


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
