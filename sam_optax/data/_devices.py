"""The device layout: running the per-device two-pass function over the data axes of a mesh.

Only the m-sharpness data axes (``data.axis_name``) are mapped; every other
mesh axis stays with the partitioner, so parameters sharded over it (tensor
parallel over ``model``, FSDP over another axis) stay sharded, and so do the
gradients, the perturbation and the ascent state computed from them.

* On a mesh whose other axes are ``Auto`` (or that has no other axes) the map
  is ``jax.shard_map(..., axis_names=set(data.axis_name))``, partial-manual.
* On a mesh with ``Explicit`` axes besides the data axes it is a ``jax.vmap``
  over a ``[n_devices, B / n_devices, ...]`` view of the batch with
  ``spmd_axis_name`` (and ``axis_name``, for ``lax.axis_index``); the stacked
  per-device results are averaged after the ``vmap``. Measured in jax 0.10.2:
  a partial-manual ``shard_map`` lowers the non-manual Explicit axes of its
  inputs and outputs as *replicated* (``sdy.manual_computation`` with closed,
  empty dimension shardings), so every parameter sharded over them is
  all-gathered on entry and re-sliced on exit, whatever ``in_specs`` say; and
  ``lax.pmean`` under a ``vmap`` with ``spmd_axis_name`` fails on Explicit
  meshes (an ``AssertionError`` or a sharding ``ValueError`` from the reduced
  value's type), so a ``loss_fn`` that itself reduces over a data axis
  (cross-device BatchNorm) needs an Auto mesh there.
* Without a mesh the function runs as it is (one device, a batch that ``jit``
  partitions, or the caller's ``shard_map`` / ``pmap``), its gradients put in
  the sharding group of the parameters (``shard_alike``): on an Auto mesh the
  partitioner otherwise returns FSDP gradients replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental.shard_alike import shard_alike
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from sam_optax.data import _shards
from sam_optax.data._axis import DataAxis


def _explicit(mesh: jax.sharding.Mesh, axes: tuple[str, ...], inside: bool) -> bool:
    """Whether a mesh axis in (``inside``) / outside ``axes`` is Explicit."""
    return any(t == AxisType.Explicit and ((a in axes) == inside) for a, t in zip(mesh.axis_names, mesh.axis_types))


def _batch_spec(axes: tuple[str, ...]) -> P:
    return P(axes if len(axes) > 1 else axes[0])


def _shard_mapped(local: Callable[..., Any], mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> Callable[..., Any]:
    """``local`` under a ``shard_map`` manual over ``axes`` only; the outputs are
    device-invariant over ``axes`` (``local`` ``pmean``-s them)."""
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), _batch_spec(axes), P(), P(), P()),
        out_specs=P(),
        axis_names=set(axes),
        check_vma=True,
    )


def _vmapped(local: Callable[..., Any], mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> Callable[..., Any]:
    """``local`` vmapped over one leading batch axis per mesh axis of ``axes``
    (each with ``axis_name`` and ``spmd_axis_name`` that axis): the same
    per-device program as the ``shard_map``, with the partitioner keeping every
    other mesh axis as it is. The per-device results come out stacked and are
    averaged here (``lax.pmean`` under such a ``vmap`` fails to lower on
    Explicit meshes in jax 0.10.2)."""
    sizes = tuple(mesh.shape[a] for a in axes)

    def run(params, batch, args, state, flag):
        def view(x):
            return x.reshape(sizes + (x.shape[0] // int(np.prod(sizes)),) + x.shape[1:])

        f = local
        for a in reversed(axes):
            f = jax.vmap(f, in_axes=(None, 0, None, None, None), out_axes=(0, None), axis_name=a, spmd_axis_name=a)
        # use_abstract_mesh: as inside shard_map, bare P(...) name this mesh's axes
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), _shards.averaged_outside(axes):
            stacked, new_state = f(params, jax.tree.map(view, batch), args, state, flag)
        return _shards.device_mean(stacked, len(axes)), new_state

    return run


def _like_params(params: optax.Params, grads: optax.Updates) -> optax.Updates:
    """``grads`` in the same sharding group as ``params`` (``shard_alike``): on an
    Auto mesh the partitioner would otherwise choose the gradients' sharding
    itself (measured: replicated, all-reduced, for FSDP parameters). Leaves whose
    type already carries Explicit axes are left to their types."""

    def leaf(p, g):
        if _shards.explicit_sharding(jax.typeof(p)) is not None or jnp.shape(p) != jnp.shape(g):
            return g
        return shard_alike(p, g)[1]

    return jax.tree.map(leaf, params, grads)


def _without_mesh(local: Callable[..., Any]) -> Callable[..., Any]:
    """``local`` as it is (one device, a jit-partitioned batch, or the caller's
    own ``shard_map`` / ``pmap``), its gradients sharded like the parameters."""

    def run(params, batch, args, state, flag):
        res, new_state = local(params, batch, args, state, flag)
        if jax.tree.structure(res.grads) != jax.tree.structure(params):
            return res, new_state
        like = lambda g: _like_params(params, g)  # noqa: E731
        return res._replace(grads=like(res.grads), perturbed_grads=like(res.perturbed_grads)), new_state

    return run


def on_mesh(local: Callable[..., Any], data: DataAxis) -> Callable[..., Any]:
    """``local(params, batch, args, state, flag)`` run over the data axes of ``data.mesh``.

    The batch is split over ``data.axis_name`` (contiguous blocks, in the
    mesh's device order); everything else keeps its sharding over the other
    mesh axes. ``local`` averages its results over the devices (``lax.pmean``
    over ``data.axis_name``), so the outputs are the same on every device of
    the data axes and sharded like the parameters over the others. Without a
    mesh, ``local`` runs as it is (under ``jit`` the partitioner spreads it
    over the devices of the arguments' shardings) and its gradients are
    sharded like the parameters.

    Args:
      local: the per-device function of :func:`sam_optax.sharpness_aware_grad`.
      data: the data axis.

    Returns:
      ``run(params, batch, args, state, flag) -> (results, new_state)``.
    """
    if data.mesh is None:
        return _without_mesh(local)
    mesh, axes = data.mesh, data.axis_name
    n_dev = int(np.prod([mesh.shape[a] for a in axes]))
    if _explicit(mesh, axes, inside=False):
        mapped = _vmapped(local, mesh, axes)
    else:
        mapped = _shard_mapped(local, mesh, axes)
    reshard = _explicit(mesh, axes, inside=True)
    sharding = NamedSharding(mesh, _batch_spec(axes))

    def run(params, batch, args, state, flag):
        size = _shards.batch_size(batch)
        if size % n_dev:
            raise ValueError(
                f"the batch size {size} must be divisible by the number of devices {n_dev} on mesh axes {axes}."
            )
        if reshard:
            batch = jax.tree.map(lambda x: jax.sharding.reshard(x, sharding), batch)
        return mapped(params, batch, args, state, flag)

    return run
