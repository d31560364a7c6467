"""``kvh dynakv table ROOTS``: DynaKV and its baselines in one table per model, like the paper's Tables 1/2/4/5
(reference-dynakv.md section 7): each method at its realised retain rate, with perplexity per text
(``task=perplexity``, by ``task.label``), needle (mean over the grid) and each LongBench dataset's official
score.

Rates are measured, never the knob: ``rate`` is the mean ``kv_retain_rate`` of the method's perplexity rows on
the text labelled ``--rate-text`` (else another text, else any task); ``stored`` (where an eviction method is
stacked) the share of FullKV's cache bytes the latent store holds after eviction and transform, weighted by
bytes over the rows of ``--stored-task`` (the paper's "~5.9 %" of SnapKV-1024 + DynaKV-47). A DynaKV row
names its checkpoint and, where the checkpoint's manifest is found (beside the file, or in ``--checkpoints``),
its ``alpha``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.report.common import distinct_labels, markdown, method_rank, run_info
from harness.run import results


def _alpha(knobs: dict, checkpoints: Path | None, manifest: dict, model: str | None):
    """The alpha in the manifest of the checkpoint the run used: the file at the recorded path (``auto``: the
    one shipped for the model) or of that name in ``checkpoints``, and only if its sha256 is the one the run's
    identity recorded (a file retrained since is not that run's checkpoint)."""
    from harness.dynakv.checkpoint import shipped
    path = knobs.get("transform_checkpoint")
    if not path:
        return None
    recorded = manifest.get("identity", {}).get("method", {}).get("transform_checkpoint_sha256")
    file = shipped(str(model)) if path == "auto" else Path(str(path))
    for candidate in (file, (checkpoints / file.name) if checkpoints else None):
        if candidate is not None and candidate.is_file() and results.file_sha256(candidate) == recorded:
            record = candidate.with_suffix(".json")
            return json.loads(record.read_text()).get("training", {}).get("alpha") if record.is_file() else None
    return None


def collect(roots, checkpoints: Path | None = None, rate_text: str = "wikitext2", stored_task: str = "needle") -> dict:
    """model -> {row key: {"label", "rank", cells...}} from every run folder with scores under ``roots``."""
    table: dict = {}
    folders = results.find_runs(roots, results.SCORES)
    infos = [run_info(f) for f in folders]
    keyed = {}
    for info in infos:
        if info.method is None:
            continue
        knobs = {k: v for k, v in info.knobs.items() if k not in ("name",)}
        key = json.dumps({k: knobs.get(k) for k in sorted(knobs) if k.startswith("transform")
                          or (k in ("budget", "granularity") and info.budget is not None)}
                         | {"method": info.method}, sort_keys=True, default=str)
        keyed.setdefault((info.model, key), []).append(info)
    for (model, key), group in keyed.items():
        info = group[0]
        label = distinct_labels([info])[0]
        alpha = _alpha(info.knobs, checkpoints, results.read_json(info.folder / results.MANIFEST), info.model)
        if alpha is not None:
            label = f"{label}, alpha {alpha:g}"
        if info.knobs.get("transform_checkpoint") and info.knobs.get("transform") == "dynakv":
            label += f" [{Path(str(info.knobs['transform_checkpoint'])).stem}]"
        row = {"label": label, "rank": (method_rank(info.method.partition("+")[0]), info.method, info.budget or 0,
                                        str(info.knobs.get("transform_rate") or info.knobs.get("transform_eta") or ""),
                                        label)}
        rates = {}
        for member in sorted(group, key=lambda m: str(m.folder)):
            scores = results.read_json(member.folder / results.SCORES)
            manifest = results.read_json(member.folder / results.MANIFEST)
            if member.task == "perplexity":
                text = manifest["config"]["task"].get("label") or Path(manifest["config"]["task"]["text_path"]).name
                row[f"PPL {text}"] = scores.get("perplexity")
                if scores.get("kv_retain_rate") is not None:
                    rates[(0 if text == rate_text else 1, text)] = scores["kv_retain_rate"]
            elif member.task == "longbench":
                for dataset, value in (scores.get("datasets") or {}).items():
                    row[dataset] = value
            else:
                row[member.task] = scores.get("score")
            if scores.get("kv_retain_rate") is not None:
                rates.setdefault((2, member.task), scores["kv_retain_rate"])
            if "+" in member.method and scores.get("kv_bytes_ratio") is not None \
                    and (member.task == stored_task or "stored" not in row):
                row["stored"] = scores["kv_bytes_ratio"]      # byte-weighted over the task's rows
        row["rate"] = rates[min(rates)] if rates else (None if info.knobs.get("transform") else 1.0)
        table.setdefault(model, {})[key] = row
    return table


def render(table: dict) -> str:
    """One Markdown table per model: Method, rate (%), stored (%), then every score column seen."""
    parts = []
    for model, rows in sorted(table.items(), key=lambda item: str(item[0])):
        columns = sorted({c for row in rows.values() for c in row} - {"label", "rank", "rate", "stored"},
                         key=lambda c: (not c.startswith("PPL"), c))
        header = ["Method", "rate %", "stored %", *columns]
        lines = []
        for row in sorted(rows.values(), key=lambda r: r["rank"]):
            cells = [row["label"], _pct(row.get("rate")), _pct(row.get("stored"))]
            cells += [_num(row.get(c)) for c in columns]
            lines.append(cells)
        parts.append(f"### {model}\n\n" + markdown(header, lines))
    return "\n\n".join(parts) + "\n"


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _num(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvh dynakv table", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("roots", nargs="+", help="results folders (searched recursively)")
    parser.add_argument("--checkpoints", default=None, help="where the DynaKV checkpoints' manifests are")
    parser.add_argument("--out", default=None, help="write the Markdown here (else print it)")
    parser.add_argument("--rate-text", default="wikitext2", help="the perplexity text (task.label) rates come from")
    parser.add_argument("--stored-task", default="needle", help="the task whose rows give the stored share")
    args = parser.parse_args(argv)
    text = render(collect(args.roots, Path(args.checkpoints) if args.checkpoints else None, args.rate_text,
                          args.stored_task))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text, end="")
