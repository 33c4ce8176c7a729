"""Decoupled weight decay exactly as Loshchilov & Hutter's Algorithms 1 and 2."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

MaskOrFn = Any | Callable[[Any], Any] | None

_NO_PARAMS = "decoupled weight decay needs the current weights: call tx.update(grads, opt_state, params)."


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`decoupled_weight_decay`.

    Attributes:
      count: number of updates so far; the schedule multiplier and a scheduled
        weight decay are evaluated at it (like optax's learning-rate schedules).
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.


def weight_decay_mask(params: optax.Params, min_ndim: int = 2) -> Any:
    """A decay mask that decays only leaves with at least ``min_ndim`` dimensions.

    Kernels and convolution filters decay; biases, norm scales/offsets (1-D) and
    scalars do not, the usual choice. Pass it as ``mask=weight_decay_mask`` (it is
    called with the params) or ``mask=functools.partial(weight_decay_mask, min_ndim=3)``.

    Args:
      params: the parameter pytree.
      min_ndim: leaves with ``ndim >= min_ndim`` decay.

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> params = {"bias": jnp.zeros(3), "kernel": jnp.zeros((3, 2))}
      >>> print(sam_optax.decay.weight_decay_mask(params))
      {'bias': False, 'kernel': True}
    """
    _utils.check_int("min_ndim", min_ndim, low=0)
    return jax.tree.map(lambda p: jnp.ndim(p) >= min_ndim, params)


def decoupled_weight_decay(
    weight_decay: _utils.ScalarOrSchedule,
    schedule_multiplier: _utils.ScalarOrSchedule = 1.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adds the decoupled weight decay step :math:`-\eta_t\lambda\theta_{t-1}` to final updates.

    .. math::

      u_t \leftarrow u_t - \eta_t\,\lambda\,\theta_{t-1}

    where :math:`\theta_{t-1}` are the weights before the step (``params``) and
    :math:`\eta_t` the *schedule multiplier*, not the learning rate: this is the
    green term of Algorithm 1 line 9 (SGDW) and Algorithm 2 line 12 (AdamW).
    Chain it **after** any optimizer whose updates are final (already scaled by
    the learning rate), e.g. ``optax.chain(sam_optax.sam(optax.adam(lr)),
    decoupled_weight_decay(wd, eta))``, so that the decay never enters momentum
    or Adam moments. (``optax.add_decayed_weights`` instead goes *before* the
    learning-rate scaling, so its decay is multiplied by the full learning rate;
    placed before a momentum or Adam step it is an L2 term.)

    Args:
      weight_decay: :math:`\lambda \ge 0` per step at multiplier 1 (a number, or a
        schedule of the step count, e.g. :func:`normalized_weight_decay_restarts`).
        See :func:`normalized_weight_decay` for the paper's normalization.
      schedule_multiplier: :math:`\eta_t`, a number or optax schedule of the step
        count (e.g. :func:`cosine_warm_restarts`); it must be the same multiplier
        as the learning rate's, i.e. the learning rate is ``alpha * eta_t``.
      mask: which leaves decay: a pytree of bools with the structure of the params
        (or a prefix of it), or a function ``params -> mask`` such as
        :func:`weight_decay_mask`; ``None`` decays every leaf (as the paper).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      SGD with rate 0.1 and gradient 1 gives the update -0.1; the decay adds
      :math:`-\eta\lambda\theta = -0.5 \cdot 0.1 \cdot 2 = -0.1` to the kernel's,
      not to the bias's (masked out by :func:`weight_decay_mask`).

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> params = {"bias": jnp.array([2.0]), "kernel": jnp.array([[2.0]])}
      >>> tx = optax.chain(
      ...     optax.sgd(0.1),
      ...     sam_optax.decay.decoupled_weight_decay(0.1, 0.5, mask=sam_optax.decay.weight_decay_mask),
      ... )
      >>> grads = {"bias": jnp.ones(1), "kernel": jnp.ones((1, 1))}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(round(float(updates["bias"][0]), 4), round(float(updates["kernel"][0, 0]), 4))
      -0.1 -0.2

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    _utils.check_range("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _utils.check_range("schedule_multiplier", schedule_multiplier, low=0.0, allow_schedule=True)

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(_NO_PARAMS)
        eta = _utils.value_at(schedule_multiplier, state.count)
        lam = _utils.value_at(weight_decay, state.count)
        coef = eta * lam  # rounded once, to each leaf's compute dtype (float64 stays float64)
        new = jax.tree.map(
            lambda u, p: _decay_leaf(u, p, coef),
            updates,
            params,
        )
        return new, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    if mask is not None:
        return optax.masked(tx, mask)
    return tx


def _decay_leaf(u: jax.Array, p: jax.Array, coef: jax.Array) -> jax.Array:
    """``u - coef * p`` in the leaf's compute dtype (at least float32), returned in ``u``'s dtype."""
    u32, p32 = _utils.to_compute(u), _utils.to_compute(p)
    dtype = jnp.promote_types(u32.dtype, p32.dtype)
    return (u32 - coef.astype(dtype) * p32).astype(jnp.asarray(u).dtype)


def _check_learning_rate(learning_rate):
    if callable(learning_rate):
        raise ValueError(
            "learning_rate must be the constant base learning rate alpha (a number); "
            "give its schedule as schedule_multiplier=eta (the learning rate is "
            "alpha * eta_t and the decay eta_t * weight_decay)."
        )
    _utils.check_range("learning_rate", learning_rate, low=0.0)


def sgdw(
    learning_rate: float,
    momentum: float = 0.9,
    *,
    weight_decay: _utils.ScalarOrSchedule,
    schedule_multiplier: _utils.ScalarOrSchedule = 1.0,
    mask: MaskOrFn = None,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGD with momentum and decoupled weight decay (SGDW), Algorithm 1 of the paper.

    .. math::

      m_t &= \beta_1 m_{t-1} + \eta_t\,\alpha\, g_t \\
      \theta_t &= \theta_{t-1} - m_t - \eta_t\,\lambda\,\theta_{t-1}

    The momentum traces *learning-rate-scaled* gradients (``optax.sgd`` traces
    raw gradients and scales afterwards: the two differ once the schedule
    changes), and the decay is outside the trace and multiplied by the schedule
    multiplier :math:`\eta_t` only, not by :math:`\alpha`. With ``momentum=0``
    SGDW equals SGD with L2 regularization :math:`\lambda' = \lambda/\alpha`
    (Proposition 1); with momentum it does not (the L2 term would enter the
    trace). Implemented as ``chain(scale_by_schedule(-alpha * eta),
    trace(momentum), decoupled_weight_decay(weight_decay, eta, mask))``.

    As the base of a SAM-family rule (``sam_optax.sam(sgdw(...))``) the trace sees
    the rule's gradient and the decay uses the unperturbed weights.

    Args:
      learning_rate: :math:`\alpha \ge 0`, the constant base learning rate (the
        README of the official code uses 0.05 with batch 128).
      momentum: :math:`\beta_1 \in [0, 1)`.
      weight_decay: :math:`\lambda \ge 0`, per step at :math:`\eta=1` (number or
        schedule); :func:`normalized_weight_decay` computes it from
        :math:`\lambda_{norm}`. Required: its unit is not ``optax.sgd`` + L2's.
      schedule_multiplier: :math:`\eta_t` (number or schedule, e.g.
        :func:`cosine_warm_restarts`).
      mask: which leaves decay (see :func:`decoupled_weight_decay`).
      accumulator_dtype: dtype of the momentum trace (default: the params').

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      :math:`\alpha = 0.1, \beta_1 = 0.9, \lambda = 0.01, \eta = 1`, gradient 1 from
      :math:`\theta_0 = 2`: :math:`m_1 = 0.1`, :math:`\theta_1 = 2 - 0.1 - 0.02 = 1.88`;
      :math:`m_2 = 0.09 + 0.1 = 0.19`, :math:`\theta_2 = 1.88 - 0.19 - 0.0188 = 1.6712`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.decay.sgdw(0.1, momentum=0.9, weight_decay=0.01)
      >>> w = jnp.array([2.0])
      >>> state = tx.init(w)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.ones(1), state, w)
      ...     w = optax.apply_updates(w, updates)
      ...     print(round(float(w[0]), 4))
      1.88
      1.6712

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    _check_learning_rate(learning_rate)
    _utils.check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_float_dtype("accumulator_dtype", accumulator_dtype)
    _utils.check_range("schedule_multiplier", schedule_multiplier, low=0.0, allow_schedule=True)
    return optax.chain(
        optax.scale_by_schedule(lambda c: -learning_rate * _utils.value_at(schedule_multiplier, c)),
        optax.trace(decay=momentum, accumulator_dtype=accumulator_dtype),
        decoupled_weight_decay(weight_decay, schedule_multiplier, mask),
    )


def adamw(
    learning_rate: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: _utils.ScalarOrSchedule,
    schedule_multiplier: _utils.ScalarOrSchedule = 1.0,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with decoupled weight decay (AdamW), Algorithm 2 of the paper.

    .. math::

      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
      \hat m_t &= m_t / (1-\beta_1^t), \quad \hat v_t = v_t / (1-\beta_2^t) \\
      \theta_t &= \theta_{t-1} - \eta_t\Big(\alpha\,\hat m_t / (\sqrt{\hat v_t} + \epsilon)
                  + \lambda\,\theta_{t-1}\Big)

    **Difference to** ``optax.adamw`` (and ``torch.optim.AdamW``): they multiply
    the decay by the full learning rate :math:`\alpha\eta_t`, here it is
    multiplied by the schedule multiplier :math:`\eta_t` only. Conversion:
    ``adamw(alpha, weight_decay=lam, schedule_multiplier=eta)`` is exactly
    ``optax.adamw(learning_rate=lambda c: alpha * eta(c), weight_decay=lam / alpha)``
    (tested). E.g. the paper's normalized :math:`\lambda_{norm} = 0.025` with
    :math:`\alpha = 10^{-3}` is ``optax.adamw(..., weight_decay=25 * sqrt(b / (B T)))``.

    Implemented as ``chain(scale_by_adam(...), scale_by_schedule(-alpha * eta),
    decoupled_weight_decay(weight_decay, eta, mask))``; as the base of a SAM-family
    rule the moments see the rule's gradient and the decay the unperturbed weights.

    Args:
      learning_rate: :math:`\alpha \ge 0`, the constant base learning rate
        (paper default 0.001); its schedule is ``schedule_multiplier``.
      b1: :math:`\beta_1 \in [0, 1)`.
      b2: :math:`\beta_2 \in [0, 1)`.
      eps: :math:`\epsilon \ge 0`, added to :math:`\sqrt{\hat v_t}`.
      weight_decay: :math:`\lambda \ge 0`, per step at :math:`\eta=1` (number or
        schedule; see :func:`normalized_weight_decay`). Required: its unit is
        not ``optax.adamw``'s.
      schedule_multiplier: :math:`\eta_t` (number or schedule, e.g.
        :func:`cosine_warm_restarts` for AdamWR).
      eps_root: added to :math:`\hat v_t` inside the square root (optax's option; 0
        in the paper).
      mu_dtype: dtype of the first moment (default: the params').
      mask: which leaves decay (see :func:`decoupled_weight_decay`).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from sam_optax import decay
      >>> tx = decay.adamw(0.1, weight_decay=0.5)
      >>> w = jnp.array([2.0])
      >>> u, _ = tx.update(jnp.zeros(1), tx.init(w), w)  # zero gradient: only the decay
      >>> print(u)  # -eta * lam * w, not optax.adamw's -alpha * lam * w
      [-1.]

    References:
      Loshchilov et al, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    _check_learning_rate(learning_rate)
    _utils.check_range("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_range("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_range("eps", eps, low=0.0)
    _utils.check_range("eps_root", eps_root, low=0.0)
    _utils.check_float_dtype("mu_dtype", mu_dtype)
    _utils.check_range("schedule_multiplier", schedule_multiplier, low=0.0, allow_schedule=True)
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype),
        optax.scale_by_schedule(lambda c: -learning_rate * _utils.value_at(schedule_multiplier, c)),
        decoupled_weight_decay(weight_decay, schedule_multiplier, mask),
    )
