"""One run, from a composed config to result files: ``runner`` (plan: every check that needs no model;
run: samples, generation, rows, scores), ``results`` (the JSONL store, manifests, quarantine),
``identity`` (what a results folder belongs to, resume rules), ``distributed`` (data parallel over
``torchrun``), ``progress`` (the progress bar over (sample, method) generations).

May import: ``harness.engine``, ``harness.tasks``, ``harness.protocol``, ``harness.config``, ``methods``;
``harness.report.wandb_log`` only when W&B logging is on. Never imported by ``harness.engine`` except
``results``' file helpers.
"""
