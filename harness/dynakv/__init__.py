"""DynaKV (arXiv 2603.04411) around the model: checkpoints of PCA bases and gates (``checkpoint``), text
windows (``data``), calibration, post-training and measurement (``train``), the kept-ranks figure
(``ranks``), row accounting (``accounting``) and the ``kvh dynakv`` command (``cli``). The algorithms are in
``methods.lowrank``, the K/V transform hook in ``harness.engine.transform``."""
