"""Fisher-SAM's geometry: the ball of the diagonal empirical Fisher metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry, make_geometry


def fisher(rho: _utils.ScalarOrSchedule = 0.1, eta: float = 1.0, *, eps: float = 1e-12) -> AscentGeometry:
    r"""The Fisher-SAM geometry, :math:`F = \mathrm{diag}(1 + \eta\, g^2)`.

    The ball is the Fisher ellipsoid :math:`\epsilon^\top F \epsilon \le \rho^2`,
    with the diagonal empirical Fisher of the mini-batch (shard) gradient. Its
    first-order maximizer, elementwise:

    .. math::

      \epsilon = \rho \, \frac{g / (1 + \eta g^2)}
        {\sqrt{\sum_i g_i^2 / (1 + \eta g_i^2)} + \varepsilon}

    ``eta = 0`` is exactly SAM's :func:`~sam_optax.geometry.l2` with the same
    ``rho`` (the paper's :math:`\gamma`).

    Args:
      rho: radius (the paper's gamma), ``>= 0`` or a schedule; default 0.1.
      eta: ``>= 0``, weight of the Fisher term; default 1.0.
      eps: added to the norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    References:
      Kim et al, `Fisher SAM: Information Geometry and Sharpness Aware
      Minimisation <https://arxiv.org/abs/2206.04920>`_, 2022
    """
    _utils.check_range("eta", eta, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def perturb(g, params, rho_t):
        del params
        f_inv_g = jax.tree.map(lambda x: x / (1.0 + eta * x * x), g)
        denom = jnp.sqrt(_utils.tree_vdot(g, f_inv_g)) + eps
        return jax.tree.map(lambda x: rho_t * x / denom, f_inv_g)

    def norm(e, g, params):
        del params
        return jnp.sqrt(_utils.tree_sum(jax.tree.map(lambda ei, gi: (1.0 + eta * gi * gi) * ei * ei, e, g)))

    return make_geometry(perturb, norm, rho)
