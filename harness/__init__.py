"""Everything that touches a model, data or disk: loading, the compression hook, generation,
tasks, results, reports. Imports ``methods``; ``methods`` never imports this package."""

import os as _os

#: the parent process when this package was first imported: for a ``torchrun`` worker, its launcher
#: (``harness.run.distributed.watch_launcher`` exits when that changes)
PARENT_PID = _os.getppid()
