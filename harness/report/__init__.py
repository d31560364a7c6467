"""Reporters: they read results folders only (never a model). ``table`` (the LongBench paper table),
``heatmap`` (needle heatmaps), ``kept_plot`` (kept tokens per layer), ``summary`` (one table of any
task's scores), ``wandb_log`` (W&B), ``common`` (method display names, Markdown, figure files).

May import: ``harness.run.results``, ``harness.longbench``, ``harness.tasks.needle_scores``, ``harness.config``.
"""
