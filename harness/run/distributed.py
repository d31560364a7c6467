"""Data-parallel evaluation with ``torchrun`` (or ``accelerate launch``): samples sharded over ranks.

    torchrun --nproc_per_node 8 -m harness task=longbench model=llama3 "methods=[snapkv]" "budgets=[512]"

Each rank takes ``samples[rank::world]`` and appends its rows to its own part file
(``<file>.rank<k>.part``, one writer per file, so no two processes ever write the same file). After a
barrier, rank 0 merges the parts into the run's usual files, in the task's sample order, and then
scores, as a single-process run would: same folder, same predictions. A killed rank leaves its part
file; the next run counts its rows as done (resume works per rank) and merges them.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from pathlib import Path

import torch

PART = ".rank{rank}.part"


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when not launched in parallel."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


#: process-group timeout (seconds) when the config gives none: a collective that waits longer (a peer
#: that died without closing its connections, a hung GPU) raises instead of hanging forever
DEFAULT_TIMEOUT_S = 7200


def init(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group (gloo on CPUs, nccl on GPUs) and pick this rank's GPU.

    ``timeout_s`` bounds every collective (``distributed_timeout_s``; the final barrier waits for the
    slowest rank, so it must exceed the longest imbalance between ranks). A watchdog thread ends this
    process (exit code 3) within ``WATCH_INTERVAL_S`` seconds when its launcher dies (``kill -9`` of
    ``torchrun`` cannot forward the signal; its workers would otherwise wait forever)."""
    rank, size = world()
    if size > 1 and not torch.distributed.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
        watch_launcher()   # started at start-up by harness.__main__ already; idempotent
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            torch.distributed.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            torch.distributed.init_process_group("gloo", timeout=timeout)
    return rank, size


WATCH_INTERVAL_S = 2.0


_WATCHDOG: list = []


def watch_launcher(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread | None:
    """Start (once) a daemon thread that exits the process when its launcher is gone: a process whose
    parent dies is re-parented, so its parent pid changes. The parent is the one recorded when the
    ``harness`` package was imported (``harness.PARENT_PID``), so a launcher that died during start-up
    is noticed too. Finished samples are already on disk (every row is flushed and fsynced), so nothing
    is lost; the next run resumes them."""
    import harness
    if _WATCHDOG:
        return _WATCHDOG[0]
    parent = harness.PARENT_PID

    def gone() -> None:
        message = (f"rank {world()[0]}: the launcher (pid {parent}) is gone; exiting. Finished samples are "
                   "on disk; run the same command again to resume.\n")
        try:
            os.write(2, message.encode())
        except OSError:
            pass
        os._exit(3)

    if os.getppid() != parent or parent == 1:   # a launcher never runs as pid 1: it died before we started
        gone()

    def watch():
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                gone()

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    _WATCHDOG.append(thread)
    return thread


def finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def read_parts(folder: Path) -> list[dict]:
    """The valid rows of every part file (a line cut short by a kill is not a row: that sample runs again)."""
    from harness.run import results
    rows = []
    for path in results.part_files(folder):
        rows += results.parse_rows(path)[0]
    return rows


def merge(folder: Path, order: dict[tuple, int]) -> None:
    """Append every part file's rows to its target file, sorted by the task's sample order (``order``:
    (group, id) -> position), and remove the parts. Rows already in the target (a resumed merge) are
    not written twice."""
    from harness.run import results
    targets: dict[Path, list[dict]] = {}
    for path in results.part_files(folder):
        target = path.with_name(path.name.split(".rank")[0])
        targets.setdefault(target, []).extend(results.parse_rows(path)[0])
    for target, rows in targets.items():
        writer = results.PredictionWriter(target.parent, target.stem if target.name != results.PREDICTIONS else None)
        present = {row["id"] for row in results.parse_rows(target)[0]} if target.exists() else set()
        group = results.file_group(target)
        for row in sorted({r["id"]: r for r in rows}.values(), key=lambda r: order.get((group, r["id"]), len(order))):
            if row["id"] not in present:
                writer.append(row)
    for path in results.part_files(folder):
        path.unlink()
