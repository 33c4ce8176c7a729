"""WSAM: sharpness as a regularization term weighted by gamma / (1 - gamma)."""

from __future__ import annotations

import jax
import optax

from sam_optax import _utils
from sam_optax.rules._base import sharpness_rule


def injected_learning_rate(inner_state):
    """The ``learning_rate`` of an ``optax.inject_hyperparams`` optimizer's state, or None."""
    try:
        return optax.tree.get(inner_state, "learning_rate", filtering=lambda path, value: hasattr(value, "dtype"))
    except KeyError as e:
        raise ValueError(f"several learning_rate hyperparameters in the base optimizer's state: {e}") from e


def wsam(
    base: optax.GradientTransformation,
    gamma: float = 0.9,
    *,
    learning_rate: _utils.ScalarOrSchedule | None = None,
    decouple: bool = True,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Weighted SAM: :math:`L + \frac{\gamma}{1-\gamma}(L^{SAM} - L)`.

    With :math:`\alpha = \gamma / (1 - \gamma)`, :math:`s_t = \tilde g_t - g_t`:

    * decoupled ("weight decouple", the default and the paper's recommended
      mode): the base optimizer sees only the clean gradient and the sharpness
      step is added with the *current* learning rate :math:`\eta_t`,

      .. math::

        u_t = \mathrm{base}(g_t) - \eta_t\,\alpha\,s_t

      so momentum / Adam moments never see the sharpness term;
    * coupled (``decouple=False``): the base optimizer sees

      .. math::

        \hat g_t = \frac{1 - 2\gamma}{1 - \gamma}\,g_t + \frac{\gamma}{1-\gamma}\,\tilde g_t.

    ``gamma = 0`` is the base optimizer, coupled ``gamma = 1/2`` is SAM, and
    with plain SGD both modes coincide. (The paper's 2-D toy figure is
    reproduced by the coupled form.)

    Which gradient each optax piece sees (see :mod:`sam_optax.rules`): pieces
    inside ``base`` see :math:`g` (decoupled: so weight decay or clipping there
    never touch the sharpness step) or :math:`\hat g` (coupled); pieces after
    ``wsam`` see the final updates (sharpness step included). A piece that must
    act on both gradients, e.g. L2 decay that enters :math:`\tilde g` too, goes in
    :func:`sam_optax.rules.apply_to_both` (decoupled, it then cancels in
    :math:`s_t`); chaining it before ``wsam`` raises ``ValueError`` when
    ``clean_grads`` is given. Decoupled ``wsam`` refuses a base containing
    ``optax.MultiSteps`` (its sharpness step would act on every micro-step): use
    :func:`sam_optax.rules.accumulate` around the rule.

    Args:
      base: any optax optimizer (not ``optax.MultiSteps`` when decoupled).
      gamma: weight of the sharpness term, ``0 <= gamma < 1``; official default
        0.9 (the paper's stable range is about 0.8 - 0.95).
      learning_rate: the base optimizer's learning rate (number or the same
        optax schedule) for the decoupled sharpness step, evaluated at the step
        count like optax's own schedules. If ``None`` it is read each step from
        the ``learning_rate`` hyperparameter of a base made with
        ``optax.inject_hyperparams`` (the value the base used in that step).
        Unused when ``decouple=False``.
      decouple: decoupled (``True``) or coupled (``False``) WSAM.
      max_norm: optional ``> 0``; both gradients are clipped to this global norm
        before the rule (official ``max_norm``).

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      ``update(grads, state, params, perturbed_grads=..., clean_grads=...)``.

    Examples:
      With ``gamma = 0.75`` (:math:`\alpha = 3`), :math:`g = (1, 0)` and
      :math:`\tilde g = (1, 1)`, so :math:`s = (0, 1)`: decoupled SGD(0.1) gives
      :math:`-0.1\,g - 0.1 \cdot 3\,s = (-0.1, -0.3)`; coupled, the base sees
      :math:`\hat g = -2 g + 3 \tilde g = (1, 3)`, the same step with plain SGD.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> w = jnp.zeros(2)
      >>> g, g_pert = jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])
      >>> tx = sam_optax.wsam(optax.sgd(0.1), gamma=0.75, learning_rate=0.1)
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.1, -0.3]
      >>> tx = sam_optax.wsam(optax.sgd(0.1), gamma=0.75, decouple=False)
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.1, -0.3]

    References:
      Yue et al, `Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
      Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023
    """
    _utils.check_range("gamma", gamma, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(decouple, bool):
        raise ValueError(f"decouple must be a bool, got {decouple!r}.")
    if learning_rate is not None:
        _utils.check_range("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    alpha = gamma / (1.0 - gamma)

    if not decouple:

        def combine_coupled(g, g_pert, state, params):
            del params
            c_clean = (1.0 - 2.0 * gamma) / (1.0 - gamma)
            return jax.tree.map(lambda a, b: c_clean * a + alpha * b, g, g_pert), None, state.extra

        return sharpness_rule(base, combine_coupled, name="wsam", max_norm=max_norm)

    def check_init(inner_state):
        if learning_rate is None and injected_learning_rate(inner_state) is None:
            raise ValueError(
                "decoupled wsam needs the learning rate: pass learning_rate= (the base "
                "optimizer's, a number or schedule), or build the base with "
                "optax.inject_hyperparams so it can be read from its state."
            )

    def combine(g, g_pert, state, params):
        del params

        def post(updates, new_inner_state):
            if learning_rate is not None:
                lr = _utils.value_at(learning_rate, state.rule_count)
            else:
                lr = injected_learning_rate(new_inner_state)
            return jax.tree.map(lambda u, a, b: u - lr * alpha * (b - a), updates, g, g_pert)

        return g, post, state.extra

    return sharpness_rule(base, combine, name="wsam", max_norm=max_norm, check_init=check_init, has_post=True)
