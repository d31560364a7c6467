"""Pure tensor algorithms for KV-cache compression (torch only: no transformers, hydra or I/O).

    from methods import build
    compressor = build("snapkv", budget=128, window_size=32, kernel_size=7, pooling="maxpool",
                       granularity="query_head")
    kept = compressor.compress_all(keys, values, queries)
"""

from methods import dynamickv, fullkv, h2o, pyramidkv, snapkv, streamingllm  # noqa: F401  (registration)
from methods.base import (
                          REGISTRY,
                          CompressionSession,
                          ConfigError,
                          Kept,
                          KVCompressor,
                          UniformCompressor,
                          build,
                          register,
)

__all__ = ["REGISTRY", "CompressionSession", "ConfigError", "Kept", "KVCompressor",
           "UniformCompressor", "build", "register"]
