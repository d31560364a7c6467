"""Needle construction: exact lengths, depth, sentence snapping, grids, and end-to-end on a tiny model."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harness.engine.models import byte_tokenizer
from harness.tasks import needle
from harness.tasks.haystack import load_haystack
from methods import ConfigError

TOK = byte_tokenizer()
HAY = TOK(load_haystack("synthetic", None, 20_000), add_special_tokens=False).input_ids
NEEDLE = TOK(needle.PRESETS["san_francisco"]["needle"], add_special_tokens=False).input_ids


@pytest.mark.parametrize("length", [1000, 1777, 4000])
@pytest.mark.parametrize("depth", [0, 11, 50, 89, 100])
def test_insertion_lands_at_depth_at_a_sentence_start_with_exact_length(length, depth):
    context = needle.insert_needle(TOK, HAY, NEEDLE, length, depth, buffer=200)
    assert len(context) == length - 200                       # exact, in tokens
    start = next(i for i in range(len(context)) if context[i:i + len(NEEDLE)] == NEEDLE)
    hay_len = len(context) - len(NEEDLE)
    if depth == 100:
        assert start == hay_len                                # appended at the end
    else:
        target = int(hay_len * depth / 100)
        assert start <= target and target - start < 25        # moved back by less than one filler sentence
        assert start == 0 or TOK.decode(context[start - 1:start]) == "."   # right after a period
    assert context[:start] == HAY[:start]                      # the haystack is intact around it
    assert context[start + len(NEEDLE):] == HAY[start:hay_len]


def test_too_short_context_fails_with_the_reason():
    with pytest.raises(ValueError, match="leaves no room for the needle"):
        needle.insert_needle(TOK, HAY, NEEDLE, 220, 50, buffer=200)


def test_grids():
    assert needle.depth_percents("linear", 10) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    sigmoid = needle.depth_percents("sigmoid", 5)
    assert sigmoid[0] == 0 and sigmoid[-1] == 100 and sigmoid[2] == 50.0 and sigmoid[1] < 25 < sigmoid[3] - 50
    cfg = OmegaConf.create({"context_lengths": None, "context_range": {"start": 1000, "stop": 8000, "step": 100}})
    lengths = needle.context_lengths(cfg)
    assert len(lengths) == 71 and lengths[0] == 1000 and lengths[-1] == 8000   # the papers' Llama-3 grid
    with pytest.raises(ValueError, match="not one of"):
        needle.depth_percents("log", 5)


def test_samples_and_scores():
    cfg = OmegaConf.create({"needle": "san_francisco", "haystack": "synthetic", "context_lengths": [600, 800],
                            "depths": [0, 50], "buffer": 200, "max_new_tokens": 30, "seed": 0})
    samples = needle.build_samples(cfg, TOK)
    assert [s.id for s in samples] == ["len600_depth0", "len600_depth50", "len800_depth0", "len800_depth50"]
    assert all(s.meta["context_tokens"] == s.meta["context_length"] - 200 for s in samples)
    assert samples[0].prompt.startswith("<|im_start|> This is a very long story book: <book> ")
    assert samples[0].prompt.endswith("Question: The best thing to do in San Francisco is: \nAnswer:")
    good = needle.scores(" Eat a sandwich and sit in Dolores Park on a sunny day.\nMore text", samples[0])
    assert good["score"] == 1.0 and good["exact_match"] == 1.0
    half = needle.scores("eat a sandwich", samples[0])
    assert half["score"] == pytest.approx(3 / 11) and half["exact_match"] == 0.0


def test_needle_run_on_tiny_model_writes_cells_and_a_heatmap(tmp_path):
    from hydra import compose, initialize_config_dir

    import harness.run.runner as runner
    from harness.report import heatmap

    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=needle", "model=tiny_llama", f"results_dir={tmp_path}", "wandb=false", "methods=[fullkv,snapkv]", "budgets=[64]",
            "task.context_lengths=[600,700]", "task.depths=[0,50,100]", "task.max_new_tokens=4"])
    summaries = runner.run(cfg)
    assert [s["samples"] for s in summaries] == [6, 6]
    row = json.loads((Path(summaries[1]["folder"]) / "predictions.jsonl").read_text().splitlines()[0])
    assert {"score", "rouge1_f", "exact_match", "word_recall_normalized", "context_length", "depth"} <= set(row)
    cells = heatmap.load_cells(Path(summaries[1]["folder"]))
    assert len(cells) == 6
    out = tmp_path / "fig"
    heatmap.main([str(tmp_path / "needle"), "--out", str(out)])
    assert (out / "panel.png").stat().st_size > 10_000 and (out / "panel.pdf").exists()


def test_kept_plot_reads_allocations(tmp_path):
    from harness.report import kept_plot
    from harness.run import results
    for name, kept in (("pyramidkv_b64", [[100, 60, 20], [100, 60, 20]]), ("dynamickv_b64", [[10, 50, 120], [30, 50, 100]])):
        folder = tmp_path / "needle" / "m" / "default" / name
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(
            json.dumps({"id": f"s{i}", "score": 1.0, "kept": k, "kept_layers": [5, 11, 17]}) + "\n" for i, k in enumerate(kept)))
    labels, layers, matrix = kept_plot.allocation_rows(results.find_runs([tmp_path], results.PREDICTIONS))
    assert layers == [5, 11, 17]
    assert labels == ["m/dynamickv_b64", "m/pyramidkv_b64"]
    assert matrix.tolist() == [[20, 50, 110], [100, 60, 20]]
    _, _, per_sample = kept_plot.allocation_rows(results.find_runs([tmp_path], results.PREDICTIONS), by="sample")
    assert per_sample.shape == (4, 3)
    kept_plot.main([str(tmp_path), "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "kept_per_layer_by_run.png").stat().st_size > 5_000


def test_missing_haystack_folder_names_the_path_and_the_fix(tmp_path):
    from harness.tasks.haystack import load_haystack
    with pytest.raises(ConfigError, match=r"task.haystack_dir='.*nowhere' is not a folder.*task.haystack=synthetic"):
        load_haystack("essays", str(tmp_path / "nowhere"), 1000)
    with pytest.raises(ValueError, match="needs task.haystack_dir"):
        load_haystack("essays", None, 1000)
    with pytest.raises(ValueError, match=r"task.haystack='books' is not one of"):
        load_haystack("books", None, 1000)


def test_missing_gguf_file_names_the_path(tmp_path):
    from harness.engine.models import load_model
    cfg = OmegaConf.create({"name": "x", "source": "gguf", "path": str(tmp_path / "none.gguf"), "dtype": "float32",
                            "device": "cpu"})
    with pytest.raises(ConfigError, match="none.gguf' is not a file"):
        load_model(cfg)
