"""Data selection for the second pass: ESAM's sharpness-sensitive data selection (SDS)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils


class DataSelection(NamedTuple):
    """Which examples of a shard enter the second (perturbed) gradient pass.

    Attributes:
      fraction: the fraction ``gamma`` of each shard that is kept.
    """

    fraction: float

    def size(self, n: int) -> int:
        """Static number of examples kept out of ``n``: ``max(1, floor(gamma n))``."""
        return max(1, int(math.floor(self.fraction * n + 1e-9)))

    def select(self, clean_losses: jax.Array, perturbed_losses: jax.Array) -> jax.Array:
        """Indices of the kept examples: the ``size(n)`` largest loss increases.

        Ties are broken towards the lower index (``lax.top_k`` is stable), so the
        choice is deterministic. The difference is taken in at least float32
        (float64 losses stay float64).
        """
        dtype = jnp.promote_types(_utils.compute_dtype(perturbed_losses), _utils.compute_dtype(clean_losses))
        sharpness = perturbed_losses.astype(dtype) - clean_losses.astype(dtype)
        _, idx = jax.lax.top_k(sharpness, self.size(sharpness.shape[0]))
        return idx


def sharpness_sensitive(gamma: float = 0.5) -> DataSelection:
    r"""ESAM's Sharpness-sensitive Data Selection (SDS).

    After the perturbation :math:`\hat\epsilon` of a shard is made, the
    per-example losses at :math:`w + \hat\epsilon` are computed (one forward
    pass, no gradient) and only the examples with the largest loss increase

    .. math::

      B^+ = \{ i : \ell_i(w + \hat\epsilon) - \ell_i(w) \text{ among the }
      \lfloor \gamma |B| \rfloor \text{ largest} \}

    enter the second gradient pass, :math:`\tilde g = \nabla L_{B^+}(w + \hat\epsilon)`.
    The subset size is static (fixed by ``gamma`` and the shard size), so it
    works under ``jit`` and per m-sharpness shard. ``gamma = 1`` keeps every
    example and skips the extra forward pass: exactly SAM.

    Pass it as ``sharpness_aware_grad(loss_fn, geometry, sam_optax.data.shards(selection=sharpness_sensitive(0.5)))``
    with a ``loss_fn`` that returns per-example losses (a vector).

    Cost: the second pass runs on the ``gamma`` fraction only (fwd + bwd), at the
    price of one extra forward pass over the whole shard. The official code keeps
    the examples *strictly* above the k-th largest (k - 1 examples); here exactly
    ``max(1, floor(gamma n))`` are kept, as in the paper.

    Args:
      gamma: fraction of each shard kept, ``0 < gamma <= 1``.

    Returns:
      A :class:`DataSelection`.

    Examples:
      With :math:`\gamma = 0.5` a shard of 4 keeps the 2 examples whose loss rose
      most (by 0.4 and 0.3: examples 1 and 3):

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> selection = sam_optax.data.sharpness_sensitive(0.5)
      >>> print(selection.fraction, selection.size(4))
      0.5 2
      >>> clean = jnp.array([1.0, 1.0, 1.0, 1.0])
      >>> perturbed = jnp.array([1.1, 1.4, 1.2, 1.3])
      >>> print(selection.select(clean, perturbed).tolist())
      [1, 3]

    References:
      Du et al, `Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    """
    _utils.check_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False)
    if _utils.is_traced(gamma):
        raise ValueError("gamma must be a concrete number in (0, 1] (it fixes a static size), got a traced value.")
    return DataSelection(float(_utils.static_number("gamma", gamma)))


def selected_pass(
    selection: DataSelection,
    losses_at: Callable[[Any], jax.Array],
    grads_on: Callable[[Any], optax.Updates],
    shard: Any,
    clean_losses: jax.Array,
) -> tuple[jax.Array, optax.Updates]:
    """The second pass of a shard with data selection: per-example losses at the
    perturbed weights (``losses_at(shard)``, forward only), then the gradient on the
    selected examples (``grads_on(sub-shard)``). Returns ``(perturbed loss of the
    whole shard, gradient)``."""
    perturbed_losses = losses_at(shard)
    idx = selection.select(clean_losses, perturbed_losses)
    grads = grads_on(jax.tree.map(lambda x: x[idx], shard))
    return jnp.mean(perturbed_losses), grads
