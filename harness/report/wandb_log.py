"""Weights & Biases logging of one finished run, never in the way of the run itself.

    from harness.report.wandb_log import log_run
    log_run(folder, config, scores, table_rows, predictions)   # -> the wandb run directory, or None

Logs the config, the per-dataset scores (as summary values ``score/<dataset>`` and as a table), the
summary table (e.g. ``harness.report.table.row_dicts``) and a predictions table (id, dataset, pred,
answers, score where present). The wandb files go below the run folder (``<folder>/wandb/``).
Without ``WANDB_API_KEY`` the run is logged offline (``wandb sync <dir>`` uploads it later), so
logging needs no network and never waits for one; ``WANDB_MODE`` (online, offline, disabled),
where set, decides instead. Any wandb error becomes a warning: logging never fails a run.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

PROJECT = "kv-harness"
_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
PREDICTION_COLUMNS = ("id", "dataset", "pred", "answers", "score")


def wandb_mode() -> str:
    """``WANDB_MODE`` where set (dryrun = offline, run = online), else online with ``WANDB_API_KEY``
    and offline without."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return _MODES.get(mode, "offline")
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


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


def _logged(folder: Path, name: str, log, enabled: bool, project: str, **init) -> str | None:
    """Open a wandb run under ``folder``, call ``log(wandb, run)``, finish; returns the run directory,
    or None when disabled or when wandb failed (a warning says why: logging never fails a run)."""
    if not enabled or wandb_mode() == "disabled":
        return None
    folder = Path(folder)
    run = None
    try:
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, dir=str(folder), name=name, mode=wandb_mode(), reinit="finish_previous",
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True), **init)
        log(wandb, run)
        run_dir = str(Path(run.settings.sync_dir)) if run.settings.sync_dir else str(Path(run.dir).parent)
        run.finish()
        return run_dir
    except Exception as err:  # noqa: BLE001 - logging must never fail a run
        warnings.warn(f"wandb logging of {folder} failed ({type(err).__name__}: {err}); the run's results are "
                      "unaffected", RuntimeWarning, stacklevel=3)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        return None


def log_run(folder: Path, config: dict, scores: dict, table_rows: list[dict] | None = None,
            predictions: list[dict] | None = None, enabled: bool = True, project: str = PROJECT) -> str | None:
    """Log one run to wandb; returns the wandb run directory (``<folder>/wandb/<offline-|>run-...``),
    or None when disabled (``enabled=False`` or ``WANDB_MODE=disabled``) or when wandb failed
    (a warning says why)."""
    def log(wandb, run):
        flat = _flat_scores(scores)
        run.summary.update(flat)
        logged = {"scores": _table(wandb, [{"dataset": k[len("score/"):], "score": v} for k, v in flat.items()],
                                   ("dataset", "score"))}
        if table_rows:
            logged["summary_table"] = _table(wandb, table_rows)
        if predictions:
            columns = [c for c in PREDICTION_COLUMNS if c != "score" or any("score" in p for p in predictions)]
            logged["predictions"] = _table(wandb, predictions, columns)
        run.log(logged)
    return _logged(folder, "/".join(Path(folder).parts[-3:]), log, enabled, project, config=config)


def log_images(folder: Path, images: dict[str, Path], name: str, enabled: bool = True,
               project: str = PROJECT) -> str | None:
    """Log figures (e.g. needle heatmaps: ``{"panel": path}``) as one W&B run under ``folder``;
    same offline and never-fail rules as ``log_run``."""
    def log(wandb, run):
        run.log({key: wandb.Image(str(path)) for key, path in images.items()})
    return _logged(folder, name, log, enabled, project, job_type="figures")
