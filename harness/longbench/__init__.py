"""LongBench v1 scoring with the official semantics (THUDM/LongBench commit 2e00731,
``LongBench/metrics.py`` and ``LongBench/eval.py``): per-metric functions, the dataset tables, the
per-dataset and LongBench-E aggregation and the two averages, also over any subset of datasets (see
``metrics``). The command line scorer is ``kvh score``; ``jsonl`` is the line
loop it shares with the data reader of ``harness.tasks.longbench``."""
