"""One W&B run per results folder, resumed whenever the folder is logged again; never in the way of a run.

    from harness.report.wandb_runs import log_images, log_heatmaps
    log_images(folder, {"heatmap": png})                 # into the folder's W&B run -> its wandb run directory
    log_heatmaps({folder: png, ...}, panel_png, out, title)   # kvh heatmap --wandb

The run's id is kept in ``<folder>/wandb_run.json`` (with its project, group, job type, name, tags,
wandb directory and next step): a later logging of the same folder (a resumed or extended run,
``kvh heatmap --wandb``) resumes that W&B run (``resume="allow"``, ``id=``) instead of starting
another. The runs of one job or multirun share a group (``default_group``). What a finished run logs
(config, scores, artifact, its figures) is ``harness.report.wandb_log``; this module is the part
``harness.report.heatmap`` uses too, so it imports no drawing code.

All wandb files go to one directory: ``WANDB_DIR`` where set, else the ``wandb_dir`` setting
(``<results_dir>/wandb``), in which wandb writes its ``wandb/offline-run-*`` folders. Without
``WANDB_API_KEY`` runs are logged offline (``wandb sync <dir>`` uploads them later), so logging needs
no network and never waits for one; ``WANDB_MODE`` (online, offline, disabled), where set, decides
instead. Any wandb error is one logged warning: logging never fails a run.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from collections import Counter
from pathlib import Path

from harness.run import results

log = logging.getLogger(__name__)

PROJECT = "kv-harness"
_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
#: the file in a results folder that names its W&B run
RUN_FILE = "wandb_run.json"
#: what ``RUN_FILE`` keeps of ``wandb.init``'s arguments, so that a resumed run keeps them too
KEPT = ("project", "group", "job_type", "name", "tags")


def wandb_mode() -> str:
    """``WANDB_MODE`` where set (dryrun = offline, run = online), else online with ``WANDB_API_KEY``
    and offline without."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return _MODES.get(mode, "offline")
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


