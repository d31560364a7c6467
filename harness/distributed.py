"""Data-parallel evaluation with ``torchrun`` (or ``accelerate launch``): samples sharded over ranks.

    torchrun --nproc_per_node 8 -m harness task=longbench model=llama3 "methods=[snapkv]" "budgets=[512]"

Each rank takes ``samples[rank::world]`` and appends its rows to its own part file
(``<file>.rank<k>.part``, one writer per file, so no two processes ever write the same file). After a
barrier, rank 0 merges the parts into the run's usual files, in the task's sample order, and then
scores, as a single-process run would: same folder, same predictions. A killed rank leaves its part
file; the next run counts its rows as done (resume works per rank) and merges them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PART = ".rank{rank}.part"


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched in parallel."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> tuple[int, int]:
    """Join the process group (gloo on CPUs, nccl on GPUs) and pick this rank's GPU."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device)
        else:
            torch.distributed.init_process_group("gloo")
    return rank, size


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def part_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.part"))


def read_parts(folder: Path) -> list[dict]:
    rows = []
    for path in part_files(folder):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a kill: that sample runs again
                continue
    return rows


def merge(folder: Path, order: dict[str, int]) -> None:
    """Append every part file's rows to its target file, sorted by the task's sample order, and
    remove the parts. Rows already in the target (a resumed merge) are not written twice."""
    from harness import results
    targets: dict[Path, list[dict]] = {}
    for path in part_files(folder):
        target = path.with_name(path.name.split(".rank")[0])
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                targets.setdefault(target, []).append(json.loads(line))
            except json.JSONDecodeError:
                continue
    for target, rows in targets.items():
        present = {json.loads(line)["id"] for line in target.read_text(encoding="utf-8").splitlines()
                   if line.strip()} if target.exists() else set()
        writer = results.PredictionWriter(target.parent, target.stem if target.name != results.PREDICTIONS else None)
        for row in sorted({r["id"]: r for r in rows}.values(), key=lambda r: order.get(r["id"], len(order))):
            if row["id"] not in present:
                writer.append(row)
    for path in part_files(folder):
        path.unlink()
