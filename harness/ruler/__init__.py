"""RULER (Hsieh et al., arXiv 2404.06654; github:NVIDIA/RULER): the only home of its task list, metrics
and averages (``metrics``). The generators and the ``task=ruler`` runner integration come with the
rest of the RULER issue; this package has no model code.

May import: ``harness.run.results`` (file helpers). Never imports ``harness.report``, ``harness.engine``,
``harness.bench``, ``harness.cli`` or ``harness.run.runner``.
"""
