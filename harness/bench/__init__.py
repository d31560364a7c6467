"""Benchmarks: what each method costs and saves on a GPU (``speed``, ``make bench``) and the same
measurement for kvpress (``kvpress``, run in a subprocess with kvpress's own transformers).

May import: ``harness.engine``, ``harness.config`` (where the model configs are), ``harness.run.results``
(file helpers), ``methods``. ``kvpress`` imports nothing of the harness (it runs where
only kvpress and its transformers are on the path).
"""
