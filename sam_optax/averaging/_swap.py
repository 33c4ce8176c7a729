"""SWAP (Stochastic Weight Averaging in Parallel): helpers for its phases 2 and 3."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.averaging import _common


def replicate(tree: Any, num_replicas: int) -> Any:
    r"""SWAP phase 2 start: ``num_replicas`` independent copies stacked on a new leading axis.

    Use it on the phase-1 weights (and optimizer state, or re-``init`` a vmapped
    optimizer on the stacked weights), then train the replicas with
    ``jax.vmap(step)`` over that axis, each replica with its own data order
    (e.g. its own permutation key). To lay the replicas out on devices instead,
    put the stacked arrays on a mesh axis,
    ``jax.device_put(stacked, NamedSharding(mesh, P("replica")))``: the jitted
    vmapped step is then partitioned over it, with no communication in phase 2.

    Args:
      tree: a pytree of arrays.
      num_replicas: ``W >= 1``.

    Returns:
      The pytree with every leaf of shape ``(W, *leaf.shape)`` (fresh arrays).

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> stacked = sam_optax.averaging.replicate({"w": jnp.array([1.0, 2.0])}, 3)
      >>> print(stacked["w"].shape, stacked["w"][2].tolist())
      (3, 2) [1.0, 2.0]

    References:
      Gupta et al, `Stochastic Weight Averaging in Parallel: Large-Batch Training
      that Generalizes Well <https://arxiv.org/abs/2001.02312>`_, ICLR 2020
    """
    _common.check_int("num_replicas", num_replicas, low=1)
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x)[None], num_replicas, axis=0), tree)


def average_replicas(stacked: optax.Params, axis: int = 0) -> optax.Params:
    r"""SWAP phase 3: the mean of the replicas' weights, :math:`w = \frac1W\sum_k w^{(k)}`.

    The mean is computed in (at least) float32 and returned in each leaf's dtype.
    Then recompute BatchNorm statistics for the averaged weights
    (:func:`recompute_batch_stats` / :func:`recompute_batch_stats_nnx`): the
    replicas' own running statistics do not describe the averaged network.

    Args:
      stacked: a pytree whose leaves hold the replicas along ``axis``.
      axis: the replica axis.

    Returns:
      The averaged pytree (``axis`` removed).

    Examples:
      The mean of the replicas :math:`(1, 2), (3, 4), (5, 6)` is :math:`(3, 4)`:

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> stacked = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
      >>> print(sam_optax.averaging.average_replicas(stacked)["w"].tolist())
      [3.0, 4.0]

    References:
      Gupta et al, `Stochastic Weight Averaging in Parallel: Large-Batch Training
      that Generalizes Well <https://arxiv.org/abs/2001.02312>`_, ICLR 2020
    """
    return jax.tree.map(lambda x: jnp.mean(_utils.to_compute(x), axis=axis).astype(jnp.asarray(x).dtype), stacked)
