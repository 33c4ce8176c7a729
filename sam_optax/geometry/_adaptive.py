"""ASAM's adaptive geometry: the ball of the scale-invariant norm ||T_w^-1 eps||_p."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry, make_geometry, require_params
from sam_optax.geometry._pnorm import _pnorm, check_p, dual_direction

MaskOrFn = Any | Callable[[Any], Any]


def adaptive(
    rho: _utils.ScalarOrSchedule = 0.5,
    eta: float = 0.01,
    *,
    p: float = 2,
    mask: MaskOrFn | None = None,
    eps: float = 1e-12,
) -> AscentGeometry:
    r"""The adaptive (ASAM) geometry, :math:`T_w = \mathrm{diag}(|w| + \eta)`.

    The ball is :math:`\lVert T_w^{-1}\epsilon\rVert_p \le \rho`; its first-order
    maximizer is :math:`\epsilon = T_w\,\delta` with :math:`\delta` the p-norm
    solution for the gradient :math:`T_w g`. For ``p = 2`` (the paper's choice):

    .. math::

      \epsilon = \rho \, \frac{T_w^2 \, g}{\lVert T_w \, g \rVert_2 + \varepsilon}

    and for ``p = inf``: :math:`\epsilon = \rho\,T_w\,\mathrm{sign}(g)`.
    :math:`T_w` is taken at the current (unperturbed) weights.

    Args:
      rho: radius, ``>= 0`` or a schedule (the paper uses 0.5 on CIFAR-10 and 1.0
        on CIFAR-100, ten times SAM's).
      eta: ``>= 0``, added to ``|w|``; the official class default is 0.01.
        With ``eta = 0`` a zero weight is never perturbed, and ``norm`` leaves
        out the coordinates where :math:`T_w = 0` (there the perturbation is
        always 0, and :math:`0 / 0` is taken as 0).
      p: the norm, ``1 <= p <= inf``. Under ``optax.inject_hyperparams`` it is
        injected too: traced inside ``jit``, it takes the general formula (same
        values up to rounding); ``static_args=('p',)`` keeps it a Python number.
      mask: a pytree of bools like the params (or a function of the params
        returning one); where ``False`` the leaf uses ``T = 1`` (plain SAM). The
        official code is adaptive only for weights, not for biases: pass e.g.
        ``lambda params: jax.tree_util.tree_map_with_path(lambda k, _:
        'bias' not in jax.tree_util.keystr(k), params)``. ``None``: every leaf.
        Under ``optax.inject_hyperparams`` a function would be taken for a
        schedule: pass ``static_args=('mask',)``.
      eps: added to the norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    Examples:
      With ``eta = 0``, :math:`w = (3, 1)` and :math:`g = (1, 4)`:
      :math:`T_w g = (3, 4)` has norm 5, so
      :math:`\epsilon = 0.5\,T_w^2 g / 5 = 0.5\,(9, 4) / 5 = (0.9, 0.4)`, and
      :math:`\lVert T_w^{-1}\epsilon\rVert_2 = \lVert(0.3, 0.4)\rVert_2 = 0.5 = \rho`.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> geo = sam_optax.geometry.adaptive(0.5, eta=0.0)
      >>> w, g = jnp.array([3.0, 1.0]), jnp.array([1.0, 4.0])
      >>> eps, state = geo.update(g, geo.init(w), w)
      >>> print([round(float(x), 4) for x in eps], round(float(geo.norm(eps, g, w)), 4))
      [0.9, 0.4] 0.5

    References:
      Kwon et al, `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, 2021
    """
    _utils.check_range("eta", eta, low=0.0)
    _utils.check_range("eps", eps, low=0.0)
    p = check_p(p)

    def scale(params):
        require_params(params, "adaptive")
        t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
        if mask is None:
            return t
        m = mask(params) if callable(mask) else mask
        return jax.tree.map(lambda ti, mi: jnp.where(mi, ti, jnp.ones_like(ti)), t, m)

    def perturb(g, params, rho_t):
        t = scale(params)
        u, d = _utils.tree_scaled(g)  # T_w g / d: no overflow for huge g
        delta = dual_direction(jax.tree.map(jnp.multiply, t, u), p, eps / d)
        return jax.tree.map(lambda ti, di: rho_t * ti * di, t, delta)

    def norm(e, g, params):
        del g
        t = scale(params)
        return _pnorm(jax.tree.map(_unscale, e, t), p)

    return make_geometry(perturb, norm, rho)


def _unscale(e: jax.Array, t: jax.Array) -> jax.Array:
    r""":math:`T_w^{-1}\epsilon` elementwise, 0 where :math:`T_w = 0` (excluded coordinates)."""
    return jnp.where(t > 0, e / _utils.safe_divisor(t), jnp.zeros_like(e))
