"""SAM's ascent geometry: the L2 ball and the general p-norm ball (SAM eq. 2)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry, make_geometry


def l2(rho: _utils.ScalarOrSchedule = 0.05, *, eps: float = 1e-12) -> AscentGeometry:
    r"""The L2-ball geometry of SAM.

    .. math::

      \epsilon = \rho \, \frac{g}{\lVert g \rVert_2 + \varepsilon}

    where the norm is the global norm over the whole pytree of ``g`` (of one
    m-sharpness shard). A zero gradient gives a zero perturbation (also with
    ``eps = 0``). The norm is computed on ``g`` scaled by a power of two near
    its largest entry, so any finite gradient gives the direction
    :math:`g / \lVert g\rVert` (no overflow of :math:`g^2`).

    Args:
      rho: radius of the ball, a number ``>= 0`` or an optax schedule of the step.
      eps: added to the norm in the denominator, ``>= 0`` (1e-12 as in the
        PyTorch references; the original JAX code uses 0).

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    Examples:
      With :math:`g = (3, 4)` and ``rho = 0.5`` the perturbation is
      :math:`\rho\, g / \lVert g\rVert = (0.3, 0.4)`, of norm 0.5.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> geo = sam_optax.geometry.l2(0.5)
      >>> g = {"w": jnp.array([3.0, 4.0])}
      >>> eps, state = geo.update(g, geo.init(g))
      >>> print([round(float(x), 4) for x in eps["w"]], round(float(geo.norm(eps, g, None)), 4))
      [0.3, 0.4] 0.5

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    _utils.check_range("eps", eps, low=0.0)

    def perturb(g, params, rho_t):
        del params
        return jax.tree.map(lambda x: rho_t * x, _utils.tree_direction(g, eps))

    def norm(e, g, params):
        del g, params
        return _utils.tree_norm(e)

    return make_geometry(perturb, norm, rho)


def _pnorm(tree: Any, p: Any) -> jax.Array:
    r"""Global p-norm of a pytree, computed stably: :math:`d\,m\,(\sum_i (|u_i| /
    m)^p)^{1/p}` with ``u = x / d`` (``d`` a power of two, see
    :func:`sam_optax._utils.tree_scaled`) and :math:`m = \max_i |u_i|`; 0 for a
    zero (or empty) tree.

    ``p`` may be traced: ``(|u| / m) ** inf`` is 1 at the maxima and 0
    elsewhere, and ``n ** (1 / inf) = 1``, so the formula also gives the max norm.
    """
    if not _utils.is_traced(p) and p == math.inf:
        return _utils.tree_max_abs(tree)
    u, d = _utils.tree_scaled(tree)
    big = _utils.tree_max_abs(u)
    safe = _utils.safe_divisor(big)
    total = _utils.tree_sum(jax.tree.map(lambda x: (jnp.abs(x) / safe) ** p, u))
    return d * big * total ** (1.0 / p)


def dual_direction(g: optax.Updates, p: float | jax.Array, eps: float | jax.Array) -> optax.Updates:
    r"""Maximizer of :math:`\langle g, \delta\rangle` over the unit p-norm ball.

    :math:`\delta = \mathrm{sign}(g)\,(|g| / (\lVert g\rVert_q + \varepsilon))^{q-1}`
    with :math:`1/p + 1/q = 1`; for ``p = inf`` it is ``sign(g)``; for ``p = 1``
    the unit mass is split evenly over the entries of largest magnitude.
    A traced ``p`` (``optax.inject_hyperparams`` without ``static_args``) takes
    the general formula, selected elementwise; a Python ``p`` picks its branch.
    It is computed on ``u = g / d`` and :math:`\varepsilon / d` (``d`` a power
    of two near :math:`\max|g|`: the same :math:`\delta`, without overflow),
    and a zero gradient gives :math:`\delta = 0`, also with ``eps = 0``.
    """
    g, d = _utils.tree_scaled(g)
    eps = eps / d
    if _utils.is_traced(p):
        return _traced_dual_direction(g, p, eps)
    if p == 2:
        return _utils.tree_direction(g, eps)
    if p == math.inf:
        return jax.tree.map(jnp.sign, g)
    if p == 1:
        big = _pnorm(g, math.inf)
        hits = jax.tree.map(lambda x: (jnp.abs(x) == big) & (big > 0), g)
        n = _utils.tree_sum(jax.tree.map(lambda h: h.astype(jnp.float32), hits))
        inv = 1.0 / jnp.maximum(n, 1.0)
        return jax.tree.map(lambda x, h: jnp.sign(x) * h * inv, g, hits)
    q = p / (p - 1.0)
    denom = _utils.safe_divisor(_pnorm(g, q) + eps)
    return jax.tree.map(lambda x: jnp.sign(x) * (jnp.abs(x) / denom) ** (q - 1.0), g)


def _traced_dual_direction(g: optax.Updates, p: jax.Array, eps: float | jax.Array) -> optax.Updates:
    """:func:`dual_direction` for a traced ``p``: the general formula with
    ``q = 1`` at ``p = inf`` (then ``|x| ** 0 = 1`` gives ``sign(g)``), and the
    ``p = 1`` branch selected with ``where``."""
    p = jnp.asarray(p, jnp.float32)
    is_one, is_inf = p == 1.0, jnp.isinf(p)
    safe_p = jnp.where(is_one | is_inf, 2.0, p)
    q = jnp.where(is_inf, 1.0, safe_p / (safe_p - 1.0))
    denom = _utils.safe_divisor(_pnorm(g, q) + eps)
    general = jax.tree.map(lambda x: jnp.sign(x) * (jnp.abs(x) / denom) ** (q - 1.0), g)
    ones = dual_direction(g, 1.0, eps)
    return jax.tree.map(lambda a, b: jnp.where(is_one, b, a), general, ones)


def check_p(p: Any) -> Any:
    """``p`` as a Python float in ``[1, inf]``; a traced ``p`` is returned as it is.

    A concrete array (``optax.inject_hyperparams`` outside ``jit``) becomes a float.
    """
    _utils.check_range("p", p, low=1.0, allow_inf=True)  # a tracer: shape and dtype only
    if _utils.is_traced(p):
        return p
    return float(_utils.static_number("p", p))


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
      p: the norm, ``1 <= p <= inf`` (``math.inf`` or ``float('inf')``). Under
        ``optax.inject_hyperparams`` it is injected too: traced inside ``jit``,
        it takes the general formula (same values up to rounding);
        ``static_args=('p',)`` keeps the branch chosen for a Python ``p``.
      eps: added to the dual norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (eq. 2)

    Examples:
      For ``p = inf`` the perturbation is :math:`\rho\,\mathrm{sign}(g)`:

      >>> import jax.numpy as jnp, sam_optax
      >>> geo = sam_optax.geometry.pnorm(0.5, p=float('inf'))
      >>> eps, _ = geo.update({'w': jnp.array([3.0, -0.1])}, geo.init(None))
      >>> print([round(float(x), 4) for x in eps['w']])
      [0.5, -0.5]
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
