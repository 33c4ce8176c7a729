r"""SAF: Sharpness-Aware training for Free (Du et al., NeurIPS 2022, Alg. 1 and Eq. 8).

The loss of a step in epoch :math:`e` (1-indexed) is the base loss plus, for
:math:`E_{\rm start} < e`, a KL term pulling the current outputs towards the
outputs the network gave the *same examples* :math:`\tilde E` epochs earlier,
which are recorded from the ordinary forward pass: one gradient pass per step.

References:
  Du, Zhou, Feng, Tan, Zhou, `Sharpness-Aware Training for Free
  <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _utils
from sam_optax.trajectory import _common


class SAFState(NamedTuple):
    """State of :func:`saf`.

    Attributes:
      count: number of steps recorded so far (``int32``); the epoch is
        ``count // steps_per_epoch + 1``.
      table: the stored raw logits, ``[slots, num_examples, num_classes]``;
        epoch :math:`e` writes ring slot :math:`(e-1) \\bmod \\mathrm{slots}`.
    """

    count: jax.Array  # type: ignore[assignment]  # field shadows tuple.count, as in optax
    table: jax.Array


def check_ids(ids: Any, num_examples: int) -> None:
    """Host-side check of concrete example ids: ``ValueError`` unless all are in ``[0, num_examples)``.

    Does nothing for traced ids (inside ``jit``), where an out-of-range id
    instead gets a NaN target and multiplier (NaN loss and gradient) and its write is dropped.

    Examples:
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> print(sam_optax.trajectory.check_ids(jnp.array([0, 3]), num_examples=4))
      None
      >>> sam_optax.trajectory.check_ids(jnp.array([0, 4, -1]), num_examples=4)
      Traceback (most recent call last):
      ...
      ValueError: batch['index'] must hold example ids in [0, num_examples=4), got 2 outside it (e.g. [4, -1]).
    """
    if _utils.is_traced(ids):
        return
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= num_examples)]
    if bad.size:
        raise ValueError(
            f"batch['index'] must hold example ids in [0, num_examples={num_examples}), "
            f"got {bad.size} outside it (e.g. {bad[:5].tolist()})."
        )


def _ids(batch: Any, num_examples: int) -> jax.Array:
    """``batch["index"]`` checked (dtype, rank; range when concrete), out-of-range ids set to ``num_examples``."""
    if not isinstance(batch, Mapping) or "index" not in batch:
        raise ValueError("SAF needs the example ids in the batch: a dict with batch['index'] (int array [B]).")
    ids = batch["index"]
    if jnp.ndim(ids) != 1 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(
            f"batch['index'] must be an integer array [B], got shape {jnp.shape(ids)} and dtype {jnp.result_type(ids)}."
        )
    check_ids(ids, num_examples)
    ids = jnp.asarray(ids)
    # explicit: jnp indexing would wrap a negative id to another example's row
    return jnp.where((ids >= 0) & (ids < num_examples), ids, num_examples)


def saf(
    num_examples: int,
    num_classes: int,
    *,
    steps_per_epoch: int,
    weight: float = 0.3,
    temperature: float = 5.0,
    delay_epochs: int = 3,
    start_epoch: int = 5,
    end_epoch: int | None = None,
    scale: str = "code",
    slots: int | None = None,
    dtype: Any = jnp.float32,
) -> _common.TrajectoryRegularizer:
    r"""SAF's trajectory loss (Du et al. 2022, Alg. 1, Eq. 8) as a :class:`TrajectoryRegularizer`.

    With :math:`\hat y_i^{(e-\tilde E)}` the logits example :math:`i` got in
    epoch :math:`e - \tilde E` (recorded, pre-update weights, same forward
    pass), :math:`p_i = \mathrm{softmax}(\hat y_i^{(e-\tilde E)}/\tau)` and
    :math:`q_i = \mathrm{softmax}(f_\theta(x_i)/\tau)`, the loss in epoch
    :math:`e` (1-indexed) is

    .. math::

      L = L_B(\theta) + c\,\frac{1}{|B|}\sum_{i \in B} \mathrm{KL}(p_i \Vert q_i)
      \quad\text{for } E_{\rm start} < e \le E_{\rm end}, \qquad L_B(\theta) \text{ otherwise},

    :math:`c = \lambda\tau^2` (``scale="code"``, the default) or :math:`c = \lambda`
    (``scale="paper"``, Eq. 8 read literally). The gradient reaches the current
    logits only: :math:`\partial/\partial z_i = c\,(q_i - p_i)/(\tau |B|)`.

    **Scale.** The official code multiplies the KL by :math:`\tau^2` and the
    published :math:`\lambda = 0.3` was tuned with it, so the default keeps it:
    the effective weight on Eq. 8's KL is :math:`0.3 \cdot 25 = 7.5` (it also
    keeps the gradient's size independent of :math:`\tau`, as in distillation).

    **Epochs.** The epoch is ``count // steps_per_epoch + 1`` (the paper's
    1-indexed :math:`e`), so ``steps_per_epoch`` must be the loader's number of
    batches per epoch. On for ``start_epoch < e <= end_epoch``; the code's
    0-indexed ``kl_start_epoch < e < kl_end_epoch`` is ``start_epoch =
    kl_start_epoch + 1`` and ``end_epoch = kl_end_epoch`` here (the paper's rule
    starts one epoch earlier than the code). Outputs are recorded every step,
    also while off. ``start_epoch >= delay_epochs`` is required: the first
    active epoch reads epoch ``start_epoch + 1 - delay_epochs >= 1``.

    **Table and memory.** A global table indexed by example id (the official
    multi-GPU code keeps one per process, so after a reshuffle a target may
    come from another rank's empty table): ``slots * num_examples *
    num_classes * itemsize`` bytes, ``slots = delay_epochs`` by default (the
    paper's memory: 3 epochs of float32, 57 MiB on CIFAR-100, 14,660 MiB on
    ImageNet-1k). Epoch :math:`e` writes slot :math:`(e-1) \bmod S` and reads
    slot :math:`(e-1-\tilde E) \bmod S`, the same one for :math:`S = \tilde E`:
    each row is read before it is overwritten, which needs every id at most
    once per epoch; ``slots = delay_epochs + 1`` (the code's layout) also
    allows an id twice in an epoch. Ids never recorded read zeros (a uniform
    target, as in the code). Jit the step with the state donated, or every
    step copies the table.

    **Bad ids.** ``batch["index"]`` must hold ids in ``[0, num_examples)``.
    Concrete ids (outside ``jit``: :func:`trajectory_step` un-jitted,
    ``prepare`` / ``update`` called eagerly, or :func:`check_ids` on the host)
    raise ``ValueError``. Traced ids cannot raise: an out-of-range (or negative)
    id gets a NaN target and a NaN multiplier, so the loss and the gradient
    become NaN even while the term is off, and its write is dropped (no clamp,
    no wrap-around).

    Args:
      num_examples: :math:`N \ge 1`, the number of training examples (ids).
      num_classes: :math:`C \ge 1`, the logits' last axis.
      steps_per_epoch: optimizer steps per epoch (``>= 1``).
      weight: :math:`\lambda \ge 0` (paper 0.3; code argparse default 0.16).
      temperature: :math:`\tau > 0` (paper and code 5).
      delay_epochs: :math:`\tilde E \ge 1` (paper 3; the code's run.sh 2).
      start_epoch: :math:`E_{\rm start} \ge \tilde E` (paper 5).
      end_epoch: last active epoch (``> start_epoch``), ``None``: never off
        (code-only option; official default 300).
      scale: ``"code"`` (:math:`\lambda\tau^2`) or ``"paper"`` (:math:`\lambda`).
      slots: ring slots :math:`S \ge \tilde E` (default :math:`\tilde E`).
      dtype: the table's floating dtype (float32; bfloat16 halves the memory).

    Returns:
      A :class:`TrajectoryRegularizer` whose state is :class:`SAFState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from sam_optax import trajectory
      >>> reg = trajectory.saf(8, 3, steps_per_epoch=2, delay_epochs=1, start_epoch=1)
      >>> logits_fn = lambda w, b: b["x"] @ w
      >>> ce = lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean()
      >>> init, step = trajectory.trajectory_step(logits_fn, ce, optax.sgd(0.1), reg)
      >>> w = jnp.zeros((4, 3)); state = init(w)
      >>> batch = {"x": jnp.ones((4, 4)), "y": jnp.array([0, 1, 2, 0]), "index": jnp.arange(4)}
      >>> w, state, (loss, aux) = jax.jit(step)(w, state, batch)
      >>> state.reg_state.table.shape, int(aux["epoch"]), float(aux["scale"])
      ((1, 8, 3), 1, 0.0)

    References:
      Du, Zhou, Feng, Tan, Zhou, `Sharpness-Aware Training for Free
      <https://arxiv.org/abs/2205.14083>`_, NeurIPS 2022 (official code:
      ``AngusDujw/SAF``, ``SAF_train.py``).
    """
    _utils.check_positive_int("num_examples", num_examples)
    _utils.check_positive_int("num_classes", num_classes)
    _utils.check_int("delay_epochs", delay_epochs, low=1)
    _common.check_common(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale)
    if start_epoch < delay_epochs:
        raise ValueError(
            f"start_epoch must be >= delay_epochs={delay_epochs} (the first active epoch reads "
            f"the outputs of epoch start_epoch + 1 - delay_epochs >= 1), got {start_epoch}."
        )
    _utils.check_int("slots", slots, low=delay_epochs, allow_none=True)
    _utils.check_float_dtype("dtype", dtype)
    n_slots = delay_epochs if slots is None else slots
    dtype = jnp.float32 if dtype is None else dtype
    schedule = _common.make_schedule(weight, temperature, start_epoch, end_epoch, steps_per_epoch, scale)

    def init(params=None):
        del params
        return SAFState(jnp.zeros([], jnp.int32), jnp.zeros((n_slots, num_examples, num_classes), dtype))

    def prepare(state, batch, teacher_fn=None):
        del teacher_fn
        ids = _ids(batch, num_examples)
        epoch, mult = schedule(state)
        read = jnp.remainder(epoch - 1 - delay_epochs, n_slots)
        targets = state.table.at[read, ids].get(mode="fill", fill_value=jnp.nan)
        # a NaN multiplier, not only a NaN target: x * NaN is NaN on every backend (exp(NaN) may not be)
        scale = jnp.where(ids < num_examples, mult, jnp.nan)
        return _common.with_targets(batch, targets, scale)

    def update(state, batch, logits, params=None):
        del params
        ids = _ids(batch, num_examples)
        if jnp.shape(logits) != (ids.shape[0], num_classes):
            raise ValueError(
                f"logits must be [B, num_classes] = {(ids.shape[0], num_classes)}, got {jnp.shape(logits)}."
            )
        write = jnp.remainder(state.count // steps_per_epoch, n_slots)
        rows = jax.lax.stop_gradient(logits).astype(state.table.dtype)
        table = state.table.at[write, ids].set(rows, mode="drop")
        return SAFState(optax.safe_increment(state.count), table)

    return _common.TrajectoryRegularizer(init, prepare, _common.make_loss(temperature, num_classes), update, schedule)
