"""``python -m harness ...``: the ``kvh`` command (``harness.cli``)."""

from harness.cli import main

if __name__ == "__main__":
    main()
