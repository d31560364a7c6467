"""Reporters: they read results folders only (never a model). ``table`` (the LongBench paper table),
``heatmap`` (needle heatmaps), ``kept_plot`` (kept tokens per layer), ``summary`` (one table of any
task's scores), ``wandb_log`` (what a finished run logs to W&B: scores, predictions, the results
artifact, its heatmap), ``wandb_runs`` (one W&B run per results folder, its group and directory; used by
``heatmap --wandb``), ``ruler_table`` and ``ruler_heatmap`` (RULER's task x length tables with the published
anchors, and its heatmaps), ``common`` (method display names and order, Markdown, figure files).

May import: ``harness.run.results``, ``harness.longbench``, ``harness.ruler``, ``harness.tasks.needle_scores``,
``harness.config``.
"""
