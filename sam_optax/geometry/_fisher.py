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
    ``rho`` (the paper's :math:`\gamma`). A zero gradient gives a zero
    perturbation (also with ``eps = 0``). It is computed without squaring
    ``g``: with :math:`a = g / \sqrt{1 + \eta g^2}` and
    :math:`b = 1 / \sqrt{1 + \eta g^2}`, :math:`\epsilon = \rho\, b\, a /
    (\lVert a\rVert_2 + \varepsilon)` and the norm is
    :math:`\lVert \epsilon \sqrt{1 + \eta g^2}\rVert_2`, so any finite
    gradient gives the right direction.

    Args:
      rho: radius (the paper's gamma), ``>= 0`` or a schedule; default 0.1.
      eta: ``>= 0``, weight of the Fisher term; default 1.0.
      eps: added to the norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    Examples:
      With :math:`g = (1, 1)` and ``eta = 1``, :math:`F = \mathrm{diag}(2, 2)`:
      :math:`\epsilon = 0.1\,(0.5, 0.5) / \sqrt{0.5 + 0.5} = (0.05, 0.05)`, whose
      Fisher norm :math:`\sqrt{\epsilon^\top F \epsilon}` is 0.1; ``eta = 0``
      gives SAM's :math:`0.1\,g / \lVert g\rVert = (0.0707, 0.0707)`.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> g = jnp.array([1.0, 1.0])
      >>> for eta in (1.0, 0.0):
      ...     geo = sam_optax.geometry.fisher(0.1, eta=eta)
      ...     eps, state = geo.update(g, geo.init(g))
      ...     print([round(float(x), 4) for x in eps], round(float(geo.norm(eps, g, None)), 4))
      [0.05, 0.05] 0.1
      [0.0707, 0.0707] 0.1

    References:
      Kim et al, `Fisher SAM: Information Geometry and Sharpness Aware
      Minimisation <https://arxiv.org/abs/2206.04920>`_, 2022
    """
    _utils.check_range("eta", eta, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def perturb(g, params, rho_t):
        del params
        s = eta**0.5  # a Python float stays exact (eta = 1e-60 would round to 0 in float32)
        a = jax.tree.map(lambda x: _whiten(x, s), g)
        return jax.tree.map(lambda x, ai: rho_t * ai / jnp.hypot(1.0, s * x), g, _utils.tree_direction(a, eps))

    def norm(e, g, params):
        del params
        s = eta**0.5
        return _utils.tree_norm(jax.tree.map(lambda ei, gi: _stretch(ei, gi, s), e, g))

    return make_geometry(perturb, norm, rho)


def _whiten(g: jax.Array, s: jax.Array) -> jax.Array:
    r""":math:`g / \sqrt{1 + s^2 g^2}` without overflow (:math:`\mathrm{sign}(g) / s` when
    :math:`s |g|` overflows)."""
    t = s * jnp.abs(g)
    big = t > 1.0
    inv_t = 1.0 / jnp.where(big, t, 1.0)
    safe_s = jnp.where(big, s, 1.0)
    return jnp.where(big, jnp.sign(g) / (safe_s * jnp.hypot(inv_t, 1.0)), g / jnp.hypot(1.0, t))


def _stretch(e: jax.Array, g: jax.Array, s: jax.Array) -> jax.Array:
    r""":math:`|e| \sqrt{1 + s^2 g^2}` without overflow of :math:`g^2` (where :math:`s |g| > 1`
    it is :math:`(|e|\,|g|)\, s \sqrt{1 + 1 / (s g)^2}`)."""
    t = s * jnp.abs(g)
    big = t > 1.0
    inv_t = 1.0 / jnp.where(big, t, 1.0)
    return jnp.where(big, (jnp.abs(e) * jnp.abs(g)) * s * jnp.hypot(inv_t, 1.0), jnp.abs(e) * jnp.hypot(1.0, t))
