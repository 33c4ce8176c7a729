"""Wrappers around a rule: what optax's chain-before, MultiSteps and apply_if_finite
cannot do for a rule, since they see only the clean gradient.

A rule's ``update`` takes the clean gradient :math:`g` as ``updates`` and the
perturbed gradient :math:`\\tilde g` as the extra argument ``perturbed_grads``.
optax's own pieces and wrappers transform ``updates`` only, so placed before or
around a rule they touch :math:`g` and let :math:`\\tilde g` through unchanged.
The wrappers here act on both gradients, and :func:`check_placement` finds the
optax wrappers that cannot be detected from inside the rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sam_optax import _utils
from sam_optax.rules._base import SharpnessRuleState, read_both


def _zeros_or_keep(pred: jax.Array, do_update, rule_state: optax.OptState):
    """``lax.cond(pred, do_update, lambda: (zero updates, rule_state))``.

    The zero updates get the shapes and dtypes of ``do_update``'s (read with
    ``jax.eval_shape``, so the rule is computed only when ``pred`` holds).
    """
    shapes = jax.eval_shape(do_update)[0]

    def keep():
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), rule_state

    return lax.cond(pred, do_update, keep)


# --------------------------------------------------------------------------
# apply_to_both
# --------------------------------------------------------------------------


class ApplyToBothState(NamedTuple):
    """State of :func:`apply_to_both`.

    Attributes:
      pre_clean_state: ``pre``'s state on the clean gradient.
      pre_perturbed_state: ``pre``'s state on the perturbed gradient.
      rule_state: the rule's state.
    """

    pre_clean_state: optax.OptState
    pre_perturbed_state: optax.OptState
    rule_state: optax.OptState


def apply_to_both(
    pre: optax.GradientTransformation, rule: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    r"""Applies an optax transformation to both gradients, then the rule.

    .. math::

      u_t = \mathrm{rule}\big(\mathrm{pre}(g_t), \mathrm{pre}'(\tilde g_t)\big)

    where :math:`\mathrm{pre}` and :math:`\mathrm{pre}'` are two copies of
    ``pre``, each with its own state. This is what chaining ``pre`` before the
    rule would be expected to do: e.g. ``optax.clip_by_global_norm(1.0)`` clips
    each gradient to norm 1 (each by its own norm; the rule's ``max_norm=`` does
    the same), and ``optax.add_decayed_weights(wd)`` adds :math:`wd\,w` to both,
    so that L2 decay enters SAM's :math:`\tilde g` and cancels in decoupled
    WSAM's sharpness step :math:`\tilde g - g`. Pieces that should see one
    gradient only belong inside the rule's base optimizer.

    Args:
      pre: an optax transformation applied gradient-wise (clipping, decay,
        scaling, ...; extra keyword arguments of ``update`` are forwarded to it).
      rule: a rule (``sam``, ``wsam``, ...), or a wrapper of one.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose
      ``update(grads, state, params, *, perturbed_grads, clean_grads=None,
      **extra_args)`` calls ``rule.update(pre(g), ..., perturbed_grads=pre'(g_pert),
      clean_grads=pre(g))``; given ``clean_grads``, it first checks that
      nothing chained before it changed ``grads`` (``ValueError`` otherwise).

    Examples:
      Clipping both gradients to norm 1 before SAM: :math:`\tilde g = (8, 6)`
      (norm 10) becomes :math:`(0.8, 0.6)`, and SAM with SGD(1.0) steps by
      :math:`-(0.8, 0.6)`; the clean :math:`g = (3, 4)` is clipped by its own
      norm, 5.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.apply_to_both(optax.clip_by_global_norm(1.0), sam_optax.sam(optax.sgd(1.0)))
      >>> w = jnp.zeros(2)
      >>> g, g_pert = jnp.array([3.0, 4.0]), jnp.array([8.0, 6.0])
      >>> updates, state = tx.update(g, tx.init(w), w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.8, -0.6]
    """
    _utils.check_transformation("pre", pre)
    _utils.check_transformation("rule", rule)
    pre = optax.with_extra_args_support(pre)
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        return ApplyToBothState(
            pre_clean_state=pre.init(params),
            pre_perturbed_state=pre.init(params),
            rule_state=rule.init(params),
        )

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        perturbed_grads = read_both(updates, perturbed_grads, clean_grads, "apply_to_both")
        g, pre_clean = pre.update(updates, state.pre_clean_state, params, **extra_args)
        g_pert, pre_pert = pre.update(perturbed_grads, state.pre_perturbed_state, params, **extra_args)
        new_updates, rule_state = rule.update(
            g, state.rule_state, params, perturbed_grads=g_pert, clean_grads=g, **extra_args
        )
        return new_updates, ApplyToBothState(pre_clean, pre_pert, rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# skip_nonfinite
# --------------------------------------------------------------------------


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite` (field names distinct from optax's ``ApplyIfFiniteState``).

    Attributes:
      nonfinite_streak: number of consecutive steps so far with a non-finite
        gradient (0 after a finite step).
      last_step_finite: whether both gradients of the last step were finite.
      nonfinite_total: total number of steps with a non-finite gradient.
      rule_state: the rule's state.
    """

    nonfinite_streak: jax.Array  # shape=(), dtype=jnp.int32.
    last_step_finite: jax.Array  # shape=(), dtype=bool.
    nonfinite_total: jax.Array  # shape=(), dtype=jnp.int32.
    rule_state: optax.OptState


def _all_finite(*trees: Any) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def skip_nonfinite(
    rule: optax.GradientTransformation, max_consecutive_errors: int
) -> optax.GradientTransformationExtraArgs:
    r"""Skips a step when the clean *or* the perturbed gradient has a NaN or Inf.

    ``optax.apply_if_finite`` for rules: that one checks only ``updates``, the
    clean gradient, and lets a non-finite ``perturbed_grads`` reach the
    parameters. With :math:`n_t` the number of consecutive non-finite steps up
    to step :math:`t` (``nonfinite_streak``), step :math:`t` is applied iff

    .. math::

      \mathrm{finite}(g_t) \wedge \mathrm{finite}(\tilde g_t)
      \;\vee\; n_t > \text{max\_consecutive\_errors};

    otherwise the updates are zeros and the rule's state is kept. As in optax,
    after ``max_consecutive_errors`` skipped steps in a row the next non-finite
    step is let through (the optimizer "gives up"), a finite step resets
    :math:`n_t` to 0, and ``nonfinite_total`` counts every non-finite step
    (applied or not). Only the leaves the rule sees are checked (inside
    ``optax.masked`` the masked-out ones are not).

    Args:
      rule: a rule (``sam``, ``wsam``, ...), or a wrapper of one.
      max_consecutive_errors: integer ``>= 0``, the number of consecutive
        non-finite steps skipped before one is let through.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`SkipNonfiniteState`; its ``update(grads, state, params, *,
      perturbed_grads, clean_grads=None, **extra_args)`` forwards everything to
      ``rule.update``.

    Examples:
      A NaN in the perturbed gradient only: the step is skipped (zero updates),
      which ``optax.apply_if_finite`` would not do; the next finite step is
      applied and resets the streak.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.skip_nonfinite(sam_optax.sam(optax.sgd(0.1)), max_consecutive_errors=2)
      >>> w = g = jnp.ones(2)
      >>> state = tx.init(w)
      >>> for g_pert in (jnp.array([jnp.nan, 1.0]), jnp.array([1.0, 2.0])):
      ...     updates, state = tx.update(g, state, w, perturbed_grads=g_pert)
      ...     print([round(float(u), 4) for u in updates], int(state.nonfinite_streak), int(state.nonfinite_total))
      [0.0, 0.0] 1 1
      [-0.1, -0.2] 0 1
    """
    _utils.check_transformation("rule", rule)
    _utils.check_int("max_consecutive_errors", max_consecutive_errors, low=0)
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        return SkipNonfiniteState(
            nonfinite_streak=jnp.zeros([], jnp.int32),
            last_step_finite=jnp.array(True, jnp.bool_),
            nonfinite_total=jnp.zeros([], jnp.int32),
            rule_state=rule.init(params),
        )

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        finite = _all_finite(updates, read_both(updates, perturbed_grads, clean_grads, "skip_nonfinite"))
        streak = jnp.where(finite, jnp.zeros([], jnp.int32), optax.safe_increment(state.nonfinite_streak))

        def do_update():
            return rule.update(
                updates,
                state.rule_state,
                params,
                perturbed_grads=perturbed_grads,
                clean_grads=clean_grads,
                **extra_args,
            )

        apply = jnp.logical_or(finite, streak > max_consecutive_errors)
        new_updates, rule_state = _zeros_or_keep(apply, do_update, state.rule_state)
        total = jnp.where(finite, state.nonfinite_total, optax.safe_increment(state.nonfinite_total))
        return new_updates, SkipNonfiniteState(streak, finite, total, rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# accumulate
# --------------------------------------------------------------------------


class AccumulateState(NamedTuple):
    """State of :func:`accumulate` (field names distinct from optax's ``MultiStepsState``).

    Attributes:
      micro_step: micro-steps accumulated since the last update, in
        ``[0, every_k)``.
      clean_mean: running mean of the clean gradients (at least float32).
      perturbed_mean: running mean of the perturbed gradients (at least float32).
      rule_state: the rule's state.
    """

    micro_step: jax.Array  # shape=(), dtype=jnp.int32.
    clean_mean: optax.Updates
    perturbed_mean: optax.Updates
    rule_state: optax.OptState


def accumulate(rule: optax.GradientTransformation, every_k: int) -> optax.GradientTransformationExtraArgs:
    r"""Gradient accumulation for rules: the rule once per ``every_k`` micro-batches.

    ``optax.MultiSteps(rule, k)`` for rules: that one averages only the clean
    gradient and hands the rule the last micro-batch's perturbed gradient.
    Here both are averaged over micro-steps :math:`i = 1..k`,

    .. math::

      \bar g = \frac1k \sum_i g_i, \qquad
      \bar{\tilde g} = \frac1k \sum_i \tilde g_i ,

    each :math:`\tilde g_i` taken at its own micro-batch's perturbation
    (m-sharpness with :math:`m` the micro-batch size). The first :math:`k-1`
    calls return zero updates and leave the rule's state alone; the
    :math:`k`-th returns ``rule.update`` on the means (one call, so the rule's
    own step count and learning-rate schedule advance once per :math:`k`
    micro-steps) and resets the means. It jits once (``lax.cond``).

    The step is the same as ``rule(optax.MultiSteps(base, k))`` for ``sam``,
    which feeds its base the perturbed gradient only; a rule using both
    gradients (``wsam``, ``gsam``, ``looksam``) needs this wrapper.

    Args:
      rule: a rule (``sam``, ``wsam``, ...), or a wrapper of one.
      every_k: integer ``>= 1``, micro-steps per update.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`AccumulateState`; its ``update(grads, state, params, *,
      perturbed_grads, clean_grads=None, **extra_args)`` forwards the extra
      arguments of the ``k``-th call to ``rule.update``.

    Examples:
      ``every_k = 2`` around SAM with SGD(0.1): the first call returns zeros;
      the second steps by :math:`-0.1` times the mean perturbed gradient,
      :math:`\frac12((2, 0) + (4, 2)) = (3, 1)`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.accumulate(sam_optax.sam(optax.sgd(0.1)), every_k=2)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> clean = [jnp.array([1.0, 0.0]), jnp.array([3.0, 0.0])]
      >>> perturbed = [jnp.array([2.0, 0.0]), jnp.array([4.0, 2.0])]
      >>> for g, g_pert in zip(clean, perturbed):
      ...     updates, state = tx.update(g, state, w, perturbed_grads=g_pert)
      ...     print([round(float(u), 4) for u in updates])
      [0.0, 0.0]
      [-0.3, -0.1]
    """
    _utils.check_transformation("rule", rule)
    _utils.check_positive_int("every_k", every_k)
    rule = optax.with_extra_args_support(rule)

    def zeros(params):
        return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _utils.compute_dtype(p)), params)

    def init_fn(params):
        return AccumulateState(
            micro_step=jnp.zeros([], jnp.int32),
            clean_mean=zeros(params),
            perturbed_mean=zeros(params),
            rule_state=rule.init(params),
        )

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        perturbed_grads = read_both(updates, perturbed_grads, clean_grads, "accumulate")
        n = (state.micro_step + 1).astype(jnp.float32)

        def running_mean(mean, x):
            return jax.tree.map(lambda m, y: m + (_utils.to_compute(y) - m) / n.astype(m.dtype), mean, x)

        clean_mean = running_mean(state.clean_mean, updates)
        perturbed_mean = running_mean(state.perturbed_mean, perturbed_grads)
        last = state.micro_step + 1 >= every_k

        def do_update():
            g = _utils.cast_like(clean_mean, updates)
            g_pert = _utils.cast_like(perturbed_mean, updates)
            return rule.update(g, state.rule_state, params, perturbed_grads=g_pert, clean_grads=g, **extra_args)

        new_updates, rule_state = _zeros_or_keep(last, do_update, state.rule_state)
        reset = lambda t: jax.tree.map(lambda x: jnp.where(last, jnp.zeros_like(x), x), t)  # noqa: E731
        new_state = AccumulateState(
            micro_step=jnp.where(last, 0, state.micro_step + 1).astype(jnp.int32),
            clean_mean=reset(clean_mean),
            perturbed_mean=reset(perturbed_mean),
            rule_state=rule_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# check_placement
# --------------------------------------------------------------------------

_REPLACEMENT = {
    optax.ApplyIfFiniteState: ("optax.apply_if_finite(rule, n)", "sam_optax.rules.skip_nonfinite(rule, n)"),
    optax.MultiStepsState: ("optax.MultiSteps(rule, k)", "sam_optax.rules.accumulate(rule, k)"),
}


def _is_wrapper(x: Any) -> bool:
    return isinstance(x, tuple(_REPLACEMENT))


def _is_rule_state(x: Any) -> bool:
    return isinstance(x, SharpnessRuleState)


def check_placement(opt_state: optax.OptState) -> None:
    """Raises ``ValueError`` if a rule sits inside ``optax.apply_if_finite`` or ``optax.MultiSteps``.

    Those wrappers act on the clean gradient only (``apply_if_finite`` does not
    check the perturbed gradient; ``MultiSteps`` does not average it), and
    ``apply_if_finite`` passes the rule the gradient unchanged, so the rule's own
    ``clean_grads`` check cannot see it. A base optimizer wrapped in them inside
    a rule (``sam(optax.MultiSteps(sgd, k))``) is fine.

    Args:
      opt_state: an optimizer state (e.g. ``tx.init(params)``), any nesting.

    Raises:
      ValueError: naming the wrapper found and its ``sam_optax.rules`` replacement.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> rule, w = sam_optax.sam(optax.sgd(0.1)), jnp.zeros(2)
      >>> sam_optax.check_placement(sam_optax.accumulate(rule, 2).init(w))  # no error
      >>> try:
      ...     sam_optax.check_placement(optax.MultiSteps(rule, 2).init(w))
      ... except ValueError as e:
      ...     print(str(e).split(": ")[-1])
      use sam_optax.rules.accumulate(rule, k) instead.
    """
    for node in jax.tree.leaves(opt_state, is_leaf=_is_wrapper):
        if not _is_wrapper(node):
            continue
        if any(_is_rule_state(x) for x in jax.tree.leaves(node, is_leaf=_is_rule_state)):
            wrong, right = _REPLACEMENT[type(node)]
            raise ValueError(
                f"a sharpness rule is wrapped in {wrong}, which sees only the clean "
                f"gradient, not the perturbed one: use {right} instead."
            )
