"""Weights & Biases logging of one finished results folder, never in the way of the run itself.

    from harness.report.wandb_log import log_run
    log_run(folder, config, scores, table_rows, predictions, group="2026-05-09_07-35-25",
            job_type="needle", tags=["smollm2_135m", "snapkv", "budget:128"])   # -> the wandb run directory

The folder's one W&B run (``harness.report.wandb_runs``: created once, its id kept in
``<folder>/wandb_run.json``, resumed by every later logging; grouped per job; offline without an API
key; files in ``wandb_dir``; any wandb error one logged warning) gets the config, the per-dataset
scores (summary values ``score/<dataset>`` and a table), the summary table, a predictions table (id,
dataset, pred, answers, score where present), the folder's result files as one versioned artifact of
type ``results`` (``*.jsonl`` predictions, ``result.json``, ``scores.json``, ``manifest.json``;
``artifact_name``) and the run's own figures: where its rows form a context-length x depth grid
(needle, passkey), the heatmap drawn into ``<folder>/figures/heatmap.png``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from harness.report.wandb_runs import default_group, log_folder_run, run_name, stored_run  # noqa: F401 (default_group: the runner's)
from harness.run import results

PREDICTION_COLUMNS = ("id", "dataset", "pred", "answers", "score")
#: the folder's files logged as its ``results`` artifact, besides the ``*.jsonl`` predictions
RESULT_FILES = ("result.json", results.SCORES, results.MANIFEST)
ARTIFACT_TYPE = "results"


def artifact_name(folder: Path) -> str:
    """``<task>-<model>-<protocol>-<method folder>`` from the folder's last four path parts, with every
    character W&B refuses in an artifact name (anything but letters, digits, ``-``, ``_``, ``.``) as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(Path(folder).parts[-4:]))[:128]


def result_files(folder: Path) -> list[Path]:
    """The folder's files that make its ``results`` artifact: the predictions (``*.jsonl``: LongBench's
    ``<dataset>.jsonl``), then ``result.json``, ``scores.json``, ``manifest.json`` where present."""
    folder = Path(folder)
    return sorted(folder.glob("*.jsonl")) + [folder / name for name in RESULT_FILES if (folder / name).is_file()]


def fingerprint(folder: Path) -> str:
    """What a logging of ``folder`` gives W&B, as a sha256 over its ``scores.json`` and ``result.json``
    (the scores; the manifest gains a session on every run and is left out)."""
    digest = hashlib.sha256()
    for name in (results.SCORES, "result.json"):
        path = Path(folder) / name
        digest.update(f"{name}:{results.file_sha256(path) if path.is_file() else None}\n".encode())
    return digest.hexdigest()


def up_to_date(folder: Path) -> bool:
    """Whether the folder's W&B run already has its current scores (its ``RUN_FILE`` holds the
    ``fingerprint`` of the last successful ``log_run``)."""
    logged = stored_run(folder).get("logged")
    return logged is not None and logged == fingerprint(folder)


def run_figures(folder: Path) -> dict[str, Path]:
    """The run's own figures, drawn into ``<folder>/figures/``: ``{"heatmap": <png>}`` where its rows
    form a context-length x depth grid (needle, passkey); {} for a task without one (LongBench)."""
    from harness.report import heatmap
    try:
        cells = heatmap.load_cells(folder)
    except ValueError:   # no grid rows, or no score to draw
        return {}
    stem = Path(folder) / "figures" / "heatmap"
    stem.parent.mkdir(exist_ok=True)
    heatmap.plot_heatmap(cells, heatmap.run_label(folder), stem)
    png = stem.with_suffix(".png")
    return {"heatmap": png} if png.is_file() else {}


def _cell(value):
    """Table cells: numbers, strings and None as they are; lists and dicts as JSON text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _flat_scores(scores: dict) -> dict:
    """``{"score/qasper": 30.1, "score/qasper_e/0-4k": 28.0, ...}`` (LongBench-E buckets flattened)."""
    flat = {}
    for dataset, value in scores.items():
        if isinstance(value, dict):
            flat.update({f"score/{dataset}/{bucket}": v for bucket, v in value.items()})
        else:
            flat[f"score/{dataset}"] = value
    return flat


def _table(wandb, rows: list[dict], columns=None):
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    return wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in rows],
                       allow_mixed_types=True)


def log_run(folder: Path, config: dict, scores: dict, table_rows: list[dict] | None = None,
            predictions: list[dict] | None = None, enabled: bool = True, project: str | None = None, *,
            group: str | None = None, job_type: str | None = None, tags=None, name: str | None = None,
            wandb_dir=None, figures: bool = True) -> str | None:
    """Log one results folder into its W&B run (see the module docstring): ``config`` (with
    ``wandb_group``), ``scores`` (dataset -> score), ``table_rows``, ``predictions``, the folder's
    ``results`` artifact and, with ``figures``, its heatmap. ``group`` None: the stored one, else
    ``default_group()``; ``name`` None: ``<model>/<method folder>``; ``wandb_dir`` None: ``WANDB_DIR``,
    else where the folder's run was logged before. Returns the wandb run directory
    (``<wandb_dir>/wandb/<offline-|>run-...``), or None when disabled (``enabled=False`` or
    ``WANDB_MODE=disabled``) or when wandb failed (a logged warning says why)."""
    folder = Path(folder)

    def log_into(wandb, run):
        flat = _flat_scores(scores)
        run.summary.update(flat)
        logged = {"scores": _table(wandb, [{"dataset": k[len("score/"):], "score": v} for k, v in flat.items()],
                                   ("dataset", "score"))}
        if table_rows:
            logged["summary_table"] = _table(wandb, table_rows)
        if predictions:
            columns = [c for c in PREDICTION_COLUMNS if c != "score" or any("score" in p for p in predictions)]
            logged["predictions"] = _table(wandb, predictions, columns)
        files = result_files(folder)
        if files:
            artifact = wandb.Artifact(artifact_name(folder), type=ARTIFACT_TYPE, metadata={"folder": str(folder)})
            for path in files:
                artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact)
        if figures:
            logged.update({key: wandb.Image(str(path)) for key, path in run_figures(folder).items()})
        return logged

    return log_folder_run(folder, log_into, enabled, wandb_dir, config, fingerprint(folder), project=project,
                          group=group, job_type=job_type, name=name or run_name(folder), tags=tags)
