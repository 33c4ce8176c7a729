"""The one-object form: a rule and a geometry as one optax transformation taking a ``grad_fn``."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import optax

from sam_optax import _utils
from sam_optax.geometry import AscentGeometry, l2
from sam_optax.rules import scheduled_second_pass


class SharpnessAwareTxState(NamedTuple):
    """State of :func:`sharpness_aware`.

    Attributes:
      rule_state: the rule's state.
      ascent_state: the geometry's state.
    """

    rule_state: optax.OptState
    ascent_state: optax.OptState


def sharpness_aware(
    rule: optax.GradientTransformation, geometry: AscentGeometry | None = None
) -> optax.GradientTransformationExtraArgs:
    r"""A rule and an ascent geometry as one transformation whose ``update`` takes a ``grad_fn``.

    As ``optax.contrib.sam``'s opaque mode: ``updates`` is the clean gradient
    :math:`g` of the batch, and ``grad_fn(params) -> grads`` computes the
    gradient of the same batch's loss at other weights. One update is

    .. math::

      \epsilon = \mathrm{geometry}(g), \quad
      \tilde g = \mathrm{grad\_fn}(w + \epsilon), \quad
      u = \mathrm{rule}(g, \tilde g)

    which equals the two-piece form (:func:`sam_optax.sharpness_aware_grad`
    then ``rule.update``) with one shard. ``grad_fn`` sees whatever batch it
    closes over: any pytree. With a second-pass schedule (LookSAM,
    :func:`sam_optax.periodic`, :func:`sam_optax.randomized`) the second pass
    runs inside ``lax.cond`` only on its SAM steps.

    Limits (use the two-piece form for these): one shard per call, so no
    m-sharpness chunks or devices, no data selection, no multi-step ascent; the
    clean pass's aux (BatchNorm statistics) is the caller's. Pieces chained
    *before* this transformation change :math:`g`, hence the perturbation and
    the rule's :math:`g`, but not :math:`\tilde g`: put transformations that
    must act on both gradients in :func:`sam_optax.rules.apply_to_both` around
    the rule instead.

    Args:
      rule: a sam_optax rule (e.g. ``sam_optax.sam(optax.sgd(0.1))``), possibly
        wrapped by :mod:`sam_optax.rules`' wrappers.
      geometry: the ascent geometry (default ``sam_optax.geometry.l2(0.05)``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose
      ``update(grads, state, params, *, grad_fn, **extra_args)`` needs
      ``params`` and ``grad_fn``; other extra arguments go to the rule.

    Examples:
      With ``x`` all ones, ``y = (0, 1, 2, 3)`` and ``w = 0`` the clean gradient is
      :math:`g = (-3, -3)`, so :math:`\epsilon = 0.05\,g / \lVert g\rVert`
      moves both predictions to :math:`-0.0707`; the gradient there is
      :math:`\tilde g \approx (-3.1414, -3.1414)` and SGD(0.1) moves ``w`` to
      :math:`-0.1\,\tilde g`.

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
      >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.arange(4.0)}
      >>> tx = sam_optax.sharpness_aware(sam_optax.sam(optax.sgd(0.1)), sam_optax.geometry.l2(0.05))
      >>> w = jnp.zeros(2); state = tx.init(w)
      >>> grad_fn = lambda p: jax.grad(loss)(p, batch)
      >>> updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      >>> print([round(float(x), 4) for x in optax.apply_updates(w, updates)])
      [0.3141, 0.3141]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """
    geometry = l2(0.05) if geometry is None else geometry
    if not callable(getattr(geometry, "update", None)) or not callable(getattr(geometry, "init", None)):
        raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
    if not callable(getattr(rule, "update", None)) or not callable(getattr(rule, "init", None)):
        raise ValueError(f"rule must be an optax GradientTransformation, got {rule!r}.")
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        return SharpnessAwareTxState(rule_state=rule.init(params), ascent_state=geometry.init(params))

    def update_fn(
        updates, state, params=None, *, grad_fn: Callable[[optax.Params], optax.Updates] | None = None, **extra_args
    ):
        if grad_fn is None or not callable(grad_fn):
            raise ValueError("sharpness_aware needs grad_fn=: update(grads, state, params, grad_fn=...).")
        if params is None:
            raise ValueError("sharpness_aware needs params: update(grads, state, params, grad_fn=...).")
        eps, ascent_state = geometry.update(updates, state.ascent_state, params)

        def perturbed(_):
            return _utils.cast_like(grad_fn(_utils.add_perturbation(params, eps)), updates)

        full = scheduled_second_pass(state.rule_state)
        full = full(updates) if callable(full) and not hasattr(full, "shape") else full  # AE-SAM: from g
        g_pert = perturbed(None) if full is True else jax.lax.cond(full, perturbed, lambda _: updates, None)
        new_updates, rule_state = rule.update(
            updates, state.rule_state, params, perturbed_grads=g_pert, clean_grads=updates, **extra_args
        )
        return new_updates, SharpnessAwareTxState(rule_state=rule_state, ascent_state=ascent_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
