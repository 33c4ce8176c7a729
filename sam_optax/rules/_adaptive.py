"""AE-SAM: the second pass when the squared gradient norm is unusually large (Jiang et al. 2023)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.rules._looksam import scheduled_looksam
from sam_optax.rules._schedules import check_inner, scheduled_update


def _sq_norm(grads: optax.Updates) -> jax.Array:
    """:math:`\\lVert g\\rVert^2` in float32 (at least), over the leaves of ``grads``."""
    return jnp.asarray(_utils.tree_sum(jax.tree.map(jnp.square, _utils.to_compute(grads))), jnp.float32)


def _policy(policy: jax.Array, mu: jax.Array, var: jax.Array, count: jax.Array, n: jax.Array):
    r"""``(mu_t, var_t, sam_t)`` of section 4 of the reference sheet for :math:`n_t = \lVert g_t\rVert^2`."""
    delta, c_start, c_end, total = policy[0], policy[1], policy[2], policy[3]
    mu_t = delta * mu + (1.0 - delta) * n
    var_t = delta * var + (1.0 - delta) * jnp.square(n - mu_t)
    frac = jnp.clip(count.astype(jnp.float32) / total, 0.0, 1.0)
    c = jnp.where(c_start == c_end, c_start, c_start + (c_end - c_start) * frac)
    above = n >= mu_t + c * jnp.sqrt(var_t)
    sam = jnp.where(jnp.isneginf(c), True, jnp.where(jnp.isposinf(c), False, above))
    return mu_t, var_t, sam


def _decide(policy, mu, var, count, clean_grads):
    """The second-pass flag of the current step, from its clean gradient (see :func:`adaptive_policy`)."""
    return _policy(policy, mu, var, count, _sq_norm(clean_grads))[2]


class AdaptivePolicyState(NamedTuple):
    """State of :func:`adaptive_policy`.

    Attributes:
      schedule_count: number of updates so far.
      grad_sq_mean: :math:`\\mu`, the running mean of :math:`\\lVert g\\rVert^2`.
      grad_sq_var: :math:`\\sigma^2`, its running variance.
      policy: ``[delta, c_start, c_end, total_steps]`` (float32), the constants.
      rule_state: the wrapped rule's state.
    """

    schedule_count: jax.Array  # shape=(), dtype=int32.
    grad_sq_mean: jax.Array  # shape=(), dtype=float32.
    grad_sq_var: jax.Array  # shape=(), dtype=float32.
    policy: jax.Array  # shape=(4,), dtype=float32.
    rule_state: optax.OptState

    def decision(self) -> jax.tree_util.Partial:
        """``clean_grads -> bool``: the callable ``second_pass="auto"`` hands the two-pass helper."""
        return jax.tree_util.Partial(_decide, self.policy, self.grad_sq_mean, self.grad_sq_var, self.schedule_count)


def adaptive_policy(
    rule: optax.GradientTransformation,
    delta: float,
    c_start: float,
    c_end: float,
    total_steps: int,
    *,
    mu_init: float,
    var_init: float,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-SAM: a SAM step when the squared gradient norm exceeds its running mean by :math:`c_t` deviations.

    With :math:`n_t = \lVert g_t\rVert^2` the current clean gradient's squared
    norm (over the whole parameter tree) and :math:`t = 0, 1, \dots` the update count,

    .. math::

      \mu_t = \delta \mu_{t-1} + (1-\delta) n_t, \quad
      \sigma_t^2 = \delta \sigma_{t-1}^2 + (1-\delta)(n_t - \mu_t)^2, \quad
      c_t = c_{\mathrm{start}} + (c_{\mathrm{end}} - c_{\mathrm{start}}) \min(t / T, 1)

    and :math:`u_t = \mathrm{rule}(g_t, \tilde g_t)` if :math:`n_t \ge \mu_t +
    c_t \sigma_t`, else :math:`\mathrm{rule}(g_t, g_t)` (the base step for
    ``sam``, ``wsam``, ``gsam``). The decision needs the current :math:`g_t`, so
    ``second_pass="auto"`` hands the two-pass helper a callable evaluated after
    the clean pass (one shard per device only; ``lax.cond`` inside the compiled
    step, no host round trip): :math:`1 + \mathbb 1[\text{SAM}]` passes per step.
    The rule takes the same decision again from ``clean_grads`` (``grads`` when
    not given). :math:`c \equiv -\infty` is SAM, :math:`c \equiv +\infty` the base.

    The paper's values of :math:`\delta`, :math:`c` (its :math:`\lambda_1,
    \lambda_2`), :math:`\mu_0`, :math:`\sigma_0` and whether :math:`t` counts from
    0 or 1 were not read (a third-party port uses :math:`\delta` 0.2-0.3,
    :math:`c` from 0.4 to 0.2, :math:`\mu_0 = 0`, :math:`\sigma_0 = 10^{-10}`):
    they are required arguments, with no defaults. :math:`c_t` is held at
    :math:`c_{\mathrm{end}}` after :math:`T` updates.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.rules.adaptive_policy(sam_optax.sam(optax.sgd(0.1)), 0.9, 0.4, 0.2, 100,
      ...                                      mu_init=0.0, var_init=0.0)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, tx)
      >>> w = jnp.zeros(2); state = init(w)
      >>> w, state, out = jax.jit(step)(w, state, jnp.ones((4, 2)))
      >>> round(float(state.opt_state.grad_sq_mean), 6)  # (1 - 0.9) * ||g||^2 = 0.1 * 8
      0.8

    Args:
      rule: a rule (``sam``, ``wsam``, ``gsam``), possibly wrapped; not one that
        schedules its own second pass.
      delta: the running averages' decay, in [0, 1).
      c_start, c_end: :math:`c_0` and :math:`c_T` (real; :math:`\pm\infty` only
        with ``c_start == c_end``).
      total_steps: :math:`T`, an integer ``>= 1``.
      mu_init, var_init: :math:`\mu_{-1} \ge 0` and :math:`\sigma_{-1}^2 \ge 0`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state :class:`AdaptivePolicyState`.

    References:
      Jiang, Yang, Zhang, Kwok, `An Adaptive Policy to Employ Sharpness-Aware
      Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023
    """
    _utils.check_transformation("rule", rule)
    _utils.check_range("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    for name, c in (("c_start", c_start), ("c_end", c_end)):
        _utils.check_range(name, c, allow_inf=True)
    if (abs(float(c_start)) == float("inf") or abs(float(c_end)) == float("inf")) and c_start != c_end:
        raise ValueError(f"c_start and c_end may be infinite only when equal, got {c_start} and {c_end}.")
    _utils.check_positive_int("total_steps", total_steps)
    _utils.check_range("mu_init", mu_init, low=0.0)
    _utils.check_range("var_init", var_init, low=0.0)
    policy = jnp.asarray([delta, c_start, c_end, total_steps], jnp.float32)
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        rule_state = rule.init(params)
        check_inner(rule_state, "adaptive_policy")
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return AdaptivePolicyState(jnp.zeros([], jnp.int32), f32(mu_init), f32(var_init), policy, rule_state)

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        n = _sq_norm(updates if clean_grads is None else clean_grads)
        mu, var, sam = _policy(state.policy, state.grad_sq_mean, state.grad_sq_var, state.schedule_count, n)
        new_updates, rule_state = scheduled_update(
            rule, sam, updates, state.rule_state, params, perturbed_grads, clean_grads, "adaptive_policy", extra_args
        )
        count = optax.safe_increment(state.schedule_count)
        return new_updates, AdaptivePolicyState(count, mu, var, state.policy, rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adaptive_looksam(
    base: optax.GradientTransformation,
    delta: float,
    c_start: float,
    c_end: float,
    total_steps: int,
    *,
    mu_init: float,
    var_init: float,
    alpha: float = 0.7,
    eps: float = 1e-12,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AE-LookSAM: AE-SAM's policy picks the SAM steps, LookSAM's reuse update fills the others.

    :func:`adaptive_policy` around LookSAM (:func:`sam_optax.looksam`'s math,
    with its every-:math:`k` rule replaced by the policy's decision). With
    :math:`n_t = \lVert g_t\rVert^2`, :math:`\mu_t, \sigma_t, c_t` as in
    :func:`adaptive_policy`:

    .. math::

      n_t \ge \mu_t + c_t \sigma_t:&\quad \text{base}(\tilde g_t), \quad
        \hat u \leftarrow \frac{g_v}{\lVert g_v\rVert}, \;
        g_v = \tilde g_t - \frac{\langle g_t, \tilde g_t\rangle}{\lVert g_t\rVert^2} g_t \\
      \text{otherwise}:&\quad \text{base}(g_t + \alpha \lVert g_t\rVert \hat u)
        \quad (\hat u \text{ kept})

    The second pass runs only on the SAM steps (``second_pass="auto"`` of
    :func:`sam_optax.sharpness_aware_step`: decided after the clean pass, as
    AE-SAM; one shard per device). Until the first SAM step :math:`\hat u = 0`,
    so those steps are base steps on :math:`g_t`. :math:`c \equiv -\infty` is
    SAM (``looksam(base, k=1)``), :math:`c \equiv +\infty` the base optimizer.
    The paper's own AE-LookSAM formula was not read (reference sheet section 4:
    "the AE policy picks the SAM steps, and LookSAM's gradient reuse is used on
    the others"); the reuse update is the one of :func:`sam_optax.looksam`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.rules.adaptive_looksam(optax.sgd(0.1), 0.9, 0.4, 0.2, 100,
      ...                                       mu_init=0.0, var_init=0.0, alpha=0.7)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, tx)
      >>> w = jnp.zeros(2); state = init(w)
      >>> w, state, out = jax.jit(step)(w, state, jnp.ones((4, 2)))
      >>> bool(state.opt_state.rule_state.extra.sam_step)  # n_0 = 8 >= mu_0 + 0.4 sigma_0
      True

    Args:
      base: any optax optimizer (LookSAM's base).
      delta, c_start, c_end, total_steps, mu_init, var_init: the policy, as in
        :func:`adaptive_policy` (no defaults: the paper's values were not read).
      alpha: ``>= 0``, weight of the reused direction (LookSAM's, 0.7 by default).
      eps: ``>= 0``, added to norms in denominators.
      max_norm: optional ``> 0``; clip both gradients to this global norm first.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`AdaptivePolicyState` whose ``rule_state`` is LookSAM's
      :class:`~sam_optax.rules.SharpnessRuleState` (``extra``:
      ``ScheduledLookSAMState(sharpness_direction, sam_step)``, ``sam_step`` the
      last update's decision).

    References:
      Jiang, Yang, Zhang, Kwok, `An Adaptive Policy to Employ Sharpness-Aware
      Minimization <https://arxiv.org/abs/2304.14647>`_, ICLR 2023;
      Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    rule = scheduled_looksam(base, alpha, eps=eps, max_norm=max_norm)
    return adaptive_policy(rule, delta, c_start, c_end, total_steps, mu_init=mu_init, var_init=var_init)
