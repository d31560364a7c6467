"""What a run shows while it works: a ``tqdm`` bar with the ETA over (sample, method) pairs, one per
rank, and one log line per finished sample.

The bar counts generations: a sample decoded for three methods is three. A resumed run starts the
bar at what its folders already hold (``initial``), so the ETA is over the work left. ``progress``
(a run setting) decides whether it is drawn: ``auto`` draws it when stderr is a terminal (a batch
job's log file gets the per-sample lines only), ``always`` and ``never`` say so. Log records go
through ``tqdm.contrib.logging.logging_redirect_tqdm`` while the bar is drawn, so the bar stays on
the last line.
"""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger(__name__)

#: the ``progress`` setting's choices
MODES = ("auto", "always", "never")


def progress_bar(total: int, initial: int, mode: str = "auto", rank: int = 0, world: int = 1, desc: str = "",
                 file=None):
    """A ``tqdm`` bar over ``total`` (sample, method) generations of this rank, ``initial`` of them
    already done. ``mode``: ``auto`` (drawn when ``file``, default stderr, is a terminal), ``always``,
    ``never``. Several ranks draw one line each
    (``position=rank``). Raises ``ValueError`` for a mode outside ``MODES``."""
    from tqdm import tqdm
    if mode not in MODES:
        raise ValueError(f"progress={mode!r} is not one of {list(MODES)}")
    file = sys.stderr if file is None else file
    disable = {"auto": None, "always": False, "never": True}[mode]   # None: tqdm's own terminal test
    label = desc + (f" [rank {rank}/{world}]" if world > 1 else "")
    return tqdm(total=total, initial=initial, disable=disable, position=rank if world > 1 else None, desc=label,
                unit="gen", dynamic_ncols=True, file=file, leave=True, smoothing=0.1)


@contextlib.contextmanager
def redirected(bar):
    """Route log records around ``bar`` (above it) while it is drawn; a no-op for a disabled bar."""
    if getattr(bar, "disable", True):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():
        yield
