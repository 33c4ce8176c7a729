"""The data axis: splitting a batch into m-sharpness shards, and averaging over them.

A *shard* is a disjoint group of ``m`` examples that computes its own
perturbation (SAM section 5.1). Shards live on two levels that compose:

* **devices**: under ``jax.shard_map`` / ``jax.pmap`` (a named mesh axis), each
  device's local batch is one shard or is split further;
* **chunks**: inside one device the local batch is reshaped to ``[C, m, ...]``
  and the two-pass body is ``vmap``-ed (or ``scan``-ned) over ``C``.

Results are averaged over the chunks of a device (:func:`chunk_mean`), then
over devices with ``lax.pmean`` (:func:`shard_mean`). A batch that ``jit``
received sharded over devices has its chunks grouped by device first
(:func:`device_groups`), and those groups are averaged with
:func:`device_mean`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def batch_size(batch: Any) -> int:
    """Leading dimension shared by every leaf of ``batch``; ValueError otherwise.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> print(sam_optax.data.batch_size({"x": jnp.zeros((8, 3)), "y": jnp.zeros(8)}))
      8
      >>> sam_optax.data.batch_size({"x": jnp.zeros((8, 3)), "y": jnp.zeros(4)})
      Traceback (most recent call last):
      ...
      ValueError: every leaf of batch must have the same leading (batch) dimension; got shapes [(8, 3), (4,)].
    """
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(batch)}
    if not sizes:
        raise ValueError("batch has no array leaves: nothing to split into shards.")
    if -1 in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
        raise ValueError(f"every leaf of batch must have the same leading (batch) dimension; got shapes {shapes}.")
    return sizes.pop()


_AVERAGED_OUTSIDE: contextvars.ContextVar = contextvars.ContextVar("averaged_outside", default=frozenset())


def _explicit_leading_axes(batch: Any) -> tuple[tuple[str, ...], int]:
    """The Explicit mesh axes sharding the leading axis of every leaf of ``batch``
    (from the leaves' types) and their total size; ValueError if leaves disagree."""
    found = {}
    for x in jax.tree.leaves(batch):
        sharding = jax.typeof(x).sharding
        spec: Any = sharding.spec if isinstance(sharding, jax.sharding.NamedSharding) else ()
        first = spec[0] if len(spec) else None
        names = () if first is None else (tuple(first) if isinstance(first, tuple) else (first,))
        types = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_types)) if names else {}
        names = tuple(a for a in names if types.get(a) == jax.sharding.AxisType.Explicit)
        found[names] = int(np.prod([sharding.mesh.shape[a] for a in names])) if names else 1
    if len(found) > 1:
        raise ValueError(
            f"every leaf of batch must be sharded alike over its leading (batch) axis; got mesh axes {list(found)}."
        )
    return next(iter(found.items())) if found else ((), 1)


def device_groups(batch: Any, n: int) -> tuple[tuple[str, ...], int]:
    """How the ``n`` chunks of a batch that ``jit`` received sharded are grouped
    by device: ``(mesh axes for spmd_axis_name, number of groups)``.

    * Explicit mesh axes: the batch's type names the axes of its leading axis;
      one group per device of those axes.
    * Auto mesh axes: the type says nothing; under ``jax.set_mesh(mesh)`` (no
      manual axes) there are ``gcd(n, devices of the Auto axes)`` groups,
      a multiple of the number of batch shards whenever it divides ``n``, and
      the partitioner places the groups where the examples are.
    * Otherwise one group: inside ``shard_map`` / ``pmap`` or the device layout
      of ``shards(mesh=...)`` (the batch is one device's), or on an Auto mesh
      outside ``jax.set_mesh`` (the chunks as they are: there only
      ``chunk_mode='vmap'`` avoids moving examples between devices).
    """
    axes, size = _explicit_leading_axes(batch)
    if axes:
        return axes, size
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes or _AVERAGED_OUTSIDE.get():  # already one device's batch
        return (), 1
    auto = [mesh.shape[a] for a, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Auto]
    return (), math.gcd(n, int(np.prod(auto)) if auto else 1)


