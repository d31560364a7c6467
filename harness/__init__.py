"""Everything that touches a model, data or disk: loading, the compression hook, generation,
tasks, results, reports. Imports ``methods``; ``methods`` never imports this package."""

import os as _os

#: the parent process when this package was first imported: for a ``torchrun`` worker, its launcher
#: (``harness.run.distributed.watch_launcher`` exits when that changes)
PARENT_PID = _os.getppid()


def _checkout_packages() -> None:
    """Run from a checkout without installing (``PYTHONPATH=<checkout>``): the shipped configs and the
    published numbers live at ``conf/`` and ``results/reference/`` (pyproject.toml maps them to
    ``harness.conf`` and ``harness.reference`` only when installed), so they are made importable under
    those names here. An installed package never takes this path."""
    import importlib.util
    import sys
    top = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name, folder in (("harness.conf", "conf"), ("harness.reference", _os.path.join("results", "reference"))):
        path = _os.path.join(top, folder)
        if name in sys.modules or _os.path.isdir(_os.path.join(_os.path.dirname(__file__), name.split(".")[1])) \
                or not _os.path.isfile(_os.path.join(path, "__init__.py")):
            continue
        spec = importlib.util.spec_from_file_location(name, _os.path.join(path, "__init__.py"),
                                                      submodule_search_locations=[path])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_checkout_packages()
