"""SAM's ascent geometry: the L2 ball and the general p-norm ball (SAM eq. 2)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry, make_geometry


def l2(rho: _utils.ScalarOrSchedule = 0.05, *, eps: float = 1e-12) -> AscentGeometry:
    r"""The L2-ball geometry of SAM.

    .. math::

      \epsilon = \rho \, \frac{g}{\lVert g \rVert_2 + \varepsilon}

    where the norm is the global norm over the whole pytree of ``g`` (of one
    m-sharpness shard). A zero gradient gives a zero perturbation.

    Args:
      rho: radius of the ball, a number ``>= 0`` or an optax schedule of the step.
      eps: added to the norm in the denominator, ``>= 0`` (1e-12 as in the
        PyTorch references; the original JAX code uses 0).

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    _utils.check_range("eps", eps, low=0.0)

    def perturb(g, params, rho_t):
        del params
        scale = rho_t / (_utils.tree_norm(g) + eps)
        return jax.tree.map(lambda x: scale * x, g)

    def norm(e, g, params):
        del g, params
        return _utils.tree_norm(e)

    return make_geometry(perturb, norm, rho)


def _pnorm(tree: Any, p: float) -> jax.Array:
    """Global p-norm of a pytree, computed stably (scaled by the max entry)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    big = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in leaves]))
    if p == math.inf:
        return big
    safe = jnp.where(big > 0, big, 1.0)
    total = _utils.tree_sum(jax.tree.map(lambda x: (jnp.abs(x) / safe) ** p, tree))
    return big * total ** (1.0 / p)


def dual_direction(g: Any, p: float, eps: float) -> Any:
    r"""Maximizer of :math:`\langle g, \delta\rangle` over the unit p-norm ball.

    :math:`\delta = \mathrm{sign}(g)\,(|g| / (\lVert g\rVert_q + \varepsilon))^{q-1}`
    with :math:`1/p + 1/q = 1`; for ``p = inf`` it is ``sign(g)``; for ``p = 1``
    the unit mass is split evenly over the entries of largest magnitude.
    """
    if p == 2:
        scale = 1.0 / (_utils.tree_norm(g) + eps)
        return jax.tree.map(lambda x: scale * x, g)
    if p == math.inf:
        return jax.tree.map(jnp.sign, g)
    if p == 1:
        big = _pnorm(g, math.inf)
        hits = jax.tree.map(lambda x: (jnp.abs(x) == big) & (big > 0), g)
        n = _utils.tree_sum(jax.tree.map(lambda h: h.astype(jnp.float32), hits))
        inv = 1.0 / jnp.maximum(n, 1.0)
        return jax.tree.map(lambda x, h: jnp.sign(x) * h * inv, g, hits)
    q = p / (p - 1.0)
    denom = _pnorm(g, q) + eps
    return jax.tree.map(lambda x: jnp.sign(x) * (jnp.abs(x) / denom) ** (q - 1.0), g)


def check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"p must be a number in [1, inf], got {p!r}.")
    _utils.check_range("p", p, low=1.0)
    return float(p)


def pnorm(rho: _utils.ScalarOrSchedule = 0.05, p: float = 2, *, eps: float = 1e-12) -> AscentGeometry:
    r"""The p-norm ball of SAM: the first-order solution of SAM's inner problem.

    With :math:`1/p + 1/q = 1` (SAM eq. 2):

    .. math::

      \epsilon = \rho \, \mathrm{sign}(g) \, |g|^{q-1} / \lVert g \rVert_q^{q-1}

    ``p = 2`` is :func:`l2`; ``p = inf`` gives :math:`\rho\,\mathrm{sign}(g)`;
    ``p = 1`` puts the whole radius on the entries of largest :math:`|g|`.
    The result has p-norm ``rho`` (zero for a zero gradient).

    Args:
      rho: radius, a number ``>= 0`` or a schedule.
      p: the norm, ``1 <= p <= inf`` (``math.inf`` or ``float('inf')``).
      eps: added to the dual norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (eq. 2)
    """
    p = check_p(p)
    _utils.check_range("eps", eps, low=0.0)

    def perturb(g, params, rho_t):
        del params
        return jax.tree.map(lambda d: rho_t * d, dual_direction(g, p, eps))

    def norm(e, g, params):
        del g, params
        return _pnorm(e, p)

    return make_geometry(perturb, norm, rho)
