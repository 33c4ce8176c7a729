r"""MESA: Memory-Efficient Sharpness-Aware training (Du et al., NeurIPS 2022, Eq. 9-12).

SAF's trajectory loss with the stored outputs replaced by those of an
exponential moving average of the weights (a teacher): one copy of the weights
instead of a per-example table, one extra forward pass (no backward) per step.

References:
  Du, Zhou, Feng, Tan, Zhou, `Sharpness-Aware Training for Free
  <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.trajectory import _common


class MESAState(NamedTuple):
    """State of :func:`mesa`.

    Attributes:
      count: number of optimizer steps so far (``int32``); the epoch is
        ``count // steps_per_epoch + 1``.
      teacher: :math:`v_t`, the moving average of the weights (a tree like the
        ``params`` given to ``init``, e.g. Linen ``{"params", "batch_stats"}``).
    """

    count: jax.Array  # type: ignore[assignment]  # field shadows tuple.count, as in optax
    teacher: optax.Params


def _ema(teacher: optax.Params, params: optax.Params, decay: float) -> optax.Params:
    """:math:`d\\,v + (1-d)\\,\\theta` on floating leaves (in at least float32, stored in
    ``v``'s dtype); other leaves (integer counters, PRNG keys) take the new value."""

    def leaf(v, p):
        if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            return p
        v32, p32 = _utils.to_compute(v), _utils.to_compute(p)
        d = jnp.asarray(decay, _utils.hyper_dtype()).astype(v32.dtype)
        return (d * v32 + (1 - d) * p32).astype(jnp.result_type(v))

    return jax.tree.map(leaf, teacher, params)


def mesa(
    *,
    steps_per_epoch: int,
    weight: float = 0.8,
    temperature: float = 5.0,
    decay: float = 0.9998,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    scale: str = "code",
) -> _common.TrajectoryRegularizer:
    r"""MESA's trajectory loss (Du et al. 2022, Eq. 9-12) as a :class:`TrajectoryRegularizer`.

    The teacher is an EMA of the weights (Eq. 9), :math:`v_0 = \theta_0` and,
    after every optimizer step from step 1 (as the official code, timm's
    ``ModelEmaV2``; it contains the current :math:`\theta_t`, as Alg. 1 line 8),

    .. math::

      v_t = \beta\, v_{t-1} + (1 - \beta)\,\theta_t,

    and with :math:`p_i = \mathrm{softmax}(f_{v}(x_i)/\tau)` (no gradient),
    :math:`q_i = \mathrm{softmax}(f_\theta(x_i)/\tau)`, the loss in epoch
    :math:`e` (1-indexed) is (Eq. 12)

    .. math::

      L = L_B(\theta) + c\,\frac{1}{|B|}\sum_{i \in B} \mathrm{KL}(p_i \Vert q_i)
      \quad\text{for } E_{\rm start} < e \le E_{\rm end}, \qquad L_B(\theta) \text{ otherwise},

    :math:`c = \lambda\tau^2` (``scale="code"``, default: the published
    :math:`\lambda = 0.8` was run with the code's :math:`\tau^2`, effective
    weight 20 on Eq. 12's KL) or :math:`c = \lambda` (``"paper"``). The epoch
    and switch-on rules are :func:`saf`'s.

    **Teacher forward.** ``prepare(state, batch, teacher_fn)`` runs
    ``teacher_fn(state.teacher, batch) -> logits`` every step (also while off,
    as the code). The code's teacher is in eval mode: BatchNorm normalizes with
    the *averaged* running statistics, so with BatchNorm put them in the
    averaged tree (Linen: ``init({"params": p, "batch_stats": s})``) and run the
    teacher with ``train=False``. Non-float leaves (counters, keys) are copied,
    not averaged.

    **Identity.** With ``decay=0`` and a model without BatchNorm the teacher is
    the student, the KL term and its gradient are 0: plain training.

    Cost: one extra forward pass per step. Memory: one copy of the weights.

    Args:
      steps_per_epoch: optimizer steps per epoch (``>= 1``).
      weight: :math:`\lambda \ge 0` (paper and run.sh 0.8; code argparse 0.3).
      temperature: :math:`\tau > 0` (5).
      decay: :math:`\beta \in [0, 1)`; default 0.9998, the code's (timm's
        ``--model-ema-decay`` default; the paper states :math:`\beta \in (0.9, 1)`).
      start_epoch: :math:`E_{\rm start} \ge 0` (paper 5).
      end_epoch: last active epoch (``> start_epoch``), ``None``: never off
        (code-only; official default 360).
      scale: ``"code"`` (:math:`\lambda\tau^2`) or ``"paper"`` (:math:`\lambda`).

    Returns:
      A :class:`TrajectoryRegularizer` whose state is :class:`MESAState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from sam_optax import trajectory
      >>> reg = trajectory.mesa(steps_per_epoch=2, start_epoch=0, decay=0.5)
      >>> logits_fn = lambda w, b: b["x"] @ w
      >>> ce = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean()
      >>> init, step = trajectory.trajectory_step(logits_fn, ce, optax.sgd(0.1), reg)
      >>> w = jnp.zeros((4, 3)); state = init(w)
      >>> batch = {"x": jnp.eye(4), "y": jnp.array([0, 1, 2, 0])}
      >>> w1, state, _ = jax.jit(step)(w, state, batch)
      >>> bool(jnp.allclose(state.reg_state.teacher, 0.5 * w + 0.5 * w1))
      True

    References:
      Du, Zhou, Feng, Tan, Zhou, `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (official code:
      ``AngusDujw/SAF``, ``MESA_train.py``).
    """
    _common.check_common(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale)
    _utils.check_range("decay", decay, low=0.0, high=1.0, high_inclusive=False)
    schedule = _common.make_schedule(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale)

    def init(params):
        copy = jax.tree.map(lambda p: jnp.array(p, copy=True), params)  # never an alias (donation)
        return MESAState(jnp.zeros([], jnp.int32), copy)

    def prepare(state, batch, teacher_fn=None):
        if not callable(teacher_fn):
            raise ValueError(f"MESA needs teacher_fn(teacher_params, batch) -> logits, got {teacher_fn!r}.")
        targets = jax.lax.stop_gradient(teacher_fn(state.teacher, batch))
        if jnp.ndim(targets) != 2:
            raise ValueError(f"teacher_fn must return logits [B, C], got shape {jnp.shape(targets)}.")
        _, mult = schedule(state)
        return _common.with_targets(batch, targets, mult)

    def update(state, batch, logits, params):
        del batch, logits
        return MESAState(optax.safe_increment(state.count), _ema(state.teacher, params, decay))

    return _common.TrajectoryRegularizer(init, prepare, _common.make_loss(temperature), update, schedule)
