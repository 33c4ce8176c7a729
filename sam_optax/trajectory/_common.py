"""Shared by SAF and MESA: the regularizer value, the epoch switch, the softened
KL term, validation, and the plain-JAX step :func:`trajectory_step`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

#: Batch key of the gathered targets (raw logits ``[B, C]``: stored outputs or the teacher's).
TARGETS = "trajectory_targets"
#: Batch key of the per-example multiplier ``[B]`` of the KL term (0 while switched off).
SCALE = "trajectory_scale"
_SCALES = ("code", "paper")


class TrajectoryRegularizer(NamedTuple):
    """A loss-level regularizer with its own state (:func:`saf`, :func:`mesa`).

    Attributes:
      init: ``init(params) -> state`` (SAF ignores ``params``; MESA copies them
        into its teacher).
      prepare: ``prepare(state, batch, teacher_fn=None) -> batch``: the batch
        (a dict) with :data:`TARGETS` (raw target logits ``[B, C]``, no
        gradient) and :data:`SCALE` (``[B]``, the multiplier of each example's
        KL in force this step: 0 while switched off, NaN for a bad SAF id)
        added. SAF gathers the stored outputs of ``batch["index"]``; MESA runs
        ``teacher_fn(state.teacher, batch) -> logits``.
      loss: ``loss(logits, batch) -> scalar``, the weighted KL term
        :math:`\\frac{1}{|B|}\\sum_i s_i\\,\\mathrm{KL}(p_i \\Vert q_i)` of the
        current ``logits`` against the prepared batch (add it to the base loss).
      update: ``update(state, batch, logits, params) -> state``, after the
        optimizer step: SAF records ``logits`` (this step's outputs, pre-update
        weights) under ``batch["index"]``; MESA moves its teacher towards the
        updated ``params``. Both advance the step counter.
      schedule: ``schedule(state) -> (epoch, scale)``: the 1-indexed epoch of
        the next step and the multiplier in force (0 when off).
    """

    init: Callable[[optax.Params], Any]
    prepare: Callable[..., Any]
    loss: Callable[[jax.Array, Any], jax.Array]
    update: Callable[..., Any]
    schedule: Callable[[Any], tuple[jax.Array, jax.Array]]


class TrajectoryState(NamedTuple):
    """State of :func:`trajectory_step`: the optimizer's and the regularizer's."""

    opt_state: optax.OptState
    reg_state: Any


def check_common(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale) -> None:
    """Construction-time checks shared by SAF and MESA (``ValueError`` naming the argument)."""
    _utils.check_range("weight", weight, low=0.0)
    _utils.check_range("temperature", temperature, low=0.0, low_inclusive=False)
    _utils.check_int("start_epoch", start_epoch, low=0)
    _utils.check_int("end_epoch", end_epoch, low=0, allow_none=True)
    if end_epoch is not None and end_epoch <= start_epoch:
        raise ValueError(f"end_epoch must be None or > start_epoch={start_epoch}, got {end_epoch}.")
    _utils.check_positive_int("steps_per_epoch", steps_per_epoch)
    if scale not in _SCALES:
        raise ValueError(
            f"scale must be 'code' (weight * temperature**2 * KL) or 'paper' (weight * KL), got {scale!r}."
        )


def make_schedule(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale):
    r"""``schedule(state) -> (epoch, multiplier)`` from ``state.count``.

    ``epoch = count // steps_per_epoch + 1`` (1-indexed, the paper's :math:`e`);
    on when ``start_epoch < epoch`` (and ``epoch <= end_epoch``); the multiplier
    is ``weight * temperature**2`` (``scale="code"``) or ``weight`` (``"paper"``).
    """
    factor = float(weight) * (float(temperature) ** 2 if scale == "code" else 1.0)

    def schedule(state):
        epoch = state.count // steps_per_epoch + 1
        on = epoch > start_epoch
        if end_epoch is not None:
            on = on & (epoch <= end_epoch)
        return epoch, jnp.where(on, jnp.asarray(factor, _utils.hyper_dtype()), 0.0)

    return schedule


def softened_kl(logits: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
    r"""Per-example :math:`\mathrm{KL}(p \Vert q)`, :math:`p = \mathrm{softmax}(z_{\rm target}/\tau)`,
    :math:`q = \mathrm{softmax}(z/\tau)`, in at least float32; no gradient to ``targets``.

    Examples:
      With :math:`\tau = 1`, target logits :math:`(0, 0)` give :math:`p = (1/2, 1/2)` and
      logits :math:`(\ln 3, 0)` give :math:`q = (3/4, 1/4)`, so
      :math:`\mathrm{KL}(p \Vert q) = \frac12\ln\frac{1/2}{3/4} + \frac12\ln\frac{1/2}{1/4}
      = \frac12\ln\frac43 \approx 0.1438`; equal logits give 0.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> logits = jnp.array([[jnp.log(3.0), 0.0], [1.0, 2.0]])
      >>> targets = jnp.array([[0.0, 0.0], [1.0, 2.0]])
      >>> kl = sam_optax.trajectory.softened_kl(logits, targets, temperature=1.0)
      >>> print([round(float(x), 4) for x in kl])
      [0.1438, 0.0]
    """
    z = _utils.to_compute(logits)
    t = jax.lax.stop_gradient(targets).astype(z.dtype)
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    log_q = jax.nn.log_softmax(z / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def make_loss(temperature: float, num_classes: int | None = None) -> Callable[[jax.Array, Any], jax.Array]:
    """``loss(logits, batch)``: the mean over the batch of ``batch[SCALE] * KL``."""

    def loss(logits, batch):
        if TARGETS not in batch or SCALE not in batch:
            raise ValueError(f"the batch has no {TARGETS!r} / {SCALE!r}: pass it through regularizer.prepare first.")
        targets, scale = batch[TARGETS], batch[SCALE]
        if jnp.shape(logits) != jnp.shape(targets) or jnp.ndim(logits) != 2:
            raise ValueError(f"logits must be [B, C] like the targets {jnp.shape(targets)}, got {jnp.shape(logits)}.")
        if num_classes is not None and jnp.shape(logits)[1] != num_classes:
            raise ValueError(f"logits have {jnp.shape(logits)[1]} classes, the table num_classes={num_classes}.")
        kl = softened_kl(logits, targets, temperature)
        # a NaN scale (SAF: a bad example id) poisons the loss and the gradient, also while off
        return jnp.mean(scale.astype(kl.dtype) * kl)

    return loss


def with_targets(batch: Any, targets: jax.Array, scale: jax.Array) -> dict:
    """``batch`` (a dict) with :data:`TARGETS` and :data:`SCALE` (``scale`` broadcast
    to each example, ``[B]``, so that the prepared batch splits into shards)."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"the batch must be a dict (the targets are added to it), got {type(batch).__name__}.")
    scale = jnp.broadcast_to(scale, (jnp.shape(targets)[0],))
    return dict(batch, **{TARGETS: targets, SCALE: scale})


