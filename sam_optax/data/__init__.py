"""The data axis: which examples share a perturbation (m-sharpness shards:
chunks inside a device, devices of a mesh) and which enter the second pass
(ESAM's sharpness-sensitive data selection). Build it with :func:`shards`."""

from sam_optax.data._axis import DataAxis, shards
from sam_optax.data._selection import DataSelection, sharpness_sensitive
from sam_optax.data._shards import (
    as_device_varying,
    batch_size,
    chunk_mean,
    num_chunks,
    shard_mean,
    split,
)

__all__ = [
    "DataAxis",
    "DataSelection",
    "as_device_varying",
    "batch_size",
    "chunk_mean",
    "num_chunks",
    "shard_mean",
    "sharpness_sensitive",
    "shards",
    "split",
]
