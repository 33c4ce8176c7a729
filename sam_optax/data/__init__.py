"""The data/sharding axis: which examples share a perturbation (m-sharpness)."""

from sam_optax.data._shards import (
    as_device_varying,
    axis_tuple,
    batch_size,
    chunk_mean,
    num_chunks,
    shard_mean,
    split,
)

__all__ = [
    "as_device_varying",
    "axis_tuple",
    "batch_size",
    "chunk_mean",
    "num_chunks",
    "shard_mean",
    "split",
]
