"""The reliability campaign (``make reliability``; CPU, tiny random Llama, a few minutes; not in the
fast suite).

1. ``kill -9`` campaign: a reference run without interruption; then the same run killed ``--kills``
   times at random moments (half at a random time, half a few milliseconds after a result line is
   written) and resumed each time, once as a single process and once under ``torchrun`` with two
   processes (there the whole process group is killed, or only one worker). The finished runs are
   compared with the reference row by row (timings aside): samples lost, duplicated, corrupt lines.
2. Bad-input matrix: every case runs ``python -m harness`` (or a results tool) against a results folder
   holding a finished run, and records the exit code, whether it failed before the model's weights
   loaded (``load_model`` logs "loading model weights" just before), whether the message is one ``error:`` line with
   no traceback, and whether the finished results were left untouched.

Prints both tables as Markdown and writes them with the raw data to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KV_HARNESS_DEBUG": "0", "WANDB_MODE": "disabled"}
#: 90 samples (3 lengths x 30 depths), two methods sharing each prefill
CAMPAIGN = ["model=tiny_llama", "task=passkey", "task.context_lengths=[400,480,560]",
            "task.depths=[" + ",".join(str(round(100 * i / 29, 2)) for i in range(30)) + "]",
            "task.max_new_tokens=8", "methods=[fullkv,snapkv]", "budgets=[64]", "method_overrides={window_size: 8}",
            "wandb=false", "threads=1"]
RUNS = ("fullkv", "snapkv_b64_w8_k7_maxpool_qh")


def harness_cmd(results_dir: Path, args: list[str], nproc: int = 1, port: int = 29600) -> list[str]:
    prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  str(nproc), "--master_port", str(port)]
    return [*prefix, "-m", "harness", *args, f"results_dir={results_dir}", f"hydra.run.dir={results_dir}/hydra/run"]


def run_folder(results_dir: Path, run: str) -> Path:
    return results_dir / "passkey" / "tiny_llama" / "default" / run


def rows_of(results_dir: Path, run: str) -> tuple[list[dict], int]:
    """The rows of a finished run (timing removed) and its count of lines that are not valid JSON."""
    rows, corrupt = [], 0
    path = run_folder(results_dir, run) / "predictions.jsonl"
    for line in path.read_text(encoding="utf-8").split("\n") if path.exists() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            corrupt += 1
            continue
        row.pop("seconds", None)
        rows.append(row)
    return rows, corrupt


def processes_of(results_dir: Path) -> list[int]:
    """Live (not zombie) processes whose command line names this results folder."""
    pids = []
    for pid in subprocess.run(["pgrep", "-f", f"results_dir={results_dir}"], capture_output=True,
                              text=True).stdout.split():
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def lines_on_disk(results_dir: Path) -> int:
    return sum(p.read_bytes().count(b"\n") for p in results_dir.glob("passkey/tiny_llama/default/*/*")
               if p.suffix in (".jsonl", ".part"))


def newest_write(results_dir: Path) -> int:
    total = 0
    for path in results_dir.glob("passkey/tiny_llama/default/*/*"):
        if path.suffix in (".jsonl", ".part"):
            total += path.stat().st_size
    return total


def kill_campaign(work: Path, kills: int, nproc: int, seed: int) -> dict:
    rng = random.Random(seed)
    results_dir = work / f"killed_{nproc}"
    survivors: list[int] = []
    port = 29600 + nproc * 17 + os.getpid() % 500
    log = []
    for k in range(kills):
        proc = subprocess.Popen(harness_cmd(results_dir, CAMPAIGN, nproc, port + k), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        started = time.time()
        mode = ("during start-up", "random time while writing", "within ms of a write")[k % 3]
        if mode == "during start-up":   # imports, checks, manifest, loading
            time.sleep(rng.uniform(0.5, 12.0))
        else:   # wait for a result line to land, then kill a random time (or a few milliseconds) later
            size = newest_write(results_dir) if results_dir.exists() else 0
            while time.time() - started < 90 and (not results_dir.exists() or newest_write(results_dir) == size):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.01) if mode == "within ms of a write" else rng.uniform(0.0, 6.0))
        target = "group"
        if nproc > 1 and k % 4 == 3:   # one worker only: torchrun then stops the others
            workers = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "-n", "harness"], capture_output=True,
                                     text=True).stdout.split()
            if workers and int(workers[-1]) != proc.pid:
                os.kill(int(workers[-1]), signal.SIGKILL)
                target = "one worker"
        if target == "group":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        # every process of the run must end by itself within 60 s (torchrun's workers run in their own
        # process groups: they must notice that their launcher is gone)
        deadline, stragglers = time.time() + 60, processes_of(results_dir)
        while stragglers and time.time() < deadline:
            time.sleep(0.2)
            stragglers = processes_of(results_dir)
        for pid in stragglers:
            os.kill(pid, signal.SIGKILL)
        survivors.append(len(stragglers))
        log.append({"kill": k + 1, "mode": mode, "target": target, "after_s": round(time.time() - started, 2),
                    "lines_on_disk": lines_on_disk(results_dir)})
    final = subprocess.run(harness_cmd(results_dir, CAMPAIGN, nproc, port + kills + 1), cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=1800)
    return {"results_dir": results_dir, "log": log, "final_rc": final.returncode, "survivors": sum(survivors),
            "final_tail": final.stderr[-2000:] if final.returncode else ""}


def compare(reference: Path, killed: Path) -> dict:
    out = {"lost": 0, "duplicates": 0, "corrupt_lines": 0, "differing_rows": 0, "bad_lines_moved": 0}
    for run in RUNS:
        ref, _ = rows_of(reference, run)
        got, corrupt = rows_of(killed, run)
        ids = [r["id"] for r in got]
        out["lost"] += len({r["id"] for r in ref} - set(ids))
        out["duplicates"] += len(ids) - len(set(ids))
        out["corrupt_lines"] += corrupt
        by_id = {r["id"]: r for r in got}
        out["differing_rows"] += sum(by_id.get(r["id"]) != r for r in ref)
        out["order_identical"] = out.get("order_identical", True) and [r["id"] for r in ref] == ids
        bad = run_folder(killed, run) / "predictions.jsonl.bad"
        out["bad_lines_moved"] += bad.read_bytes().count(b"\n") if bad.exists() else 0
    return out


# -- bad-input matrix ---------------------------------------------------------------------------------

BASE = ["model=tiny_llama", "method=snapkv", "method.budget=64", "method.window_size=8", "wandb=false"]
FIXED = [*BASE, "task=passkey", "task.context_lengths=[300]", "task.depths=[50]", "task.max_new_tokens=3"]


def fixtures(work: Path) -> dict:
    """Data files for the matrix: LongBench-shaped files (good and broken), haystack folders, a fake GGUF."""
    data, config = work / "lb" / "data", work / "lb" / "config"
    data.mkdir(parents=True)
    config.mkdir(parents=True)
    (config / "dataset2prompt.json").write_text(json.dumps({"trec": "Classify.\n\n{context}\n{input}"}))
    (config / "dataset2maxlen.json").write_text(json.dumps({"trec": 8}))
    good = [{"_id": f"t{i}", "input": "q?", "context": "word " * 50, "answers": ["DESC"], "all_classes": ["DESC", "NUM"],
             "length": 50} for i in range(3)]
    lines = [json.dumps(r) for r in good]
    variants = {"ok": lines, "empty": [], "badjson": [lines[0], lines[1][:-5]],
                "nocontext": [lines[0], json.dumps({k: v for k, v in good[1].items() if k != "context"})],
                "noid": [lines[0], json.dumps({k: v for k, v in good[1].items() if k != "_id"})],
                "dupid": [lines[0], lines[0]], "notobject": [lines[0], "[1, 2]"],
                "answersstr": [lines[0], json.dumps(good[1] | {"answers": "DESC"})],
                "noclasses": [lines[0], json.dumps(good[1] | {"all_classes": None})]}
    for name, content in variants.items():
        folder = data / name
        folder.mkdir()
        (folder / "trec.jsonl").write_text("".join(x + "\n" for x in content))
    (work / "essays_empty").mkdir()
    (work / "essays_empty" / "a.txt").write_text("\n")
    (work / "not_a_gguf.gguf").write_bytes(b"PK\x03\x04 zip, not gguf")
    return {"data": data, "config": config, "work": work}


def matrix_cases(fx: dict) -> list[tuple[str, list[str], str]]:
    """(name, command arguments, tool): tool ``harness`` runs with FIXED first, others as given."""
    lb = ["task=longbench", f"task.config_dir={fx['config']}", "task.datasets=[trec]", "method=fullkv"]

    def longbench(variant, *extra):
        return [*lb, f"task.data_dir={fx['data'] / variant}", *extra]

    h = "harness"
    return [
        ("unknown model config", ["model=nope"], h), ("unknown task", ["task=nope"], h),
        ("unknown method", ["method=nope"], h), ("unknown protocol", ["protocol=nope"], h),
        ("model.source", ["model.source=xyz"], h), ("model.dtype", ["model.dtype=float64"], h),
        ("model.device", ["model.device=tpu"], h), ("model.device cuda, no GPU", ["model.device=cuda"], h),
        ("flash_attention_2 without flash-attn", ["model.attn_implementation=flash_attention_2"], h),
        ("unknown attention backend", ["model.attn_implementation=magic"], h),
        ("local model dir missing", ["model=llama3", "model.name_or_path=/nonexistent/model"], h),
        ("malformed hub id", ["model=llama3", "model.name_or_path=a/b/c"], h),
        ("gguf file missing", ["model.source=gguf", "+model.path=/nonexistent.gguf"], h),
        ("file is not GGUF", ["model.source=gguf", f"+model.path={fx['work'] / 'not_a_gguf.gguf'}"], h),
        ("remote code without opt-in", ["model=internlm2_5", "model.device=cpu"], h),
        ("chat template file missing", ["+model.chat_template_file=nope.jinja"], h),
        ("misspelt setting (Hydra)", ["task.deph=1"], h),
        ("value of the wrong type (Hydra)", ["task.context_lengths=abc"], h),
        ("model.name escapes results", ["model.name=../../escape_model"], h),
        ("protocol.name escapes results", ["protocol.name=../escape"], h),
        ("task.haystack unknown", ["task.haystack=nope"], h),
        ("essays without a folder", ["task.haystack=essays"], h),
        ("essays folder missing", ["task.haystack=essays", "task.haystack_dir=/nonexistent"], h),
        ("essays all empty", ["task.haystack=essays", f"task.haystack_dir={fx['work'] / 'essays_empty'}"], h),
        ("context length 0", ["task.context_lengths=[0]"], h),
        ("context length > model max", ["task.context_lengths=[100000]"], h),
        ("depth 150", ["task.depths=[150]"], h), ("max_new_tokens 0", ["task.max_new_tokens=0"], h),
        ("samples_per_cell -1", ["task.samples_per_cell=-1"], h),
        ("needle preset", ["task=needle", "task.needle=other"], h),
        ("needle depth kind", ["task=needle", "task.depth_grid.kind=cubic"], h),
        ("needle depths repeated", ["task=needle", "task.depths=[50,50]"], h),
        ("needle length < buffer", ["task=needle", "task.context_lengths=[100]"], h),
        ("passkey length < its frame (needs the tokenizer)", ["task.context_lengths=[100]"], h),
        ("LongBench data_dir missing", [*lb, "task.data_dir=/nonexistent"], h),
        ("LongBench empty file", longbench("empty"), h),
        ("LongBench malformed JSON line", longbench("badjson"), h),
        ("LongBench row without context", longbench("nocontext"), h),
        ("LongBench row without _id", longbench("noid"), h),
        ("LongBench repeated _id", longbench("dupid"), h),
        ("LongBench line not an object", longbench("notobject"), h),
        ("LongBench answers not a list", longbench("answersstr"), h),
        ("LongBench all_classes null", longbench("noclasses"), h),
        ("LongBench unknown dataset", longbench("ok", "task.datasets=[hotpot]"), h),
        ("LongBench task.limit 0", longbench("ok", "task.limit=0"), h),
        ("LongBench config_dir missing", [*longbench("ok"), "task.config_dir=/nonexistent"], h),
        ("protocol.truncation", longbench("ok", "protocol.truncation=left"), h),
        ("limit 0", ["limit=0"], h), ("limit -1", ["limit=-1"], h), ("limit text", ["limit=abc"], h),
        ("decode mode", ["decode=fast"], h), ("decode_batch 0", ["decode_batch=0"], h),
        ("method budget -5", ["method.budget=-5"], h), ("unknown name in methods", ["methods=[snapkv,bogus]"], h),
        ("protocol.chat_template", ["protocol.chat_template=sometimes"], h),
        ("protocol.prompt_special_tokens", ["protocol.prompt_special_tokens=maybe"], h),
        ("resume mode", ["resume=later"], h),
        ("method knob makes an unsafe folder name", ["method=h2o", "method.variant=../x"], h),
        ("resume with another seed", ["task.seed=1"], h),
        ("resume with other max_new_tokens", ["task.max_new_tokens=5"], h),
        ("resume with another dtype", ["model.dtype=bfloat16"], h),
        ("resume with another protocol rule", ["protocol.chat_template=never"], h),
        ("table on a corrupt result.json", ["harness.report.table", "{results}/corrupt_table", "--out", "{tmp}/t"], "tool"),
        ("score on a corrupt predictions line", ["harness.longbench.score", "{results}/corrupt_score"], "tool"),
        ("report on a missing folder", ["harness.report.summary", "/nonexistent/folder"], "tool"),
    ]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "hydra" not in p.relative_to(folder).parts}


def run_case(case, results_dir: Path, tmp: Path) -> dict:
    name, args, tool = case
    case_tmp = Path(tempfile.mkdtemp(dir=tmp))
    if tool == "harness":
        fixed = BASE if any(a.startswith("task=") for a in args) else FIXED   # another task: its own keys
        cmd = [sys.executable, "-m", "harness", *fixed, *args, f"results_dir={results_dir}",
               f"hydra.run.dir={case_tmp}/hydra"]
    else:
        cmd = [sys.executable, "-m", *(a.format(results=results_dir, tmp=case_tmp) for a in args)]
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    return {"case": name, "exit": out.returncode, "before_model": "loading model weights" not in text,
            "one_message": len(errors) == 1 and "Traceback" not in text,
            "message": errors[0][:200] if errors else (out.stderr.strip().splitlines() or [""])[-1][:200]}


def matrix(work: Path, jobs: int) -> list[dict]:
    fx = fixtures(work / "fixtures")
    results_dir = work / "matrix_results"
    subprocess.run([sys.executable, "-m", "harness", *FIXED, f"results_dir={results_dir}",
                    f"hydra.run.dir={work}/hydra"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    table_dir = results_dir / "corrupt_table"
    table_dir.mkdir()
    (table_dir / "manifest.json").write_text(json.dumps({"method": {"name": "fullkv"}, "config": {
        "model": {"name": "m"}, "protocol": {"name": "p"}}}))
    (table_dir / "result.json").write_text('{"trec": 50.0,')
    score_dir = results_dir / "corrupt_score"
    score_dir.mkdir()
    (score_dir / "trec.jsonl").write_text('{"pred": "DESC", "answers": ["DESC"], "all_classes": ["DESC"]}\n{"pred": \n')
    finished = run_folder(results_dir, "snapkv_b64_w8_k7_maxpool_qh")
    before = snapshot(finished)
    tmp = work / "case_tmp"
    tmp.mkdir()
    cases = matrix_cases(fx)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        rows = list(pool.map(lambda c: run_case(c, results_dir, tmp), cases))
    untouched = snapshot(finished) == before
    escaped = [p for p in (work / "escape_model", results_dir / "passkey" / "escape") if p.exists()]
    for row in rows:
        row["results_untouched"] = untouched and not escaped
    return rows


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10, help="kill -9s per campaign (default 10)")
    parser.add_argument("--jobs", type=int, default=2, help="matrix cases run at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "reliability")
    parser.add_argument("--skip-kills", action="store_true")
    parser.add_argument("--skip-matrix", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kv-reliability-"))
    args.out.mkdir(parents=True, exist_ok=True)
    report, raw, ok = [], {}, True
    started = time.time()
    if not args.skip_kills:
        reference = work / "reference"
        subprocess.run(harness_cmd(reference, CAMPAIGN), cwd=ROOT, env=ENV, check=True, capture_output=True)
        kill_rows = []
        for nproc in (1, 2):
            campaign = kill_campaign(work, args.kills, nproc, args.seed + nproc)
            verdict = compare(reference, campaign["results_dir"]) if campaign["final_rc"] == 0 else {}
            raw[f"kills_{nproc}"] = {"log": campaign["log"], "verdict": verdict, "final_rc": campaign["final_rc"],
                                     "final_tail": campaign["final_tail"]}
            good = campaign["final_rc"] == 0 and not campaign["survivors"] and not any(
                verdict[k] for k in ("lost", "duplicates", "corrupt_lines", "differing_rows"))
            ok &= good
            kill_rows.append(["single process" if nproc == 1 else "torchrun, 2 processes", len(campaign["log"]),
                              sum(e["mode"] == "within ms of a write" for e in campaign["log"]),
                              sum(e["target"] == "one worker" for e in campaign["log"]),
                              verdict.get("lost", "-"), verdict.get("duplicates", "-"),
                              verdict.get("corrupt_lines", "-"), verdict.get("differing_rows", "-"),
                              verdict.get("bad_lines_moved", "-"), campaign["survivors"], "yes" if good else "NO"])
        report.append("## kill -9 campaign (90 samples x 2 methods, resumed after every kill)\n\n" + markdown(
            ["run", "kills", "of which within ms of a write", "of which one worker only", "samples lost", "duplicate rows", "corrupt lines",
             "rows differing from the uninterrupted run", "cut lines moved to .bad",
             "processes alive 60 s after a kill", "pass"], kill_rows))
    if not args.skip_matrix:
        rows = matrix(work, args.jobs)
        raw["matrix"] = rows
        expected_exit = 2
        table_rows = []
        for r in rows:
            good = r["exit"] == expected_exit and r["before_model"] and r["one_message"] and r["results_untouched"]
            ok &= good
            table_rows.append([r["case"], r["exit"], "yes" if r["before_model"] else "NO",
                               "yes" if r["one_message"] else "NO", "yes" if r["results_untouched"] else "NO",
                               r["message"].replace("|", "\\|")[:140], "yes" if good else "NO"])
        report.append(f"## Bad-input matrix ({len(rows)} cases)\n\n" + markdown(
            ["case", "exit", "before the model loaded", "one error line, no traceback", "finished results untouched",
             "message (first 140 characters)", "pass"], table_rows))
    text = (f"# Reliability campaign\n\n`python scripts/reliability.py --kills {args.kills}` on {os.uname().nodename}, "
            f"{os.cpu_count()} CPUs, {time.time() - started:.0f} s.\n\n" + "\n\n".join(report) + "\n")
    print(text)
    (args.out / "reliability.md").write_text(text, encoding="utf-8")
    (args.out / "reliability.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