def trajectory_step(
    logits_fn: Callable[[optax.Params, Any], jax.Array],
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    tx: optax.GradientTransformation,
    regularizer: TrajectoryRegularizer,
) -> tuple[
    Callable[[optax.Params], TrajectoryState],
    Callable[..., tuple[optax.Params, TrajectoryState, tuple[jax.Array, dict]]],
]:
    r"""A training step with a trajectory regularizer (:func:`saf`, :func:`mesa`) and any optax ``tx``.

    ``state = init(params)``; ``params, state, (loss, aux) = step(params, state, batch)`` is

    .. math::

      z = f_\theta(x_B), \quad
      L = \ell(z, B) + \frac{1}{|B|}\sum_i s_i\,\mathrm{KL}(p_i \Vert q_i), \quad
      \theta \leftarrow \theta + \mathrm{tx}(\nabla_\theta L),

    then ``regularizer.update`` with :math:`z` (SAF records it: the outputs of
    the pre-update weights from the same forward pass) and the new
    :math:`\theta` (MESA's EMA). One gradient pass per step; MESA adds one
    teacher forward (``logits_fn(teacher, batch)``).

    ``step`` is pure; jit it with the state donated (``jax.jit(step,
    donate_argnums=(0, 1))``), else SAF copies its table every step. It compiles
    once: the epoch comes from the step counter in the state. Un-jitted, SAF's
    concrete ids are checked on the host (``ValueError``).

    Args:
      logits_fn: ``logits_fn(params, batch) -> logits [B, C]``.
      loss_fn: ``loss_fn(logits, batch) -> scalar``, e.g. the mean cross-entropy.
      tx: any optax ``GradientTransformation`` (``tx.update(grads, opt_state, params)``).
      regularizer: :func:`saf` (the batch holds ``batch["index"]``, int ``[B]``)
        or :func:`mesa`.

    Returns:
      ``(init, step)``; ``loss`` is the total loss differentiated and ``aux``
      has ``base_loss``, ``trajectory_loss`` (the weighted KL term), ``epoch``
      (1-indexed, of this step) and ``scale`` (the multiplier, 0 while off).

    Examples:
      See :func:`saf` and :func:`mesa`; a Flax recipe is in :mod:`sam_optax.trajectory`.
      The first step of :func:`mesa` (on from epoch 1, ``weight=0.8``, :math:`\tau = 5`):
      the teacher is still the initial weights, so the KL term is 0 while its
      multiplier is :math:`\lambda\tau^2 = 20`; zero weights give uniform logits
      over 3 classes, a cross-entropy of :math:`\ln 3 \approx 1.0986`.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> reg = sam_optax.trajectory.mesa(steps_per_epoch=2, start_epoch=0)
      >>> logits_fn = lambda w, b: b["x"] @ w
      >>> ce = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean()
      >>> init, step = sam_optax.trajectory.trajectory_step(logits_fn, ce, optax.sgd(0.1), reg)
      >>> w = jnp.zeros((2, 3))
      >>> state = init(w)
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([0, 1])}
      >>> w, state, (loss, aux) = jax.jit(step)(w, state, batch)
      >>> print(f"{float(aux['base_loss']):.4f} {float(aux['trajectory_loss']):.4f}")
      1.0986 0.0000
      >>> print(int(aux["epoch"]), float(aux["scale"]), int(state.reg_state.count))
      1 20.0 1

    References:
      Du, Zhou, Feng, Tan, Zhou, `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (Alg. 1).
    """
    _utils.check_transformation("tx", tx)
    if not isinstance(regularizer, TrajectoryRegularizer):
        raise ValueError(f"regularizer must be a TrajectoryRegularizer (saf(...) or mesa(...)), got {regularizer!r}.")

    def init(params):
        return TrajectoryState(tx.init(params), regularizer.init(params))

    def step(params, state, batch):
        epoch, mult = regularizer.schedule(state.reg_state)
        prepared = regularizer.prepare(state.reg_state, batch, logits_fn)

        def total(p):
            logits = logits_fn(p, batch)
            base, term = loss_fn(logits, batch), regularizer.loss(logits, prepared)
            return base + term, (base, term, logits)

        (loss, (base, term, logits)), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        reg_state = regularizer.update(state.reg_state, batch, logits, new_params)
        aux = {"base_loss": base, "trajectory_loss": term, "epoch": epoch, "scale": mult}
        return new_params, TrajectoryState(opt_state, reg_state), (loss, aux)

    return init, step
