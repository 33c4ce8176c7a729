"""Exponential moving average of the weights (not of the updates, as optax.ema)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.averaging import _common


class WeightEMAState(NamedTuple):
    """State of :func:`weight_ema`.

    Attributes:
      count: number of updates so far.
      ema: the (bias-corrected, if ``debias``) moving average of the weights.
      inner_state: the inner optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.
    ema: optax.Params
    inner_state: optax.OptState


def weight_ema(
    inner: optax.GradientTransformation,
    decay: float = 0.999,
    *,
    debias: bool = False,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Keeps an exponential moving average of the weights along the inner optimizer's trajectory.

    The inner optimizer runs unchanged. With :math:`w_t` the weights after step
    :math:`t` (what the caller holds once it applies this step's updates) and
    :math:`d` the decay:

    * ``debias=False`` (the usual "EMA of weights", e.g. timm's ``ModelEmaV2``):
      :math:`e_0 = w_0` (a copy of the initial weights) and
      :math:`e_t = d\,e_{t-1} + (1 - d)\,w_t`;
    * ``debias=True``: the bias-corrected average of :math:`w_1 .. w_t` only,

      .. math::

        \hat e_t = \frac{\sum_{s=1}^t d^{t-s}(1-d)\,w_s}{1 - d^t},

      i.e. ``optax.ema(decay, debias=True)`` applied to the sequence of weights.
      It is kept directly (no division at read time) by the recursion
      :math:`\hat e_t = \hat e_{t-1} + \frac{1-d}{1-d^t}(w_t - \hat e_{t-1})`, so
      :math:`\hat e_1 = w_1`: early in training the average is not pulled to the
      initialization.

    ``optax.ema`` averages the *updates* it receives (gradients, if placed first);
    this is the parameter form. Read it with :func:`ema_params`. It wraps any
    optimizer, including the SAM-family rules (extra arguments such as
    ``perturbed_grads`` are forwarded), and must be the last transformation.

    Args:
      inner: the optimizer whose trajectory is averaged.
      decay: :math:`d \in [0, 1)`.
      debias: bias correction (see above).
      accumulator_dtype: dtype of the average (default: the params'). The
        arithmetic is in at least float32 (float64 for float64 params under
        ``jax_enable_x64``, where ``decay`` is not rounded to float32).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      SGD with rate 1 and gradient 1 from :math:`w_0 = 2` gives :math:`w_1 = 1,
      w_2 = 0`. With :math:`d = 0.5`: :math:`e_1 = 0.5 \cdot 2 + 0.5 \cdot 1 = 1.5`,
      :math:`e_2 = 0.75`; debiased: :math:`\hat e_1 = w_1 = 1`,
      :math:`\hat e_2 = (d(1-d)\,w_1 + (1-d)\,w_2)/(1 - d^2) = 0.25/0.75 = 1/3`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> for debias in (False, True):
      ...     tx = sam_optax.averaging.weight_ema(optax.sgd(1.0), decay=0.5, debias=debias)
      ...     w = jnp.array([2.0])
      ...     state = tx.init(w)
      ...     averages = []
      ...     for _ in range(2):
      ...         updates, state = tx.update(jnp.ones(1), state, w)
      ...         w = optax.apply_updates(w, updates)
      ...         averages.append(round(float(sam_optax.averaging.ema_params(state)[0]), 4))
      ...     print(debias, averages)
      False [1.5, 0.75]
      True [1.0, 0.3333]

    References:
      Polyak et al, `Acceleration of Stochastic Approximation by Averaging
      <https://doi.org/10.1137/0330046>`_, 1992;
      Kingma et al, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015 (the bias correction)
    """
    _utils.check_transformation("inner", inner)
    _utils.check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_float_dtype("accumulator_dtype", accumulator_dtype)
    if not isinstance(debias, bool):
        raise ValueError(f"debias must be a bool, got {debias!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return WeightEMAState(
            count=jnp.zeros([], jnp.int32),
            ema=_common.copy_tree(params, accumulator_dtype),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(_common.NO_PARAMS.format(name="weight_ema"))
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = optax.safe_increment(state.count)
        d = jnp.asarray(decay, _utils.hyper_dtype())
        if debias:
            weight = (1.0 - d) / (1.0 - d ** count.astype(d.dtype))
        else:
            weight = 1.0 - d
        ema = _common.interpolate(state.ema, optax.apply_updates(params, updates), weight, jnp.asarray(True))
        return updates, WeightEMAState(count, ema, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ema_params(opt_state: optax.OptState) -> optax.Params:
    """The averaged weights held in an optimizer state built with :func:`weight_ema`.

    Works on the state of ``weight_ema(...)`` or of any chain / wrapper containing
    exactly one of it.

    Args:
      opt_state: the optimizer state.

    Returns:
      The moving average of the weights.

    Examples:
      Inside a chain (the gradient 3 is clipped to 1, SGD with rate 1 moves
      :math:`w` from 2 to 1, and :math:`e_1 = 0.5 \\cdot 2 + 0.5 \\cdot 1 = 1.5`):

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = optax.chain(
      ...     optax.clip_by_global_norm(1.0), sam_optax.averaging.weight_ema(optax.sgd(1.0), decay=0.5))
      >>> w = jnp.array([2.0])
      >>> state = tx.init(w)
      >>> updates, state = tx.update(jnp.array([3.0]), state, w)
      >>> w = optax.apply_updates(w, updates)
      >>> print(float(w[0]), float(sam_optax.averaging.ema_params(state)[0]))
      1.0 1.5
    """
    return _common.find_state(opt_state, WeightEMAState, "sam_optax.averaging.weight_ema").ema
