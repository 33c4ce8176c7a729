"""The data/sharding axis: which examples share a perturbation (m-sharpness),
and which enter the second pass (ESAM's sharpness-sensitive data selection)."""

from sam_optax.data._selection import DataSelection, sharpness_sensitive

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
    "DataSelection",
    "sharpness_sensitive",
    "as_device_varying",
    "axis_tuple",
    "batch_size",
    "chunk_mean",
    "num_chunks",
    "shard_mean",
    "split",
]
