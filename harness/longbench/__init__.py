"""LongBench v1 scoring with the official semantics (THUDM/LongBench commit 2e00731,
``LongBench/metrics.py`` and ``LongBench/eval.py``): per-metric functions, the dataset tables, the
per-dataset and LongBench-E aggregation and the two averages (see ``metrics``). The command line
scorer is ``python -m harness.score``."""
