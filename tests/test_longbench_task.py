"""LongBench preparation (prompts, truncation, stops, chat rule) and the run -> score -> table path."""

import hashlib
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import harness.run.rows as run_rows
import harness.run.runner as runner
from harness.engine.models import byte_tokenizer
from harness.tasks import longbench
from methods import ConfigError

from conftest import ROOT, SHARED

TOK = byte_tokenizer()
PROMPTS = {"samsum": "Summarize the dialogue.\n\n{context}\n\n{input}",
           "trec": "Classify.\n\n{context}\n{input}",
           "multi_news": "Summarize the news.\n\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:"}
MAXLEN = {"samsum": 128, "trec": 64, "multi_news": 512}


def fake_longbench(tmp_path: Path, rows_per_dataset: int = 3, context_words: int = 60,
                   longbench_e: bool = False) -> tuple[Path, Path]:
    data, config = tmp_path / "data", tmp_path / "config"
    data.mkdir()
    config.mkdir()
    (config / "dataset2prompt.json").write_text(json.dumps(PROMPTS))
    (config / "dataset2maxlen.json").write_text(json.dumps(MAXLEN))
    for dataset in PROMPTS:
        lines = []
        for i in range(rows_per_dataset):
            lines.append(json.dumps({
                "input": f"Question {i}?" if dataset != "multi_news" else "", "context": " ".join(["word"] * context_words) + f" {i}",
                "answers": ["DESC"] if dataset == "trec" else [f"answer {i}"], "length": context_words,
                "dataset": dataset, "language": "en", "all_classes": ["DESC", "NUM"] if dataset == "trec" else None,
                "_id": f"{dataset}-{i}"}))
        (data / f"{dataset}.jsonl").write_text("\n".join(lines) + "\n")
        if longbench_e:   # LongBench-E: the same rows under <dataset>_e.jsonl
            (data / f"{dataset}_e.jsonl").write_text("\n".join(lines) + "\n")
    return data, config


def task_cfg(data, config, **extra):
    return OmegaConf.create({"name": "longbench", "data_dir": str(data), "config_dir": str(config),
                             "config_commit": "x", "hub_repo": "THUDM/LongBench", "hub_revision": "main",
                             "datasets": list(PROMPTS), "limit": None, "max_new_tokens": None, **extra})


def test_prompts_lengths_and_stops_come_from_the_official_tables(tmp_path):
    data, config = fake_longbench(tmp_path)
    samples = longbench.build_samples(task_cfg(data, config), TOK, max_input_tokens=None)
    by_id = {s.id: s for s in samples}
    assert len(samples) == 9 and [s.group for s in samples[:3]] == ["samsum"] * 3
    assert by_id["samsum-1"].prompt == "Summarize the dialogue.\n\n" + " ".join(["word"] * 60) + " 1\n\nQuestion 1?"
    assert by_id["samsum-0"].max_new_tokens == 128 and by_id["trec-0"].max_new_tokens == 64
    assert by_id["samsum-0"].dataset == "samsum" and by_id["trec-0"].dataset == "trec"
    assert by_id["trec-0"].meta["all_classes"] == ["DESC", "NUM"]
    limited = longbench.build_samples(task_cfg(data, config, limit=1), TOK)
    assert [s.id for s in limited] == ["samsum-0", "trec-0", "multi_news-0"]


def test_middle_truncation_keeps_both_ends():
    text = "A" * 50 + "M" * 100 + "Z" * 50
    out, truncated = longbench.middle_truncate(TOK, text, 41)    # 201 tokens with BOS -> 20 + 20
    assert truncated and out == "A" * 19 + "Z" * 20               # BOS counts in the first half and is dropped
    assert longbench.middle_truncate(TOK, "short", 41) == ("short", False)


