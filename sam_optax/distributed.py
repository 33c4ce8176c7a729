"""Multi-host data parallelism with JAX's own runtime (``jax.distributed``).

Nothing here communicates by itself: a global :class:`jax.sharding.Mesh` over the
devices of every process, global arrays built from each process's local data,
and :func:`sam_optax.sharpness_aware_grad` with ``data=shards(mesh=mesh)`` (``jax.shard_map`` over
the data axis: each device perturbs with its own gradient, and XLA's collectives
average the gradients over all devices of all hosts).

A step on a pod, one process per host::

    jax.distributed.initialize()                  # coordinator etc. from the cluster environment
    mesh = sam_optax.distributed.data_mesh()      # all devices of all hosts, axis "data"
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry, sam_optax.data.shards(mesh=mesh))
    params = sam_optax.distributed.replicate(params, mesh)
    state = jax.jit(init)(params)
    step = jax.jit(step)
    for local_batch in my_hosts_data():           # this host's share of the global batch
        batch = sam_optax.distributed.global_batch(local_batch, mesh)
        params, state, out = step(params, state, batch)
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def data_mesh(axis_name: str = "data", devices: Optional[list] = None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices of all processes (``Auto`` axis), in
    ``jax.devices()`` order: process by process, so that each process's local
    data is one contiguous block of the global batch."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, axis_name: Optional[str] = None) -> Any:
    """The global batch, sharded over the data axis, from this process's share.

    Every process passes its own ``[B / num_processes, ...]`` block; the global
    array concatenates them in process order (``jax.make_array_from_process_local_data``).
    """
    axis = axis_name or mesh.axis_names[0]
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Global, fully replicated copies of ``tree`` (identical values on every process)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
    """numpy copies of replicated global arrays (each process reads its own replica)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