def num_chunks(local_batch: int, m: int | None, *, where: str = "batch") -> int:
    """Number of m-sharpness chunks in a local batch; ValueError if not divisible.

    Examples:
      >>> import sam_optax
      >>> print(sam_optax.data.num_chunks(8, 4), sam_optax.data.num_chunks(8, None))
      2 1
      >>> sam_optax.data.num_chunks(6, 4)
      Traceback (most recent call last):
      ...
      ValueError: m=4 must divide the batch size 6 (each shard of m examples computes its own perturbation).
    """
    if m is None:
        return 1
    if local_batch == 0:
        raise ValueError(f"the {where} has 0 examples: nothing to split into shards of m={m}.")
    if local_batch % m:
        raise ValueError(
            f"m={m} must divide the {where} size {local_batch} "
            f"(each shard of m examples computes its own perturbation)."
        )
    return local_batch // m


def split(batch: Any, num: int) -> Any:
    """Reshapes every leaf ``[B, ...] -> [num, B // num, ...]`` (contiguous shards).

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> chunks = sam_optax.data.split({"x": jnp.arange(6)}, 3)
      >>> print(chunks["x"].tolist())
      [[0, 1], [2, 3], [4, 5]]
    """
    return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def axis_tuple(axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def manual_axes() -> tuple[str, ...]:
    """Mesh axes that are manual here (inside ``shard_map`` or ``pmap``)."""
    try:
        return tuple(jax.sharding.get_abstract_mesh().manual_axes)
    except Exception:  # pragma: no cover - outside any mesh context
        return ()


def as_device_varying(tree: Any, axis_names: Sequence[str]) -> Any:
    """Marks replicated values as varying over the manual axes in ``axis_names``.

    Inside ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` with respect to
    device-invariant params comes back already summed over the devices, which
    would silently turn per-device m-sharpness into ``n_devices x`` global SAM.
    Casting the params to *varying* first gives each device its own local
    gradient. A no-op outside ``shard_map``/``pmap`` and under ``vmap``.

    Examples:
      One example :math:`x = 2` per device and the loss :math:`w x`: the gradient
      of the replicated :math:`w` comes back summed over the :math:`n` devices
      (:math:`2n`); cast to varying first, each device gets its own (2).

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> import sam_optax
      >>> mesh = sam_optax.distributed.data_mesh(axis_name="d")
      >>> def grads(w, x):
      ...     summed = jax.grad(lambda v: jnp.sum(v * x))(w)
      ...     local = jax.grad(lambda v: jnp.sum(v * x))(sam_optax.data.as_device_varying(w, ["d"]))
      ...     return summed[None], local[None]
      >>> f = jax.shard_map(grads, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P("d"), P("d")))
      >>> summed, local = f(jnp.ones(1), jnp.full((jax.device_count(),), 2.0))
      >>> print(float(summed[0, 0]) == 2.0 * jax.device_count(), set(local[:, 0].tolist()))
      True {2.0}
    """
    manual = set(manual_axes())
    names = tuple(a for a in axis_names if a in manual)
    if not names:
        return tree

    def leaf(x):
        varying = jax.typeof(x).manual_axis_type.varying
        missing = tuple(a for a in names if a not in varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(leaf, tree)


def explicit_sharding(s: Any) -> Any:
    """The sharding of ``s`` (a ShapeDtypeStruct or an abstract value) if its
    mesh has Explicit axes (sharding in types: a value made to match it must
    carry it), else ``None``."""
    sharding = getattr(s, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    mesh = sharding.mesh
    return sharding if jax.sharding.AxisType.Explicit in tuple(mesh.axis_types) else None


def zeros_varying_like(shapes: Any, like: Any) -> Any:
    """Zeros of ``shapes`` (ShapeDtypeStructs; floats widened to float32), varying
    over the same manual mesh axes as the array ``like``: the initial carry of a
    ``lax.scan`` whose body mixes in values derived from ``like``. On a mesh with
    Explicit axes the zeros take the sharding of ``shapes`` (e.g. a gradient
    sharded like its tensor-parallel parameter), so the carry's type matches."""
    varying = () if like is None else tuple(sorted(jax.typeof(like).manual_axis_type.varying))

    def leaf(s):
        dtype = jnp.promote_types(s.dtype, jnp.float32) if jnp.issubdtype(s.dtype, jnp.inexact) else s.dtype
        sharding = explicit_sharding(s)
        z = jnp.zeros(s.shape, dtype) if sharding is None else jnp.zeros(s.shape, dtype, out_sharding=sharding)
        return jax.lax.pcast(z, varying, to="varying") if varying else z

    return jax.tree.map(leaf, shapes)


@contextlib.contextmanager
def averaged_outside(axis_names: Sequence[str]) -> Iterator[None]:
    """While tracing inside, :func:`shard_mean` leaves ``axis_names`` alone: the
    caller maps them with ``jax.vmap`` and averages the stacked results itself
    (in jax 0.10.2 ``lax.pmean`` under a ``vmap`` with ``spmd_axis_name`` fails to
    lower on Explicit meshes)."""
    token = _AVERAGED_OUTSIDE.set(_AVERAGED_OUTSIDE.get() | frozenset(axis_names))
    try:
        yield
    finally:
        _AVERAGED_OUTSIDE.reset(token)


def shard_mean(tree: Any, axis_names: Sequence[str]) -> Any:
    """Mean over the shards of the named axes; floating leaves are averaged in
    (at least) float32 and returned in their dtype, other leaves take the max.

    Examples:
      Under ``jax.vmap`` with an axis name (as under ``shard_map``): floats are
      averaged, integers take the max.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> mean = jax.vmap(lambda x: sam_optax.data.shard_mean(x, ["i"]), axis_name="i")
      >>> print(mean(jnp.array([1.0, 2.0, 6.0])).tolist(), mean(jnp.array([1, 2, 6])).tolist())
      [3.0, 3.0, 3.0] [6, 6, 6]
    """
    outside = _AVERAGED_OUTSIDE.get()
    names = tuple(a for a in axis_names if a not in outside)
    if not names:
        return tree

    def leaf(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            for name in names:
                wide = jax.lax.pmean(wide, name)
            return wide.astype(x.dtype)
        for name in names:
            x = jax.lax.pmax(x, name)
        return x

    return jax.tree.map(leaf, tree)


def device_mean(stacked: Any, num_axes: int = 1) -> Any:
    """Mean over the ``num_axes`` leading (device) axes of every leaf, in at least
    float32 for floating leaves (returned in their dtype); other leaves take the
    max. A plain reduction, so that it also applies to axes sharded over
    Explicit mesh axes (the partitioner adds one all-reduce)."""
    axes = tuple(range(num_axes))

    def leaf(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            return jnp.mean(wide, axis=axes).astype(x.dtype)
        return jnp.max(x, axis=axes)

    return jax.tree.map(leaf, stacked)


def chunk_mean(stacked: Any) -> Any:
    """Mean over the leading (chunk) axis, in at least float32 for floating leaves
    (returned in their dtype); other leaves take the max.

    The mean is a contraction with a vector of ``1/C`` at the highest matmul
    precision: XLA:CPU runs a reduction over a short leading axis of a wide array
    (``[C, N].mean(0)``) up to 100x slower than this.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> stacked = {"loss": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "count": jnp.array([3, 5])}
      >>> out = sam_optax.data.chunk_mean(stacked)
      >>> print(out["loss"].tolist(), int(out["count"]))
      [2.0, 3.0] 5
    """

    def leaf(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            weights = jnp.full((x.shape[0],), 1.0 / x.shape[0], wide.dtype)
            mean = jnp.tensordot(weights, wide, axes=1, precision=jax.lax.Precision.HIGHEST)
            return mean.astype(x.dtype)
        return jnp.max(x, axis=0)

    return jax.tree.map(leaf, stacked)


def list_mean(results: Any) -> Any:
    """Mean of a list of equally structured pytrees (unrolled adds in at least
    float32 for floating leaves, returned in their dtype); other leaves: max."""

    def leaf(*xs):
        x0 = jnp.asarray(xs[0])
        if jnp.issubdtype(x0.dtype, jnp.inexact):
            wide = jnp.promote_types(x0.dtype, jnp.float32)
            return (sum(jnp.asarray(x, wide) for x in xs) / len(xs)).astype(x0.dtype)
        out = xs[0]
        for x in xs[1:]:
            out = jnp.maximum(out, x)
        return out

    return jax.tree.map(leaf, *results)
