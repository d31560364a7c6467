"""Benchmarks: what each method costs and saves on a GPU (``speed``, ``make bench``) and the same
measurement for kvpress (``kvpress``, run in a subprocess with kvpress's own transformers).

May import: ``harness.engine``, ``methods``. ``kvpress`` imports nothing of the harness (it runs where
only kvpress and its transformers are on the path).
"""
