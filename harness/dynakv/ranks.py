"""Kept ranks per token of a trained DynaKV checkpoint over a text: the paper's qualitative check (section
5.1, reference-dynakv.md section 7: BOS keeps about 75 % of its dimensions in every layer, content words
more than stopwords, lower layers more than deeper ones), as numbers and a figure.

Tokens are classed by their decoded text (stripped, lower-cased): ``stopword`` when it is in ``STOPWORDS``
(our own list of English function words), ``content`` when it is otherwise alphabetic, ``other`` else
(punctuation, digits, word pieces without letters); the first token is ``bos`` where the tokenizer adds one.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: English function words (our list: articles, pronouns, auxiliaries, prepositions, conjunctions)
STOPWORDS = frozenset("""a an the and or but nor so yet if then than as of at by for from in into on onto to with
without about above after against along among around before behind below beneath beside between beyond during
except inside near off out outside over past since through throughout till toward towards under until up upon
within i me my mine myself you your yours yourself he him his himself she her hers herself it its itself we us our
ours ourselves they them their theirs themselves this that these those who whom whose which what is am are was were
be been being have has had having do does did doing will would shall should can could may might must not no
there here when where why how all any both each few more most other some such only own same too very just""".split())


def token_class(text: str) -> str:
    """``stopword``, ``content`` or ``other`` for a token's decoded text (see the module docstring)."""
    word = text.strip().lower()
    if word in STOPWORDS:
        return "stopword"
    return "content" if word.isalpha() else "other"


@torch.no_grad()
def ranks_over_text(lm, checkpoint: Path, text: str, tokens: int, tau: float, bos: bool | None = None) -> dict:
    """Run the first ``tokens`` tokens of ``text`` with the checkpoint's DynaKV transforms (``tau``); returns
    ``tokens`` (decoded), ``classes``, ``kept`` (``[layer][token]`` the kept fraction, K and V averaged),
    ``per_layer`` (mean over tokens), and the mean kept fraction of ``bos`` (None without BOS), ``content``,
    ``stopword`` and ``other`` tokens (over layers, K and V; None where the text has no such token). ``bos``:
    put the tokenizer's BOS first (None: as the tokenizer does by default)."""
    from harness.dynakv.checkpoint import transforms_for
    from harness.engine.transform import TransformLog, transformed
    from harness.tasks.perplexity import adds_bos
    model, tokenizer = lm.model, lm.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = (adds_bos(tokenizer) if bos is None else bos) and tokenizer.bos_token_id is not None
    ids = ([tokenizer.bos_token_id] if bos else []) + ids
    ids = ids[:tokens]
    device = next(model.parameters()).device
    transforms = transforms_for({"transform": "dynakv", "transform_tau": tau}, model, checkpoint)
    log = TransformLog()
    with transformed(model, transforms, log):
        model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    layers = sorted(log.dims)
    kept = []
    for layer in layers:
        d = log.dims[layer]
        k, v = (log.calls[(layer, kind)][0].reshape(-1).float().cpu() / d for kind in ("k", "v"))
        kept.append(((k + v) / 2).tolist())
    pieces = [tokenizer.decode([i]) for i in ids]
    classes = [token_class(p) for p in pieces]
    if bos:
        classes[0] = "bos"
    per_token = torch.tensor(kept).mean(dim=0)

    def mean_of(name):
        picked = [per_token[i] for i, c in enumerate(classes) if c == name]
        return round(float(torch.stack(picked).mean()), 4) if picked else None

    return {"tokens": pieces, "classes": classes, "kept": kept, "layers": layers,
            "per_layer": [round(sum(row) / len(row), 4) for row in kept],
            "bos": mean_of("bos"), "content": mean_of("content"), "stopword": mean_of("stopword"),
            "other": mean_of("other"), "tau": tau, "checkpoint": checkpoint.name}


def plot(summary: dict, out: Path, title: str, shown: int = 48) -> Path:
    """A figure of ``summary`` (``ranks_over_text``): kept fraction per layer x token for the first ``shown``
    tokens (token text on the axis), and the mean per layer beside it. Written to ``out`` (png)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = torch.tensor(summary["kept"])[:, :shown].numpy()
    labels = [repr(t.replace("\n", "\\n"))[1:-1] or "·" for t in summary["tokens"][:shown]]
    fig, (ax, side) = plt.subplots(1, 2, figsize=(max(8, 0.28 * len(labels) + 3), 5.5),
                                   gridspec_kw={"width_ratios": [max(4, len(labels) // 4), 1]})
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="upper")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(summary["layers"])), summary["layers"], fontsize=7)
    ax.set_ylabel("layer")
    stats = ", ".join(f"{k} {summary[k]:.2f}" for k in ("bos", "content", "stopword", "other")
                      if summary[k] is not None)
    ax.set_title(f"{title}\nmean kept fraction over {len(summary['tokens'])} tokens: {stats}", fontsize=9)
    fig.colorbar(image, ax=ax, label="kept fraction of the K/V dimensions (K, V averaged)")
    side.barh(range(len(summary["per_layer"])), summary["per_layer"], color="tab:blue")
    side.set_ylim(len(summary["per_layer"]) - 0.5, -0.5)
    side.set_xlim(0, 1)
    side.set_yticks([])
    side.set_title("mean per layer", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