def test_bad_dataset_and_missing_files_fail_clearly(tmp_path):
    data, config = fake_longbench(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'hotpot'"):
        longbench.build_samples(task_cfg(data, config, datasets=["hotpot"]), TOK)
    with pytest.raises(ConfigError, match="has no qasper.jsonl"):
        longbench.data_file(task_cfg(data, config), "qasper")
    with pytest.raises(ConfigError, match="has no dataset2prompt.json"):
        longbench.config_tables(task_cfg(data, tmp_path))


def test_known_checksums_are_verified(tmp_path):
    data, config = fake_longbench(tmp_path)
    (data / "multi_news.jsonl").write_text((data / "multi_news.jsonl").read_text())  # not the official file
    with pytest.raises(ValueError, match="differs from the official file"):
        longbench.checksums(task_cfg(data, config))


def config(tmp_path, data, config_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "task=longbench", "model=tiny_llama", "protocol=longbench_official", f"results_dir={tmp_path / 'results'}",
            f"task.data_dir={data}", f"task.config_dir={config_dir}", "task.datasets=[samsum,trec]",
            "task.max_new_tokens=6", "wandb=false", "model.dtype=float32", *overrides])


def test_run_writes_dataset_files_scores_and_resumes(tmp_path, monkeypatch):
    data, config_dir = fake_longbench(tmp_path)
    calls = []
    real = runner.generate_many
    monkeypatch.setattr(runner, "generate_many", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = config(tmp_path, data, config_dir, "methods=[fullkv,snapkv]", "budgets=[64]", "method_overrides={window_size: 8}",
                 "task.limit=2")
    summaries = runner.run(cfg)
    folder = Path(summaries[1]["folder"])
    assert folder.name == "snapkv_b64_w8_k7_maxpool_qh" and folder.parent.name == "longbench_official"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == ["samsum.jsonl", "trec.jsonl"]
    rows = [json.loads(line) for line in (folder / "trec.jsonl").read_text().splitlines()]
    assert {"pred", "answers", "all_classes", "length", "score"} <= set(rows[0])
    result = json.loads((folder / "result.json").read_text())
    assert set(result) == {"samsum", "trec"} and summaries[1]["datasets"] == result
    assert len(calls) == 4
    # resume: two more samples per dataset, the finished ones are not run again
    cfg = config(tmp_path, data, config_dir, "methods=[fullkv,snapkv]", "budgets=[64]", "method_overrides={window_size: 8}",
                 "task.limit=3")
    runner.run(cfg)
    assert len(calls) == 6
    assert len((folder / "trec.jsonl").read_text().splitlines()) == 3
    # the table reads the folders
    from harness.report import table
    runs, head, cells, rows = table.table([tmp_path / "results"], reference=None)
    assert len(runs) == 2 and head[0] == "Model"
    snap = next(r for r in rows if r["method"] == "snapkv")
    assert snap["scores"]["trec"] == result["trec"] and snap["budget"] == 64


def run_recording(monkeypatch, cfg):
    """Run ``cfg``; returns (dataset, chat) per encoded sample and (stop ids, min_new_tokens) per generation."""
    seen, stops = [], []
    real_encode = run_rows.encode_parts
    monkeypatch.setattr(run_rows, "encode_parts", lambda sample, tok, chat, device, special="text", scope="prompt":
                        seen.append((sample.group, chat)) or real_encode(sample, tok, chat, device, special, scope))
    real_generate = runner.generate
    monkeypatch.setattr(runner, "generate", lambda *a, **k: stops.append((a[5], a[7])) or real_generate(*a, **k))
    runner.run(cfg)
    return seen, stops


@pytest.mark.parametrize("protocol, samsum_stops", [
    ("longbench_official", lambda newline: sorted({TOK.eos_token_id, newline})),   # pred.py: replaced by [eos, "\n"]
    ("dynamickv_paper", lambda newline: sorted({TOK.eos_token_id, newline})),
    ("default", lambda newline: sorted({1, newline})),                           # the model's own, plus "\n"
])
def test_stop_ids_and_min_new_tokens_follow_the_protocol(tmp_path, monkeypatch, protocol, samsum_stops):
    data, config_dir = fake_longbench(tmp_path, longbench_e=True)
    seen, stops = run_recording(monkeypatch, config(tmp_path, data, config_dir, "method=fullkv", "task.limit=1",
                                                     f"protocol={protocol}",
                                                     "task.datasets=[samsum,trec,samsum_e,trec_e]"))
    newline = TOK.encode("\n", add_special_tokens=False)[-1]
    # LongBench-E takes the rules of its base dataset, as pred.py compares the base name
    assert stops == [(samsum_stops(newline), 1), ([1], 0), (samsum_stops(newline), 1), ([1], 0)]
    manifest = json.loads(next((tmp_path / "results").rglob("manifest.json")).read_text())
    assert manifest["generation"]["samsum"] == {"stop_token_ids": samsum_stops(newline), "min_new_tokens": 1,
                                                "chat_template": False}


def test_longbench_e_is_skipped_from_the_chat_template_like_its_base_dataset(tmp_path, monkeypatch):
    """pred.py tests the base name against the skip list, so trec_e goes raw like trec, and qasper-like
    datasets get the template (tiny_llama given a chat template here)."""
    data, config_dir = fake_longbench(tmp_path, longbench_e=True)
    monkeypatch.setattr(longbench, "KNOWN_SHA256", {})          # the fake multi_news is not the official file
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    seen, _ = run_recording(monkeypatch, config(
        tmp_path, data, config_dir, "method=fullkv", "task.limit=1", "model.chat_template=true",
        f"+model.chat_template_file={template}", "task.datasets=[samsum,trec,multi_news,samsum_e,trec_e,multi_news_e]"))
    assert seen == [("samsum", False), ("trec", False), ("multi_news", True),
                    ("samsum_e", False), ("trec_e", False), ("multi_news_e", True)]
    manifest = json.loads(next((tmp_path / "results").rglob("manifest.json")).read_text())
    assert manifest["model"]["chat_template_source"] == str(template)
    assert manifest["model"]["chat_template_sha256"] == hashlib.sha256(template.read_text().encode()).hexdigest()


SHARED_LB = SHARED / "data" / "longbench"


@pytest.mark.real_model
def test_smollm2_on_the_shared_longbench_files(tmp_path):
    """The real files (multi_news and the two Chinese datasets) through the runner on SmolLM2,
    shortened (1 sample each, 1500 input tokens, 12 new tokens) to stay fast on a CPU."""
    if not SHARED_LB.is_dir():
        pytest.skip(f"LongBench files are not at {SHARED_LB} (../shared/data exists only on the dev machines)")
    from conftest import real_model
    real_model("smollm2_135m")   # skips if the package is missing
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "task=longbench", "model=smollm2_135m", "protocol=dynamickv_paper", f"results_dir={tmp_path}",
            f"task.data_dir={SHARED_LB}", f"task.config_dir={SHARED_LB / 'config'}", "wandb=false",
            "task.datasets=[multi_news,multifieldqa_zh,passage_retrieval_zh]", "task.limit=1", "task.max_new_tokens=12",
            "model.max_input_tokens=1500", "model.dtype=float32", "methods=[fullkv,snapkv]", "budgets=[128]"])
    summaries = runner.run(cfg)
    for summary in summaries:
        assert summary["samples"] == 3
        assert set(summary["datasets"]) == {"multi_news", "multifieldqa_zh", "passage_retrieval_zh"}
        manifest = json.loads((Path(summary["folder"]) / "manifest.json").read_text())
        assert manifest["data_sha256"]["multi_news.jsonl"] == longbench.KNOWN_SHA256["multi_news.jsonl"]
        assert manifest["scorer"]["fuzz_backend"] == "python-Levenshtein"
    rows = [json.loads(l) for l in (Path(summaries[1]["folder"]) / "multifieldqa_zh.jsonl").read_text().splitlines()]
    assert rows[0]["truncated"] and rows[0]["prompt_tokens"] <= 1500 + 2
