"""``kvh merge SOURCES... --into DEST``: runs of one configuration made in pieces (one process per
context length on one GPU, or on several machines) merged into one results tree, as if one run had
made them all.

A run folder is identified by its path below its results root (``<task>/<model>/<protocol>/<method>``).
Pieces of the same path are merged when their stored run identities are equal (``identity.differences``:
only grid settings such as ``task.context_lengths`` may differ, as for a resumed run); the rows are
copied (a sample held by two pieces must be the same sample: equal ``sample_sha256``), the manifest is
the first piece's with the union of the grid lists, of the generation records (``generated``) and of
every piece's sessions, kept positions (``kept/``) are copied, and ``scores.json`` is recomputed with the
task's own final scorer. ``--allow-difference KEY`` lets a named identity key differ (one that changes no
number of the task, e.g. ``model.max_input_tokens`` for RULER), recorded in the manifest as
``merge_allowed_differences``. Anything else is refused (``ConfigError``), and nothing is written into an
existing non-empty destination folder.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from harness.run import identity, results
from methods import ConfigError

GRID_LISTS = ("context_lengths", "depths", "datasets", "tasks")


def pieces(roots: list[str]) -> dict[Path, list[Path]]:
    """Relative run path -> the folders holding it, one per root, in the order given."""
    found: dict[Path, list[Path]] = {}
    for root in roots:
        for folder in results.find_runs([root], marker=results.MANIFEST):
            found.setdefault(folder.relative_to(Path(root).resolve()), []).append(folder)
    return found


def merge_run(folders: list[Path], dest: Path, allowed: tuple[str, ...] = ()) -> dict:
    """Merge the pieces ``folders`` of one run into ``dest``; returns its summary (``runner.summarize``).
    ``allowed``: identity keys (``model.max_input_tokens``) that may differ between pieces because they
    change no number of this task; the merged manifest lists their values (``merge_allowed_differences``).
    Raises ``ConfigError`` for pieces of other different settings, a sample that differs between pieces,
    or a non-empty ``dest``."""
    from harness.run.runner import summarize
    from harness.tasks import get_task
    if dest.exists() and any(dest.iterdir()):
        raise ConfigError(f"{dest} is not empty; fix: merge into a new folder")
    manifests = [results.read_json(f / results.MANIFEST) for f in folders]
    first = manifests[0]
    tolerated: dict[str, list] = {}
    for folder, manifest in zip(folders[1:], manifests[1:]):
        diff = identity.differences(first["identity"], manifest["identity"])
        for key, a, b in [d for d in diff if d[0] in allowed]:
            tolerated.setdefault(key, [a])
            tolerated[key] += [b] if b not in tolerated[key] else []
        diff = [d for d in diff if d[0] not in allowed]
        if diff:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:5])
            raise ConfigError(f"{folder} was made with other settings than {folders[0]} ({shown}); fix: merge runs of "
                              "one configuration only")
    rows: dict[tuple, dict] = {}
    for folder in folders:
        for key, row in results.finished(folder).items():
            if key in rows and rows[key].get("sample_sha256") != row.get("sample_sha256"):
                raise ConfigError(f"sample {key[1]!r} is in {folder} and in another piece with other content; fix: "
                                  "merge pieces of the same samples only")
            rows.setdefault(key, row)
    dest.mkdir(parents=True, exist_ok=True)
    writers: dict = {}
    for (group, _), row in rows.items():
        if group not in writers:
            writers[group] = results.PredictionWriter(dest, group)
        writers[group].append(row)
    merged = dict(first, sessions=[s for m in manifests for s in m.get("sessions", [])],
                  merged_from=[str(f) for f in folders], samples=len(rows))
    if tolerated:
        merged["merge_allowed_differences"] = tolerated
    generated = {k: v for m in manifests for k, v in (m.get("generated") or {}).items()}
    if generated:
        merged["generated"] = generated
    task_cfg = merged["config"]["task"]
    for key in GRID_LISTS:
        if isinstance(task_cfg.get(key), list):
            values = [v for m in manifests for v in (m["config"]["task"].get(key) or [])]
            task_cfg[key] = sorted(set(values), key=values.index)
    for folder in folders:             # kept positions (save_kept_positions=true), one file per sample
        for path in sorted((folder / "kept").glob("*.pt")):
            (dest / "kept").mkdir(exist_ok=True)
            shutil.copy2(path, dest / "kept" / path.name)
    results.write_json(dest / results.MANIFEST, merged)
    task = get_task(task_cfg["name"])
    return summarize(dest, first["method"]["name"], task.finalize)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvh merge", description=__doc__, formatter_class=results.HelpFormatter)
    parser.add_argument("sources", nargs="+", help="results roots holding the pieces (each <task>/<model>/...)")
    parser.add_argument("--into", required=True, help="the new results root to write the merged runs to")
    parser.add_argument("--allow-difference", action="append", default=[], metavar="KEY",
                        help="an identity key that may differ between pieces because it changes no number of the "
                             "task (e.g. model.max_input_tokens for RULER, which never truncates); recorded")
    args = parser.parse_args(argv)
    found = pieces(args.sources)
    if not found:
        raise ConfigError(f"no run folders under {args.sources}; fix: the results roots the pieces were written to")
    for relative, folders in sorted(found.items()):
        summary = merge_run(folders, Path(args.into) / relative, tuple(args.allow_difference))
        print(f"{relative}: {len(folders)} piece(s), {summary['samples']} samples -> {Path(args.into) / relative}")
