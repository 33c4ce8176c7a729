"""Stochastic Weight Averaging (SWA) and its learning-rate schedules."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.averaging import _common


class SWAState(NamedTuple):
    """State of :func:`swa`.

    Attributes:
      count: number of updates so far.
      n_averaged: number of snapshots in the average (the official code's ``swa_n``).
      average: the SWA weights, the mean of the ``n_averaged`` snapshots; a copy
        of the initial weights while ``n_averaged == 0``.
      inner_state: the inner optimizer's state.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.
    n_averaged: jax.Array  # shape=(), dtype=jnp.int32.
    average: optax.Params
    inner_state: optax.OptState


def swa(
    inner: optax.GradientTransformation,
    start_step: int,
    period: int = 1,
    *,
    accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Stochastic Weight Averaging: a running mean of the weights every ``period`` steps.

    The inner optimizer runs unchanged (its updates are returned as they are).
    After step :math:`i` (``i`` updates done), with :math:`w_i` the weights the
    caller will hold after applying this step's updates,

    .. math::

      \text{if } i \ge s \text{ and } (i - s) \bmod c = 0:\quad
      w_{SWA} \leftarrow w_{SWA}\Big(1 - \frac{1}{n+1}\Big) + \frac{w_i}{n+1},
      \quad n \leftarrow n + 1

    as the official code (``n`` counts the averages taken, so the first one
    copies the weights: ``w_SWA`` is exactly the mean of the snapshots). With
    ``start_step = 0`` the initial weights are the first snapshot (the paper's
    Algorithm 1 with a pretrained :math:`\hat w`). Pair it with a constant
    learning rate or :func:`swa_cyclic_schedule` (the weights are snapshotted at
    the end of each cycle, where the cyclic rate is :math:`\alpha_2`), e.g.
    ``optax.join_schedules([pre, swa_cyclic_schedule(a1, a2, c)], [s])`` with
    ``swa(..., start_step=s, period=c)``, or :func:`swa_official_schedule`.

    Read the average with :func:`swa_params` (also inside a chained state), then
    recompute BatchNorm statistics for it with :func:`recompute_batch_stats` /
    :func:`recompute_batch_stats_nnx` before evaluating.

    It wraps any optimizer, including the SAM-family rules, and forwards extra
    arguments: ``swa(sam_optax.wsam(base, 0.9, learning_rate=lr), s)`` is called as
    ``tx.update(g, state, params, perturbed_grads=gp)``. It must be the last
    transformation (its snapshot assumes the caller applies exactly its updates).

    Args:
      inner: the optimizer whose trajectory is averaged.
      start_step: ``s >= 0``, the number of updates after which the first snapshot
        is taken (the official ``swa_start`` counted in steps; 0: the initial weights).
      period: ``c >= 1``, steps between snapshots (``swa_c_epochs`` in steps; the
        cycle length of a cyclic schedule).
      accumulator_dtype: dtype of the average (default: the params'; e.g.
        ``jnp.float32`` for bf16 params). The arithmetic is in at least
        float32 (float64 for float64 params under ``jax_enable_x64``).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from sam_optax import averaging
      >>> tx = averaging.swa(optax.sgd(1.0), start_step=1, period=2)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> for _ in range(5):  # w = -1, -2, ..., -5; snapshots after steps 1, 3, 5
      ...     u, state = tx.update(jnp.ones(2), state, w)
      ...     w = optax.apply_updates(w, u)
      >>> print(averaging.swa_params(state), int(state.n_averaged))
      [-3. -3.] 3

    References:
      Izmailov et al, `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018
    """
    _utils.check_transformation("inner", inner)
    _common.check_int("start_step", start_step, low=0)
    _common.check_int("period", period, low=1)
    _utils.check_float_dtype("accumulator_dtype", accumulator_dtype)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SWAState(
            count=jnp.zeros([], jnp.int32),
            n_averaged=jnp.asarray(jnp.asarray(start_step) == 0, jnp.int32),
            average=_common.copy_tree(params, accumulator_dtype),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(_common.NO_PARAMS.format(name="swa"))
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = optax.safe_increment(state.count)
        take = (count >= start_step) & ((count - start_step) % period == 0)
        weight = 1.0 / (state.n_averaged + 1).astype(_utils.hyper_dtype())
        average = _common.interpolate(state.average, optax.apply_updates(params, updates), weight, take)
        n_averaged = state.n_averaged + take.astype(jnp.int32)
        return updates, SWAState(count, n_averaged, average, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def swa_params(opt_state: optax.OptState) -> optax.Params:
    """The SWA weights held in an optimizer state built with :func:`swa`.

    Works on the state of ``swa(...)`` itself or of any chain / wrapper containing
    exactly one :func:`swa` (found with ``optax.tree.get``).

    Args:
      opt_state: the optimizer state.

    Returns:
      The running average (see :class:`SWAState`; ``SWAState.n_averaged`` counts
      the snapshots in it).

    Examples:
      With ``start_step=0`` the initial weights are the first snapshot: SGD with
      rate 1 and gradient 1 visits 0, -1, -2, whose mean is -1.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.averaging.swa(optax.sgd(1.0), start_step=0)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.ones(2), state, w)
      ...     w = optax.apply_updates(w, updates)
      >>> print([float(x) for x in sam_optax.averaging.swa_params(state)], int(state.n_averaged))
      [-1.0, -1.0] 3
    """
    return _common.find_state(opt_state, SWAState, "sam_optax.averaging.swa").average


def swa_cyclic_schedule(alpha1: float, alpha2: float, cycle_length: int) -> optax.Schedule:
    r"""SWA's cyclical learning rate: linear from about :math:`\alpha_1` to :math:`\alpha_2` in each cycle.

    .. math::

      \alpha(i) = (1 - t(i))\,\alpha_1 + t(i)\,\alpha_2,\qquad
      t(i) = \frac{1}{c}\big(\mathrm{mod}(i - 1, c) + 1\big)

    with :math:`i = \text{count} + 1` the 1-based iteration (optax schedules get
    the 0-based count). The last iteration of each cycle uses :math:`\alpha_2`,
    and it is the one :func:`swa` with ``period = c`` snapshots. With ``c = 1``
    the rate is the constant :math:`\alpha_2`; the paper's constant schedule is
    ``optax.constant_schedule(alpha1)``.

    Args:
      alpha1: :math:`\alpha_1 \ge 0`, the rate at the start of a cycle.
      alpha2: :math:`\alpha_2 \ge 0` (usually :math:`\le \alpha_1`), at its end.
      cycle_length: :math:`c \ge 1` steps.

    Returns:
      An optax schedule.

    Examples:
      With :math:`c = 3` the steps of a cycle have :math:`t = 1/3, 2/3, 1`:
      :math:`0.1 - (0.1 - 0.01)\,t = 0.07, 0.04, 0.01`, then the next cycle.

      >>> import sam_optax
      >>> f = sam_optax.averaging.swa_cyclic_schedule(0.1, 0.01, 3)
      >>> print([round(float(f(count)), 4) for count in range(4)])
      [0.07, 0.04, 0.01, 0.07]

    References:
      Izmailov et al, `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018
    """
    _utils.check_range("alpha1", alpha1, low=0.0)
    _utils.check_range("alpha2", alpha2, low=0.0)
    _common.check_int("cycle_length", cycle_length, low=1)

    def schedule(count):
        t = (jnp.mod(jnp.asarray(count), cycle_length) + 1) / cycle_length
        return (1.0 - t) * alpha1 + t * alpha2

    return schedule


def swa_official_schedule(
    lr_init: float,
    swa_lr: float,
    swa_start: int,
    steps_per_epoch: int = 1,
) -> optax.Schedule:
    r"""The learning-rate schedule of the official SWA code (``train.py::schedule``).

    With :math:`e` the epoch (``count // steps_per_epoch``), :math:`t = e /
    \text{swa\_start}` and :math:`r = \text{swa\_lr} / \text{lr\_init}`, the rate
    is ``lr_init`` times 1 for :math:`t \le 0.5`, :math:`1 - (1 - r)(t - 0.5)/0.4`
    for :math:`0.5 < t \le 0.9` and :math:`r` after: constant at ``swa_lr``
    during averaging. Use it with ``swa(inner, start_step=swa_start *
    steps_per_epoch, period=swa_c_epochs * steps_per_epoch)``.

    Args:
      lr_init: initial rate ``> 0`` (official default 0.1).
      swa_lr: rate during averaging ``>= 0`` (official default 0.05).
      swa_start: the epoch averaging starts, ``>= 1`` (official default 161 of
        200; in steps if ``steps_per_epoch = 1``).
      steps_per_epoch: ``>= 1``; the rate changes once per epoch as in the
        official code.

    Returns:
      An optax schedule.

    Examples:
      With ``swa_start=10`` (one step per epoch): 0.1 up to epoch 5
      (:math:`t \le 0.5`), :math:`0.1\,(1 - 0.5 \cdot 0.2/0.4) = 0.075` at epoch
      7, then ``swa_lr`` from epoch 9 (:math:`t = 0.9`) on.

      >>> import sam_optax
      >>> f = sam_optax.averaging.swa_official_schedule(0.1, 0.05, swa_start=10)
      >>> print([round(float(f(count)), 4) for count in (0, 5, 7, 9, 20)])
      [0.1, 0.1, 0.075, 0.05, 0.05]

    References:
      Izmailov et al, `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018
    """
    _utils.check_range("lr_init", lr_init, low=0.0, low_inclusive=False)
    _utils.check_range("swa_lr", swa_lr, low=0.0)
    _common.check_int("swa_start", swa_start, low=1)
    _common.check_int("steps_per_epoch", steps_per_epoch, low=1)

    def schedule(count):
        epoch = jnp.floor_divide(jnp.asarray(count), steps_per_epoch)
        t = epoch.astype(_utils.hyper_dtype()) / swa_start
        ratio = swa_lr / lr_init
        factor = jnp.where(t <= 0.5, 1.0, jnp.where(t <= 0.9, 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4, ratio))
        return lr_init * factor

    return schedule
