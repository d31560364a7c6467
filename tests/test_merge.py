"""``kvh merge``: a run made in pieces (one process per context length) becomes one run folder."""

import json
import re

import pytest
from hydra import compose, initialize_config_dir

import harness.run.runner as runner
from harness.cli import main
from harness.run import results

from conftest import ROOT

CONF = str(ROOT / "conf")


def cli_error(capsys, argv) -> str:
    """What ``kvh`` prints on stderr for a user error (one ``error:`` line, exit code 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def config(root, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=tiny_llama", f"results_dir={root}", "wandb=false", "progress=never", "task=passkey",
            "task.depths=[0,100]", "task.max_new_tokens=3", "methods=[fullkv,snapkv]", "budgets=[64]",
            "method_overrides={window_size: 8}", *overrides])


def test_pieces_merge_into_one_run_with_the_rows_of_every_piece(tmp_path, capsys):
    runner.run(config(tmp_path / "a", "task.context_lengths=[300]"))
    runner.run(config(tmp_path / "b", "task.context_lengths=[400]"))
    main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--into", str(tmp_path / "merged")])
    assert "2 piece(s), 4 samples" in capsys.readouterr().out
    merged = results.find_runs([tmp_path / "merged"])
    assert len(merged) == 2
    for folder in merged:
        manifest = json.loads((folder / results.MANIFEST).read_text())
        assert manifest["config"]["task"]["context_lengths"] == [300, 400] and len(manifest["merged_from"]) == 2
        relative = folder.relative_to(tmp_path / "merged")
        union = {**results.finished(tmp_path / "a" / relative), **results.finished(tmp_path / "b" / relative)}
        assert results.finished(folder) == union and len(union) == 4
        scores = json.loads((folder / results.SCORES).read_text())
        assert scores["samples"] == 4
        assert scores["score"] == round(100 * sum(r["score"] for r in union.values()) / 4, 2)
    assert "not empty" in cli_error(capsys, ["merge", str(tmp_path / "a"), "--into", str(tmp_path / "merged")])


def test_pieces_of_other_settings_are_refused(tmp_path, capsys):
    runner.run(config(tmp_path / "a", "task.context_lengths=[300]", "methods=[fullkv]"))
    runner.run(config(tmp_path / "b", "task.context_lengths=[400]", "methods=[fullkv]", "task.max_new_tokens=4"))
    message = cli_error(capsys, ["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--into", str(tmp_path / "m")])
    assert message.startswith("error: ") and re.search("other settings.*max_new_tokens", message)


def test_an_allowed_difference_is_merged_and_recorded(tmp_path):
    runner.run(config(tmp_path / "a", "task.context_lengths=[300]", "methods=[fullkv]"))
    runner.run(config(tmp_path / "b", "task.context_lengths=[400]", "methods=[fullkv]", "task.max_new_tokens=4"))
    main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--into", str(tmp_path / "m"),
          "--allow-difference", "task.max_new_tokens"])
    [folder] = results.find_runs([tmp_path / "m"])
    manifest = json.loads((folder / results.MANIFEST).read_text())
    assert manifest["merge_allowed_differences"] == {"task.max_new_tokens": [3, 4]}
    assert len(results.finished(folder)) == 4
