"""What several reporters share: method display names, the Markdown table and figure files."""

from __future__ import annotations

from pathlib import Path

# Registry name -> display name, in the papers' row order (the LongBench table sorts methods by it).
METHOD_NAMES = {"fullkv": "FullKV", "streamingllm": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV",
                "pyramidkv": "PyramidKV", "dynamickv": "DynamicKV"}


def method_label(name: str) -> str:
    """The display name of a registry method name ("snapkv" -> "SnapKV"); an unknown name as given."""
    return METHOD_NAMES.get(name, name)


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
