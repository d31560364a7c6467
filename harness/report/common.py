"""What several reporters share: method display names and order, run labels, score names, the
Markdown table and figure files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.run import results

# Registry name -> display name, in the papers' row order (PyramidKV Table 1, DynamicKV Table 1):
# tables, panels and legends list methods in this order, FullKV first, any other method after them.
METHOD_NAMES = {"fullkv": "FullKV", "streamingllm": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV",
                "pyramidkv": "PyramidKV", "dynamickv": "DynamicKV"}
# K/V transforms (methods.lowrank; their knob: methods.base.TRANSFORM_KNOBS): display names
TRANSFORM_NAMES = {"pca_uniform": "PCA-uniform", "svd_weights": "SVD-weights (Palu)", "energy": "Energy (ours)",
                   "dynakv": "DynaKV"}


def transform_label(knobs: dict) -> str:
    """"DynaKV (tau 0.1)", "PCA-uniform (rate 0.5)" for a method record with a ``transform``."""
    from methods.base import TRANSFORM_KNOBS
    name = knobs["transform"]
    knob = TRANSFORM_KNOBS.get(name)
    value = knobs.get(knob) if knob else None
    label = TRANSFORM_NAMES.get(name, name)
    return label if value is None else f"{label} ({knob.removeprefix('transform_')} {value:g})"

# What a score field of a results row measures, for colorbars and titles: (task, field) for a field
# whose meaning depends on the task (every task stores its primary score as "score"), (None, field)
# for the needle task's extra fields (harness.tasks.needle.scores) and the recomputable ones
# (harness.tasks.needle_scores.RECOMPUTABLE). All are shares in [0, 1].
SCORE_NAMES = {
    ("needle", "score"): "Needle word recall",
    ("passkey", "score"): "Passkey found",
    (None, "needle_word_recall"): "Needle word recall",
    (None, "needle_word_recall_normalized"): "Needle word recall (punctuation stripped)",
    (None, "word_recall_normalized"): "Needle word recall (punctuation stripped)",
    (None, "exact_match"): "Key phrase exact match",
    (None, "rouge1_f"): "ROUGE-1 F of the needle sentence",
}


def method_label(name: str) -> str:
    """The display name of a registry method name ("snapkv" -> "SnapKV"); an unknown name as given."""
    return METHOD_NAMES.get(name, name)


def method_rank(name: str | None) -> int:
    """Position of a method in the papers' order (``METHOD_NAMES``; FullKV 0); any other method, or
    None, after all of them (``len(METHOD_NAMES)``)."""
    order = list(METHOD_NAMES)
    return order.index(name) if name in order else len(order)


def budget_label(name: str, budget) -> str:
    """"SnapKV @128" (display name @ tokens kept per head per layer); FullKV, or no budget: the name."""
    label = method_label(name)
    return label if name == "fullkv" or budget is None else f"{label} @{budget}"


def score_label(score_field: str, task: str | None = None) -> str:
    """What ``score_field`` of a ``task``'s rows measures ("score" of needle -> "Needle word recall");
    a field of no known meaning: "Score" for ``score``, else the field name."""
    return SCORE_NAMES.get((task, score_field)) or SCORE_NAMES.get((None, score_field)) or (
        "Score" if score_field == "score" else score_field)


@dataclass(frozen=True)
class RunInfo:
    """What a run folder's ``manifest.json`` says about it; ``method`` None where it cannot be read."""

    folder: Path
    method: str | None = None
    budget: int | None = None
    knobs: dict = field(default_factory=dict)     # the manifest's ``method`` record (name, budget, windows, ...)
    task: str | None = None
    model: str | None = None
    protocol: str | None = None

    @property
    def label(self) -> str | None:
        """"SnapKV @128", "FullKV", "DynaKV (tau 0.1)", "SnapKV @1024 + DynaKV (tau 0.1)"; None without a
        readable manifest."""
        if self.method is None:
            return None
        if self.knobs.get("transform"):
            base = self.method.partition("+")[0]
            transform = transform_label(self.knobs)
            return transform if "+" not in self.method else f"{budget_label(base, self.budget)} + {transform}"
        return budget_label(self.method, self.budget)

    @property
    def order(self) -> tuple:
        """Sort key: the papers' method order (FullKV first, unknown methods last), then budget
        ascending (FullKV's none first), then the folder."""
        return (method_rank(self.method), self.method or "", -1 if self.budget is None else self.budget,
                str(self.folder))


def run_info(folder) -> RunInfo:
    """The run's method (``method.name``, ``method.budget``; FullKV has no budget), task, model and
    protocol (``config.<group>.name``) from its ``manifest.json``; a missing or unreadable manifest
    gives ``method`` (and the rest) None."""
    folder = Path(folder)
    try:
        manifest = results.read_json(folder / results.MANIFEST)
        method = dict(manifest["method"])
        name = str(method["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return RunInfo(folder)
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}

    def named(group):
        value = config.get(group)
        return value.get("name") if isinstance(value, dict) else None

    budget = method.get("budget")
    if method.get("transform"):   # a K/V transform alone (on FullKV) or stacked on an eviction method
        name = method["transform"] if name == "fullkv" else f"{name}+{method['transform']}"
    return RunInfo(folder, name, None if name in ("fullkv", method.get("transform")) or budget is None
                   else int(budget), method, named("task"), named("model"), named("protocol"))


def _left_out(name) -> dict:
    """The knobs a method's records leave out at their default (``KVCompressor.left_out_at_default``)."""
    from methods import REGISTRY
    cls = REGISTRY.get(name) if name else None
    return dict(cls.left_out_at_default) if cls else {}


def distinct_labels(infos: list[RunInfo], fallback=lambda folder: folder.name) -> list[str]:
    """One label per run, in the given order: ``RunInfo.label`` ("SnapKV @128"), or ``fallback(folder)``
    without a manifest. Where several runs share a label, each gets what tells it apart in brackets:
    model/protocol where those differ, the method knobs that differ ("SnapKV @128 (window_size=8)"),
    and the folder name where that is still not enough."""
    labels = [info.label or fallback(info.folder) for info in infos]
    for label in set(labels):
        group = [i for i, other in enumerate(labels) if other == label]
        if len(group) < 2:
            continue
        knobs = [{**_left_out(infos[i].knobs.get("name")), **infos[i].knobs} for i in group]
        keys = sorted({k for d in knobs for k in d if k not in ("name", "budget")
                       and len({repr(other.get(k)) for other in knobs}) > 1})
        places = [f"{infos[i].model}/{infos[i].protocol}" for i in group]
        parts = [([place] if len(set(places)) > 1 else []) + [f"{k}={knob.get(k)}" for k in keys]
                 for knob, place in zip(knobs, places)]
        for i, part in zip(group, parts):
            if not part or sum(other == part for other in parts) > 1:
                part = [*part, infos[i].folder.name]
            labels[i] = f"{label} ({', '.join(part)})"
    return labels


def markdown(header, rows) -> str:
    """A GitHub Markdown table: the header, a rule, then one line per row (cells through ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_figure(fig, path_stem, dpi: int = 150) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf`` (parent folders made, white background); closes the figure
    and returns the two paths."""
    import matplotlib.pyplot as plt  # the caller has drawn with it (and chosen the backend) already

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    for p in paths:
        fig.savefig(p, dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return paths
