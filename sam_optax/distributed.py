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
    state = init(params)                          # placed on the mesh where the step leaves it
    step = jax.jit(step)
    for local_batch in my_hosts_data():           # this host's share of the global batch
        batch = sam_optax.distributed.global_batch(local_batch, mesh)
        params, state, out = step(params, state, batch)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["abstract_like", "data_mesh", "global_batch", "is_placed", "place", "replicate", "to_host"]


def data_mesh(axis_name: str = "data", devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over all devices of all processes (``Auto`` axis), in
    ``jax.devices()`` order: process by process, so that each process's local
    data is one contiguous block of the global batch.

    Examples:
      >>> import jax
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh()
      >>> print(mesh.axis_names, mesh.size == jax.device_count())
      ('data',) True
    """
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, axis_name: str | None = None) -> Any:
    """The global batch, sharded over the data axis, from this process's share.

    Every process passes its own ``[B / num_processes, ...]`` block; the global
    array concatenates them in process order (``jax.make_array_from_process_local_data``).

    Examples:
      One process: its share is the whole batch, 2 examples per device, and
      device 0 holds the first two.

      >>> import jax
      >>> import numpy as np
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh()
      >>> n = jax.device_count()
      >>> batch = sam_optax.distributed.global_batch({"x": np.arange(2.0 * n)}, mesh)
      >>> print(batch["x"].shape == (2 * n,), batch["x"].addressable_data(0).tolist())
      True [0.0, 1.0]
    """
    axis = axis_name or mesh.axis_names[0]
    sharding = NamedSharding(mesh, P(axis))
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Global, fully replicated copies of ``tree`` (identical values on every process).

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh()
      >>> params = sam_optax.distributed.replicate({"w": jnp.array([1.0, 2.0])}, mesh)
      >>> print(params["w"].sharding.is_fully_replicated, params["w"].tolist())
      True [1.0, 2.0]
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
    """numpy copies of replicated global arrays (each process reads its own replica).

    Examples:
      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh()
      >>> params = sam_optax.distributed.replicate({"w": jnp.array([1.0, 2.0])}, mesh)
      >>> host = sam_optax.distributed.to_host(params)
      >>> print(isinstance(host["w"], np.ndarray), host["w"].tolist())
      True [1.0, 2.0]
    """
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _canonical(mesh: jax.sharding.Mesh, spec: P, ndim: int) -> NamedSharding:
    """``NamedSharding(mesh, spec)`` spelled as a jitted step returns it, so that
    the step's outputs hit the same compilation as its inputs: on a mesh with
    Explicit axes the spec has one entry per dimension (``P(None, None)``), on
    an Auto mesh trailing ``None`` entries are dropped (``P()``)."""
    parts = list(spec)[:ndim]
    if AxisType.Explicit in tuple(mesh.axis_types):
        parts += [None] * (ndim - len(parts))
    else:
        while parts and parts[-1] is None:
            parts.pop()
    return NamedSharding(mesh, P(*parts))


def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` on ``sharding`` (unchanged if it is already there)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable or isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    # a host value (or one process's copy) for a mesh spanning several processes
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def _on_mesh_spec(x: Any, mesh: jax.sharding.Mesh) -> P | None:
    """The spec of ``x`` if it is a global array or ShapeDtypeStruct already sharded on ``mesh``."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
        return sharding.spec
    return None


def _like_subtrees(tree: Any, like: optax.Params) -> Any:
    """``tree`` with every subtree shaped like ``like`` (same structure and leaf
    shapes: a copy of the parameters in an optimizer state) replaced by a
    marker pairing it with ``like``."""
    structure = jax.tree.structure(like)
    shapes = [np.shape(x) for x in jax.tree.leaves(like)]

    def matches(t):
        if t is None or jax.tree.structure(t) != structure:
            return False
        return [np.shape(x) for x in jax.tree.leaves(t)] == shapes

    return jax.tree.map(lambda t: _Like(t) if matches(t) else t, tree, is_leaf=matches)


class _Like:
    """A subtree of the state shaped like the parameters (a leaf for ``jax.tree.map``)."""

    def __init__(self, tree):
        self.tree = tree


def place(tree: Any, mesh: jax.sharding.Mesh, like: optax.Params | None = None) -> Any:
    """Puts every array of ``tree`` on ``mesh``, where a jitted step leaves it.

    * a subtree shaped like ``like`` (the parameters: same structure and leaf
      shapes, e.g. Adam's moments in an optimizer state) takes the sharding of
      ``like``'s leaves (those on ``mesh``; the others are replicated);
    * any other leaf already sharded on ``mesh`` keeps its sharding;
    * everything else (counters, random keys, single-device arrays, numpy
      values) is replicated, ``NamedSharding(mesh, P())``.

    Specs are spelled as a jitted step returns them, so the step compiles once:
    placed with this, the inputs of step 1 have the shardings of its outputs.
    Arrays already in place are returned as they are (no copy). Call it
    outside ``jit``; on several processes every process passes the same values
    for the replicated leaves.

    Args:
      tree: a pytree of arrays (parameters, an optimizer state, a Flax
        ``TrainState``, an NNX ``nnx.State``).
      mesh: the global mesh.
      like: optional pytree of arrays (or ``jax.ShapeDtypeStruct`` with
        shardings), usually the already placed parameters.

    Returns:
      ``tree`` with every array on ``mesh``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> mesh = sam_optax.distributed.data_mesh(devices=jax.devices()[:1])
      >>> params = sam_optax.distributed.place({"w": jnp.zeros(3)}, mesh)
      >>> state = sam_optax.distributed.place(optax.adam(1e-3).init(params), mesh, like=params)
      >>> state[0].mu["w"].sharding == params["w"].sharding
      True
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}.")

    def leaf(x, spec=None):
        if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
            return x
        spec = _on_mesh_spec(x, mesh) if spec is None else spec
        return _put(x, _canonical(mesh, P() if spec is None else spec, np.ndim(x)))

    def node(t):
        if not isinstance(t, _Like):
            return leaf(t)
        specs = [_on_mesh_spec(p, mesh) for p in jax.tree.leaves(like)]
        leaves = [leaf(x, P() if s is None else s) for x, s in zip(jax.tree.leaves(t.tree), specs)]
        return jax.tree.unflatten(jax.tree.structure(t.tree), leaves)

    if like is not None:
        tree = _like_subtrees(tree, like)
    return jax.tree.map(node, tree, is_leaf=lambda t: isinstance(t, _Like))


def is_placed(tree: Any, mesh: jax.sharding.Mesh) -> bool:
    """Whether every array of ``tree`` is on ``mesh`` with a spec spelled as a
    jitted step returns it (cheap: no shardings are built or compared beyond
    the mesh). Tracers and non-array leaves count as placed.

    Examples:
      A host value is not on the mesh; after :func:`place` it is:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh()
      >>> state = {"count": np.zeros((), np.int32), "w": jnp.zeros(3)}
      >>> print(sam_optax.distributed.is_placed(state, mesh))
      False
      >>> print(sam_optax.distributed.is_placed(sam_optax.distributed.place(state, mesh), mesh))
      True
    """
    explicit = AxisType.Explicit in tuple(mesh.axis_types)
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
            continue
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding) or sharding.mesh != mesh:
            return False
        spec = sharding.spec
        if (len(spec) != np.ndim(x)) if explicit else (len(spec) and spec[-1] is None):
            return False
    return True


def abstract_like(tree: Any) -> Any:
    """The restore target of an orbax checkpoint of ``tree``, on ``tree``'s devices.

    Every array becomes ``jax.ShapeDtypeStruct(x.shape, x.dtype,
    sharding=x.sharding)``, so ``ocp.StandardCheckpointer().restore(path,
    abstract_like(state))`` puts every leaf back where the live state has it
    (sharded or replicated on the mesh), and the resumed step neither fails
    ("incompatible devices") nor compiles again. Other leaves are kept.

    Args:
      tree: a live pytree of arrays (e.g. a fresh state placed with
        :func:`place`, or ``nnx.state((model, optimizer))``).

    Returns:
      The pytree of ``jax.ShapeDtypeStruct``.

    Examples:
      >>> import jax, jax.numpy as jnp, sam_optax
      >>> sam_optax.distributed.abstract_like({"w": jnp.zeros(3)})["w"].shape
      (3,)
    """

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)
