r"""Trajectory regularizers: SAF and MESA (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022).

Loss-level regularizers with their own state that compose with any optax
optimizer (and the sam_optax rules): the loss gets a softened KL term pulling
the current outputs towards past outputs of the same examples,

.. math::

  L = L_B(\theta) + c\,\frac{1}{|B|}\sum_{i\in B}
      \mathrm{KL}\bigl(\mathrm{softmax}(\hat y_i/\tau) \,\Vert\, \mathrm{softmax}(f_\theta(x_i)/\tau)\bigr),

with :math:`\hat y_i` the outputs recorded :math:`\tilde E` epochs earlier
(:func:`saf`, one gradient pass per step, a per-example table) or those of an
EMA of the weights (:func:`mesa`, one extra forward, one copy of the weights).

* :func:`trajectory_step`: the plain-JAX step ``(init, step)`` with any ``tx``.
* The building blocks, for Flax (:func:`sam_optax.flax.linen_train_step`,
  :func:`sam_optax.flax.nnx_train_step`) or a custom step, are the fields of
  the :class:`TrajectoryRegularizer`: ``prepare`` the batch (targets gathered
  into it), add ``loss(logits, batch)`` to the loss and return the logits as a
  metric, then ``update`` after the step::

    reg = trajectory.saf(num_examples, num_classes, steps_per_epoch=spe)
    reg_state = reg.init(None)
    prepare = jax.jit(reg.prepare)
    update = jax.jit(reg.update, donate_argnums=0)  # in place: no copy of the table

    def loss_fn(apply, batch):
        logits = apply(batch["x"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce + reg.loss(logits, batch), {"logits": logits}

    step = sam_optax.flax.linen_train_step(loss_fn, has_aux=True)
    for batch in data:                      # batch["index"]: the example ids
        batch = prepare(reg_state, batch)
        state, metrics = step(state, batch)
        reg_state = update(reg_state, batch, metrics["logits"], None)

  MESA: ``reg_state = reg.init(variables)`` (e.g. ``{"params": ...,
  "batch_stats": ...}``), ``prepare(reg_state, batch, teacher_fn)`` with
  ``teacher_fn = lambda v, b: model.apply(v, b["x"], train=False)``, and
  ``update(reg_state, batch, None, {"params": state.params, "batch_stats":
  state.batch_stats})``. With a two-pass rule (SAM) both passes see the same
  targets; the logits metric is the clean pass's. Do not use m-sharpness
  shards there: the metrics are averaged over shards.
"""

from sam_optax.trajectory._common import (
    SCALE,
    TARGETS,
    TrajectoryRegularizer,
    TrajectoryState,
    softened_kl,
    trajectory_step,
)
from sam_optax.trajectory._mesa import MESAState, mesa
from sam_optax.trajectory._saf import SAFState, check_ids, saf

__all__ = [
    "MESAState",
    "SAFState",
    "SCALE",
    "TARGETS",
    "TrajectoryRegularizer",
    "TrajectoryState",
    "check_ids",
    "mesa",
    "saf",
    "softened_kl",
    "trajectory_step",
]
