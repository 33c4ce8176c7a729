"""GSAM: SAM plus an ascent step on the surrogate gap, orthogonal to the SAM gradient."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.rules._base import sharpness_rule


def gsam(
    base: optax.GradientTransformation,
    alpha: float = 0.4,
    *,
    eps: float = 1e-12,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate-Gap guided SAM (GSAM, Algorithm 1).

    The clean gradient is decomposed along the perturbed gradient,
    :math:`g = g_\parallel + g_\perp` with
    :math:`g_\parallel = \langle g, \tilde g\rangle \tilde g / \lVert\tilde g\rVert^2`,
    and the base optimizer sees

    .. math::

      \tilde g - \alpha\, g_\perp ,

    a descent step on the perturbed loss plus an ascent step on the surrogate
    gap :math:`h = L(w+\epsilon) - L(w)` that leaves the perturbed loss unchanged
    to first order.

    GSAM's radius follows the learning rate between ``rho_min`` and ``rho_max``:
    build the geometry with :func:`gsam_rho_schedule`, e.g.
    ``sam_optax.geometry.l2(rho=gsam_rho_schedule(lr_schedule, rho_max=0.04,
    rho_min=0.02, lr_max=1.6, lr_min=0.016))``. ``alpha = 0`` with
    ``rho_min = rho_max`` is SAM.

    Which gradient each optax piece sees (see :mod:`sam_optax.rules`): pieces
    inside ``base`` see :math:`\tilde g - \alpha g_\perp`; pieces after ``gsam``
    see the base optimizer's updates. A piece that must act on both gradients
    (clipping, L2 decay) goes in :func:`sam_optax.rules.apply_to_both`; chaining
    it before ``gsam`` raises ``ValueError`` when ``clean_grads`` is given.

    With m-sharpness the decomposition is made on the shard-averaged gradients
    (the official JAX code decomposes per device before its ``pmean``; the two
    agree with one shard).

    Args:
      base: any optax optimizer.
      alpha: ``>= 0``, weight of the surrogate-gap step (paper Table 4: 0.01 for
        ResNets, 0.05 - 1.0 for ViT / Mixer; the PyTorch example uses 0.4).
      eps: ``>= 0``, added to the norm of :math:`\tilde g` when normalizing it.
      max_norm: optional ``> 0``; clip both gradients to this global norm first.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      ``update(grads, state, params, perturbed_grads=..., clean_grads=...)``.

    Examples:
      With :math:`g = (1, 1)` and :math:`\tilde g = (2, 0)`:
      :math:`g_\parallel = (1, 0)`, :math:`g_\perp = (0, 1)`, and with
      ``alpha = 0.5`` the base optimizer sees :math:`(2, 0) - 0.5\,(0, 1) = (2, -0.5)`;
      SGD(0.1) gives :math:`(-0.2, 0.05)`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.gsam(optax.sgd(0.1), alpha=0.5)
      >>> w = jnp.zeros(2)
      >>> g, g_pert = jnp.array([1.0, 1.0]), jnp.array([2.0, 0.0])
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.2, 0.05]

    References:
      Zhuang et al, `Surrogate Gap Minimization Improves Sharpness-Aware Training
      <https://arxiv.org/abs/2203.08065>`_, ICLR 2022
    """
    _utils.check_range("alpha", alpha, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def combine(g, g_pert, state, params):
        del params
        return gsam_direction(g, g_pert, alpha, eps), None, state.extra

    return sharpness_rule(base, combine, name="gsam", max_norm=max_norm)


def gsam_direction(g: optax.Updates, g_pert: optax.Updates, alpha: Any, eps: Any) -> optax.Updates:
    r""":math:`\tilde g - \alpha\,(g - \langle g, v\rangle v)` with
    :math:`v = \tilde g / (\lVert\tilde g\rVert + \varepsilon)`.

    Computed as :math:`\tilde g - \alpha g + k\,\tilde g / d` with the scalar
    :math:`k = \alpha \langle g, v\rangle / (\lVert\tilde g / d\rVert + \varepsilon / d)`:
    one pass over both gradients for :math:`\sum \tilde g_i^2` and
    :math:`\sum g_i \tilde g_i` (``d = 1``), one elementwise pass for the output.
    When those sums overflow or underflow, the scalars come from the
    overflow-safe scaled form instead (``d`` a power of two near
    :math:`\max|\tilde g|`; under ``lax.cond``, scalar outputs only). A zero
    :math:`\tilde g` gives :math:`v = 0` (no NaN, also with ``eps = 0``).
    """
    s_pp = _utils.tree_vdot(g_pert, g_pert)
    s_gp = _utils.tree_vdot(g, g_pert)
    one = jnp.ones_like(s_pp)
    ok = jnp.isfinite(s_pp) & jnp.isfinite(s_gp) & (s_pp >= jnp.sqrt(jnp.finfo(s_pp.dtype).tiny))

    def plain():
        den = _utils.safe_divisor(jnp.sqrt(s_pp) + eps)
        return one, den, s_gp / den

    def scaled():
        u_p, d_p, n_p = _utils.tree_norm_parts(g_pert)
        u_g, d_g = _utils.tree_scaled(g)
        den = _utils.safe_divisor(n_p + eps / d_p)
        t = d_g * (_utils.tree_vdot(u_g, u_p) / den)  # <g, v>, at most ||g||
        return (one / d_p).astype(s_pp.dtype), den.astype(s_pp.dtype), t.astype(s_pp.dtype)

    inv, den, t = jax.lax.cond(ok, plain, scaled)
    k = alpha * t / den
    return jax.tree.map(
        lambda a, b: _utils.to_compute(b) - alpha * _utils.to_compute(a) + k * (_utils.to_compute(b) * inv), g, g_pert
    )


def gsam_rho_schedule(
    learning_rate: _utils.ScalarOrSchedule,
    rho_max: float,
    rho_min: float,
    *,
    lr_max: float | None = None,
    lr_min: float | None = None,
) -> optax.Schedule:
    r"""GSAM's radius, proportional to the learning rate (Algorithm 1, step 0).

    .. math::

      \rho_t = \rho_{min} + \frac{(\rho_{max} - \rho_{min})(\eta_t - \eta_{min})}
        {\eta_{max} - \eta_{min}}

    Args:
      learning_rate: the learning rate, a number or an optax schedule.
      rho_max: radius at ``lr_max``, ``>= rho_min``.
      rho_min: radius at ``lr_min``, ``>= 0``.
      lr_max: largest learning rate (required with a schedule).
      lr_min: smallest learning rate (required with a schedule), ``<= lr_max``.

    Returns:
      An optax schedule of the step count (constant ``rho_max`` when the
      learning rate is constant or ``lr_max == lr_min``), in float32, or in
      float64 under ``jax_enable_x64`` (the geometry then casts it to the
      gradient's dtype).

    Examples:
      A learning rate falling linearly from 1 to 0 over 10 steps, with
      ``rho_max = 0.04`` at ``lr_max = 1`` and ``rho_min = 0.02`` at ``lr_min = 0``:
      at step 5 the learning rate is 0.5, half way, so the radius is 0.03.

      >>> import optax
      >>> import sam_optax
      >>> lr = optax.linear_schedule(1.0, 0.0, transition_steps=10)
      >>> rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.0, lr_min=0.0)
      >>> print([round(float(rho(t)), 4) for t in (0, 5, 10)])
      [0.04, 0.03, 0.02]
      >>> geometry = sam_optax.geometry.l2(rho=rho)
    """
    _utils.check_range("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _utils.check_range("rho_min", rho_min, low=0.0)
    _utils.check_range("rho_max", rho_max, low=rho_min, low_name="rho_min")
    _utils.check_range("lr_min", lr_min, low=0.0, allow_none=True)
    _utils.check_range("lr_max", lr_max, low=lr_min, allow_none=True, low_name="lr_min")
    if not callable(learning_rate):
        return lambda count: jnp.asarray(rho_max, _utils.hyper_dtype()) + 0.0 * count
    if lr_max is None or lr_min is None:
        raise ValueError("lr_max and lr_min are required when learning_rate is a schedule.")
    span = lr_max - lr_min

    def schedule(count):
        if span == 0:
            return jnp.asarray(rho_max, _utils.hyper_dtype()) + 0.0 * count
        lr = jnp.asarray(learning_rate(count), _utils.hyper_dtype())
        return rho_min + (rho_max - rho_min) * (lr - lr_min) / span

    return schedule
