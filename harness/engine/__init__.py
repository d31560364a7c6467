"""The generation engine: everything between a tokenised prompt and its greedy generations.

``models`` loads a model and tokenizer; ``hook`` attaches a ``KVCompressor`` to a model's attention
modules for one prefill; ``cache`` holds the compressed cache layers; ``generate`` prefills and decodes
one compressor plainly; ``batched`` decodes many caches from fixed-shape slot buffers; ``shared`` is the
public entry for a sweep: one prompt, one prefill, a list of compressors, their generations; ``stopping``
holds the stop rule both decode paths apply; ``compat`` is the one place that knows transformers'
conventions; ``hub`` checks in seconds that a file the hub should give can be had (or is cached).
``transform`` is the second kind of attachment: per-token K/V transforms (``methods.lowrank``: DynaKV and
its low-rank baselines) on every token's pre-RoPE key and value, with calibration states from the same points.
``posttrain`` trains DynaKV's gates (CE + alpha * R^2, the backbone frozen).

May import: ``methods``, torch, transformers, and ``harness.run.results`` (file helpers). Never imports
``harness.run.runner``, ``harness.tasks``, ``harness.report`` or ``harness.bench``.
"""

from harness.engine.shared import generate_many  # the public entry: one prompt, many compressors

__all__ = ["generate_many"]
