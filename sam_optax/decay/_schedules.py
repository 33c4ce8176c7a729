"""Schedules of the AdamW paper: cosine warm restarts (App. B.2) and the
normalized weight decay (App. B.1), per restart."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils


def _restart_cycle(count: Any, period: Any, t_mult: Any) -> tuple[jax.Array, jax.Array]:
    """``(T_cur, T_i)`` in steps at step ``count`` (0-based) for restarts of length
    ``period * t_mult**i``.

    The cycle index comes from the closed form (a geometric series) and is then
    corrected by one in either direction, so rounding of the logarithm at a
    restart boundary cannot put a step in the wrong cycle.
    """
    dtype = _utils.hyper_dtype()  # float64 under jax_enable_x64
    t = jnp.asarray(count, dtype)
    period = jnp.asarray(period, dtype)
    m = jnp.asarray(t_mult, dtype)
    geometric = m > 1.0
    safe_m = jnp.where(geometric, m, 2.0)

    def start(i):  # first step of cycle i
        return jnp.where(geometric, period * (safe_m**i - 1.0) / (safe_m - 1.0), period * i)

    i = jnp.where(
        geometric,
        jnp.floor(jnp.log1p(t * (safe_m - 1.0) / period) / jnp.log(safe_m)),
        jnp.floor(t / period),
    )
    i = jnp.maximum(i, 0.0)
    i = jnp.where(t < start(i), i - 1.0, i)
    i = jnp.where(t >= start(i + 1.0), i + 1.0, i)
    t_i = jnp.where(geometric, period * safe_m**i, period)
    return t - start(i), t_i


def cosine_warm_restarts(
    period: float,
    t_mult: float = 1.0,
    eta_min: float = 0.0,
    eta_max: float = 1.0,
) -> optax.Schedule:
    r"""The schedule multiplier :math:`\eta_t` of SGDR / AdamWR (App. B.2, eq. 14-15).

    .. math::

      \eta_t = \eta_{min} + \tfrac12(\eta_{max} - \eta_{min})
               \big(1 + \cos(\pi\, T_{cur} / T_i)\big),
      \qquad T_{i+1} = T_{mult}\, T_i

    where :math:`T_{cur}` counts the steps since the last restart (the paper
    updates it every batch, in fractional epochs; here everything is in steps:
    pass ``period = T_0 [epochs] * steps_per_epoch``). A restart happens when
    :math:`T_{cur}` reaches :math:`T_i`: the first step of every cycle has
    :math:`\eta = \eta_{max}`. A fractional period (e.g. ``t_mult = 1.5``) keeps
    its fraction: cycle ``i`` starts at step :math:`T_0 (T_{mult}^i - 1)/(T_{mult} - 1)`
    and :math:`T_{cur}` is the (possibly fractional) time since then.

    Like every optax schedule it is evaluated at the 0-based step count. Use it
    as the ``schedule_multiplier`` of :func:`adamw` / :func:`sgdw` /
    :func:`decoupled_weight_decay` (the paper multiplies *both* the learning
    rate and the weight decay by it), or as an ordinary learning-rate schedule
    scaled by the base learning rate.

    Args:
      period: :math:`T_0`, the length of the first cycle in steps, ``> 0``.
      t_mult: :math:`T_{mult} \ge 1`, the factor by which each cycle is longer
        than the previous one (1: constant period; the paper also uses 2).
      eta_min: :math:`\eta_{min} \ge 0`.
      eta_max: :math:`\eta_{max} \ge \eta_{min}`.

    Returns:
      An optax schedule ``count -> eta_t`` (float32; float64 under
      ``jax_enable_x64``).

    Examples:
      :math:`T_0 = 4, T_{mult} = 2`: cycles of 4 and 8 steps starting at steps 0,
      4 and 12; :math:`\eta = 1` at each start and :math:`\frac12` half-way
      through a cycle (steps 2 and 8).

      >>> import sam_optax
      >>> f = sam_optax.decay.cosine_warm_restarts(4, t_mult=2.0)
      >>> print([round(float(f(count)), 4) for count in (0, 2, 3, 4, 8, 12)])
      [1.0, 0.5, 0.1464, 1.0, 0.5, 1.0]

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019 (App. B.2);
      Loshchilov et al, `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, 2017
    """
    _utils.check_range("period", period, low=0.0, low_inclusive=False)
    _utils.check_range("t_mult", t_mult, low=1.0)
    _utils.check_range("eta_min", eta_min, low=0.0)
    _utils.check_range("eta_max", eta_max, low=eta_min, low_name="eta_min")

    def schedule(count):
        t_cur, t_i = _restart_cycle(count, period, t_mult)
        return eta_min + 0.5 * (eta_max - eta_min) * (1.0 + jnp.cos(jnp.pi * t_cur / t_i))

    return schedule


def normalized_weight_decay(
    lambda_norm: float,
    batch_size: int,
    dataset_size: int,
    epochs: float,
) -> float:
    r"""The normalized weight decay of App. B.1: :math:`\lambda = \lambda_{norm}\sqrt{b / (B T)}`.

    With ``b`` the batch size, ``B`` the number of training points and ``T``
    the number of epochs, :math:`\lambda` is the per-step decay (at schedule
    multiplier 1) that :func:`adamw` / :func:`sgdw` / :func:`decoupled_weight_decay`
    take; :math:`\lambda_{norm}` "can be interpreted as the weight decay used if
    only one batch pass is allowed", so it transfers across training lengths.
    Since :math:`B T / b` is the total number of steps, this is
    :math:`\lambda_{norm} / \sqrt{\text{steps}}`. With warm restarts the paper
    takes ``T`` as the epochs of the *current* restart: see
    :func:`normalized_weight_decay_restarts`.

    The paper's examples: :math:`\lambda_{norm}` = 0.025 for AdamW (α = 0.001)
    and 0.025 - 0.05 for SGDW (α = 0.05), batch size 128.

    Args:
      lambda_norm: :math:`\lambda_{norm} \ge 0`.
      batch_size: ``b``, an integer ``>= 1``.
      dataset_size: ``B``, an integer ``>= 1``.
      epochs: ``T > 0`` (may be fractional).

    Returns:
      :math:`\lambda` as a Python float.

    Examples:
      Batch 100, 10000 examples, 100 epochs: :math:`10^4` steps, so
      :math:`\lambda = 0.05 / \sqrt{10^4} = 0.0005`.

      >>> import sam_optax
      >>> print(round(sam_optax.decay.normalized_weight_decay(0.05, 100, 10000, 100), 8))
      0.0005

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019 (App. B.1)
    """
    _utils.check_range("lambda_norm", lambda_norm, low=0.0)
    _utils.check_positive_int("batch_size", batch_size, high=None)  # Python arithmetic only
    _utils.check_positive_int("dataset_size", dataset_size, high=None)
    _utils.check_range("epochs", epochs, low=0.0, low_inclusive=False)
    return float(lambda_norm) * (batch_size / (dataset_size * float(epochs))) ** 0.5


def normalized_weight_decay_restarts(
    lambda_norm: float,
    period: float,
    t_mult: float = 1.0,
) -> optax.Schedule:
    r"""Normalized weight decay recomputed for each warm restart (App. B.1 footnote).

    "In the context of AdamWR, T is the total number of epochs in the current
    restart": in cycle :math:`i` of :func:`cosine_warm_restarts` (``T_i`` steps)

    .. math::

      \lambda_i = \lambda_{norm}\sqrt{\frac{b}{B\,T_i^{epochs}}}
                = \frac{\lambda_{norm}}{\sqrt{T_i^{steps}}}

    (``b`` and ``B`` cancel once the period is counted in steps). Pass it as the
    ``weight_decay`` of :func:`adamw` / :func:`sgdw` /
    :func:`decoupled_weight_decay` with the same ``period`` and ``t_mult`` as the
    multiplier.

    Args:
      lambda_norm: :math:`\lambda_{norm} \ge 0`.
      period: :math:`T_0` in steps, ``> 0``.
      t_mult: :math:`T_{mult} \ge 1`.

    Returns:
      An optax schedule ``count -> lambda_i``.

    Examples:
      :math:`T_0 = 4, T_{mult} = 4`: cycles of 4, 16 and 64 steps (starting at
      steps 0, 4 and 20), so :math:`\lambda_i = 0.05/\sqrt{T_i} = 0.025, 0.0125, 0.00625`.

      >>> import sam_optax
      >>> f = sam_optax.decay.normalized_weight_decay_restarts(0.05, 4, t_mult=4.0)
      >>> print([round(float(f(count)), 6) for count in (0, 3, 4, 19, 20)])
      [0.025, 0.025, 0.0125, 0.0125, 0.00625]

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019 (App. B.1)
    """
    _utils.check_range("lambda_norm", lambda_norm, low=0.0)
    _utils.check_range("period", period, low=0.0, low_inclusive=False)
    _utils.check_range("t_mult", t_mult, low=1.0)

    def schedule(count):
        _, t_i = _restart_cycle(count, period, t_mult)
        return lambda_norm / jnp.sqrt(t_i)

    return schedule
