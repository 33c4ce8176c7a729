"""SAM: the base optimizer sees the perturbed gradient."""

from __future__ import annotations

import optax

from sam_optax.rules._base import sharpness_rule


def sam(base: optax.GradientTransformation, *, max_norm: float | None = None) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization: feed the base optimizer :math:`\nabla L(w+\epsilon)`.

    .. math::

      u_t = \mathrm{base}\big(\tilde g_t\big), \qquad
      \tilde g_t = \nabla L(w_t + \epsilon_t)

    where :math:`\epsilon_t` comes from the ascent geometry given to
    :func:`sam_optax.sharpness_aware_grad` (L2 ball: SAM; adaptive: ASAM;
    Fisher: Fisher-SAM).

    Which gradient each optax piece sees (see :mod:`sam_optax.rules`): pieces
    *inside* ``base`` (e.g. ``sam(optax.chain(optax.clip_by_global_norm(1.0),
    optax.sgd(0.1)))``) see :math:`\tilde g`; pieces *after* ``sam`` see the base
    optimizer's updates. Pieces chained *before* ``sam`` would see only the clean
    gradient, which this rule ignores: with ``clean_grads`` given (as the
    library's steps do) that raises ``ValueError``; use
    :func:`sam_optax.rules.apply_to_both`, :func:`sam_optax.rules.accumulate`
    or :func:`sam_optax.rules.skip_nonfinite` around the rule instead.

    Args:
      base: any optax optimizer (``optax.sgd(0.1, momentum=0.9)``, ``optax.adamw``,
        ...). ``optax.MultiSteps(base, k)`` here accumulates the perturbed
        gradients only (the same as :func:`sam_optax.rules.accumulate` for SAM).
      max_norm: optional ``> 0``; clip the gradients to this global norm first.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      ``update(grads, state, params, perturbed_grads=..., clean_grads=...)``.

    Examples:
      The base optimizer sees only :math:`\tilde g`: with :math:`\tilde g = (3, 4)`
      SGD with learning rate 0.1 gives :math:`-0.1\,\tilde g = (-0.3, -0.4)`,
      whatever :math:`g` is.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.sam(optax.sgd(0.1))
      >>> w = jnp.zeros(2)
      >>> g, g_pert = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.3, -0.4]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021
    """

    def combine(g, g_pert, state, params):
        del g, params
        return g_pert, None, state.extra

    return sharpness_rule(base, combine, name="sam", max_norm=max_norm)