@functools.cache
def _process_group() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def default_group() -> str:
    """The W&B group of this job's runs (``wandb_group=null``): the name of the Hydra job's run folder
    (``hydra.run.dir``), or of its sweep folder in a multirun (``hydra.sweep.dir``, the same for every
    job of the sweep); outside a Hydra app a timestamp taken once per process."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        if HydraConfig.initialized():
            hydra = HydraConfig.get()
            folder = hydra.sweep.dir if hydra.mode == RunMode.MULTIRUN else hydra.run.dir
            if folder:
                return Path(str(folder)).name
    except Exception:  # noqa: BLE001 - a Hydra without these fields: fall back to the timestamp
        pass
    return _process_group()


def run_name(folder: Path) -> str:
    """``<model>/<method folder>`` of ``<results_dir>/<task>/<model>/<protocol>/<method folder>``."""
    return "/".join(Path(folder).parts[-3::2])


def stored_run(folder: Path) -> dict:
    """``<folder>/wandb_run.json`` (``{"id", "project", "group", "job_type", "name", "tags", "dir",
    "step"}``), or {} where there is none or it cannot be read."""
    try:
        stored = json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) and isinstance(stored.get("id"), str) else {}


def wandb_directory(setting=None, stored: dict | None = None) -> Path | None:
    """Where wandb writes (it adds ``wandb/``): ``WANDB_DIR`` where set, else ``setting`` (the
    ``wandb_dir`` setting), else the directory the folder's run was last logged to; None: wandb's
    default (the working directory)."""
    where = os.environ.get("WANDB_DIR") or setting or (stored or {}).get("dir")
    return Path(str(where)).expanduser().absolute() if where else None


def log_folder_run(folder: Path, log_into, enabled: bool = True, wandb_dir=None, config: dict | None = None,
                   fingerprint: str | None = None, **init) -> str | None:
    """Open the W&B run of ``folder`` (resuming the one its ``RUN_FILE`` names, else a new one whose id
    is stored there), call ``log_into(wandb, run)`` -> ``{key: value}`` and log that as one step,
    finish; returns the run directory, or None when disabled or when wandb failed (one logged warning
    says why: logging never fails a run). ``init``: wandb.init's project, group, job_type, name, tags
    (None keeps the stored value; the group defaults to ``default_group()``); ``config`` is logged
    with the group as ``wandb_group``. ``fingerprint`` (what was logged, e.g. ``wandb_log.fingerprint``)
    is stored in ``RUN_FILE`` as ``logged`` once the logging has succeeded."""
    if not enabled or wandb_mode() == "disabled":
        return None
    folder = Path(folder)
    run = None
    try:
        import wandb

        stored = stored_run(folder)
        init = {key: init.get(key) if init.get(key) is not None else stored.get(key) for key in KEPT}
        init["project"] = init["project"] or PROJECT
        init["group"] = init["group"] or default_group()
        init["tags"] = list(dict.fromkeys(str(tag)[:64] for tag in init["tags"] or []))   # W&B: 64 characters
        directory = wandb_directory(wandb_dir, stored)
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(id=stored.get("id"), resume="allow", dir=str(directory) if directory else None,
                         mode=wandb_mode(), reinit="finish_previous",
                         config=None if config is None else {**config, "wandb_group": init["group"]},
                         settings=wandb.Settings(silent=True, console="off", x_disable_stats=True), **init)
        # an offline run starts at step 0 again: continue after the steps the stored run has
        step = max(int(stored.get("step", 0)), int(run.step or 0))
        # named before anything is logged: an interrupted logging still resumes this run next time
        record = {"id": run.id, **init, "dir": str(directory) if directory else None, "step": step + 1,
                  "logged": stored.get("logged")}
        results.write_json(folder / RUN_FILE, record)
        logged = log_into(wandb, run)
        if logged:
            run.log(logged, step=step)
        run_dir = str(Path(run.settings.sync_dir)) if run.settings.sync_dir else str(Path(run.dir).parent)
        run.finish()
        if fingerprint is not None:
            results.write_json(folder / RUN_FILE, {**record, "logged": fingerprint})
        return run_dir
    except Exception as err:  # noqa: BLE001 - logging must never fail a run
        log.warning("wandb logging of %s failed (%s: %s); the run's results are unaffected", folder,
                    type(err).__name__, err)
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        return None


def log_images(folder: Path, images: dict[str, Path], name: str | None = None, enabled: bool = True,
               project: str | None = None, *, group: str | None = None, job_type: str | None = "figures",
               wandb_dir=None) -> str | None:
    """Log figures (``{key: png}``) into the W&B run of ``folder`` (resumed where its ``RUN_FILE``
    names one, else a new run of ``group`` whose id is stored there); same offline and never-fail
    rules as ``log_folder_run``."""
    def log_into(wandb, run):
        return {key: wandb.Image(str(path)) for key, path in images.items()}
    return log_folder_run(folder, log_into, enabled, wandb_dir, project=project, group=group, job_type=job_type,
                          name=name)


def log_heatmaps(heatmaps: dict[Path, Path], panel: Path | None, out: Path, title: str,
                 key: str = "heatmap") -> list[str]:
    """``kvh heatmap --wandb``: each run folder's heatmap (``{folder: png}``) into that folder's W&B run
    (resumed by its stored id; a folder never logged gets a run of its own), and ``panel`` into the
    figures run of ``out`` (job type ``figures``, named ``heatmaps/<title>``) in the group the runs
    share (the most common one). Returns the wandb run directories written."""
    stored = [stored_run(folder) for folder in heatmaps]

    def results_root(folder: Path, entry: dict):   # <results_dir>/<task>/<model>/<protocol>/<method>
        folder = Path(folder).resolve()
        return entry.get("dir") or (folder.parents[3] if len(folder.parents) > 3 else folder)

    written = [log_images(folder, {key: png}, name=run_name(folder), job_type=None,
                          wandb_dir=results_root(folder, entry))
               for (folder, png), entry in zip(heatmaps.items(), stored) if Path(png).is_file()]

    def common(field):
        values = Counter(s[field] for s in stored if s.get(field))
        return values.most_common(1)[0][0] if values else None

    if panel is not None and Path(panel).is_file():
        written.append(log_images(out, {"panel": panel}, name=f"heatmaps/{title}", project=common("project"),
                                  group=common("group"),
                                  wandb_dir=common("dir") or (results_root(next(iter(heatmaps)), {}) if heatmaps
                                                              else None)))
    return [run_dir for run_dir in written if run_dir]
