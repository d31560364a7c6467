"""RULER (Hsieh et al., arXiv 2404.06654; github:NVIDIA/RULER): the only home of its task table
(``tasks``), word lists (``words``), essay corpus (``essays``), generators (``generate`` with one module
per family: ``niah``, ``variable_tracking``, ``common_words``, ``freq_words``, ``qa``; length fitting in
``fitting``), metrics and averages (``metrics``) and a run's final scores (``score``). The runner knows it
through ``harness.tasks.ruler``; this package has no model code.

May import: ``harness.run.results`` (file helpers). Never imports ``harness.report``, ``harness.engine``,
``harness.bench``, ``harness.cli`` or ``harness.run.runner``.
"""
