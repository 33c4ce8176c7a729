"""LookSAM: a full SAM gradient every k steps, the stored sharpness direction in between."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.rules._base import SharpnessRuleState, global_norm_parts, same_arrays, sharpness_rule


class LookSAMState(NamedTuple):
    r"""LookSAM's own state (the ``extra`` of its :class:`SharpnessRuleState`).

    Attributes:
      sharpness_direction: the unit sharpness direction
        :math:`g_v / (\lVert g_v\rVert + \varepsilon)`, with :math:`g_v` the part of
        the last full step's perturbed gradient orthogonal to its clean gradient
        (stored normalized, so a reuse step never takes its norm).
      looksam_full_step: whether the *next* update is a full SAM step (read it
        with :func:`looksam_full_step` to skip the second pass on reuse steps).
    """

    sharpness_direction: optax.Updates
    looksam_full_step: jax.Array  # shape=(), dtype=bool.


def looksam(
    base: optax.GradientTransformation,
    k: int = 5,
    alpha: float = 0.7,
    *,
    eps: float = 1e-12,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: compute the SAM gradient every ``k`` steps and reuse its direction.

    On full steps (:math:`t \bmod k = 0`) the base optimizer sees the perturbed
    gradient :math:`g_s = \tilde g` and the sharpness direction is stored:

    .. math::

      g_v = g_s - \lVert g_s\rVert \cos\theta \, \frac{g}{\lVert g\rVert}
          = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2} g .

    On the other steps only the clean gradient is computed and the base
    optimizer sees

    .. math::

      g_s = g + \alpha \, \frac{\lVert g\rVert}{\lVert g_v\rVert} \, g_v .

    ``k = 1`` is exactly SAM. To make the reuse steps cost one gradient pass,
    skip the second pass there: :func:`sam_optax.sharpness_aware_step` does it by
    itself (``lax.cond`` inside ``jit``, no recompilation), or jit the two literal
    programs and pick one on the host with :func:`looksam_schedule` (faster on
    XLA:CPU for convnets). A reuse step costs one pass over the parameters more
    than the base optimizer (:math:`\lVert g\rVert`): the unit direction
    :math:`g_v / \lVert g_v\rVert` is stored, and when the rule is given
    ``perturbed_grads`` that *are* ``grads`` (the same arrays: no second pass was
    run, as the step passes them with a literal ``second_pass=False``) the step
    compiles without the full-step branch at all. Such a call on a step that
    should be a full one gives a NaN update, never a silent SGD step. The
    decomposition is over the whole parameter vector, as in the paper's
    Algorithm 1 (some third-party implementations do it per tensor).

    Args:
      base: any optax optimizer.
      k: period of the full SAM steps, an integer ``>= 1``. An integer array
        works too, traced or not (``optax.inject_hyperparams`` injects ``k``
        unless ``static_args=('k',)``); a traced ``k`` is not range-checked.
      alpha: ``>= 0``, weight of the reused direction (0.7 in common settings).
      eps: ``>= 0``, added to norms in denominators.
      max_norm: optional ``> 0``; clip both gradients to this global norm first.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      ``update(grads, state, params, perturbed_grads=...)`` (on reuse steps the
      ``perturbed_grads`` are ignored).

    Examples:
      ``k = 2``, ``alpha = 0.5``, SGD(0.1). Step 0 is a full step: with
      :math:`g = (1, 0)`, :math:`\tilde g = (1, 1)` the update is
      :math:`-0.1\,\tilde g` and the stored direction is
      :math:`g_v / \lVert g_v\rVert = (0, 1)`. Step 1 reuses it: with
      :math:`g = (2, 0)` (passed as ``perturbed_grads`` too: no second pass) the base
      sees :math:`g + 0.5 \cdot 2 \cdot (0, 1) = (2, 1)`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.looksam(optax.sgd(0.1), k=2, alpha=0.5)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> g, g_pert = jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])
      >>> updates, state = tx.update(g, state, w, perturbed_grads=g_pert)
      >>> print([round(float(u), 4) for u in updates])
      [-0.1, -0.1]
      >>> g = jnp.array([2.0, 0.0])
      >>> updates, state = tx.update(g, state, w, perturbed_grads=g)
      >>> print([round(float(u), 4) for u in updates])
      [-0.2, -0.1]

    References:
      Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    k = _check_k(k)
    _utils.check_range("alpha", alpha, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def init_extra(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _utils.compute_dtype(p)), params)
        return LookSAMState(sharpness_direction=zeros, looksam_full_step=jnp.asarray(True))

    def combine(g, g_pert, state, params):
        del params
        base_grads, w = _full_or_reuse(
            g, g_pert, state.extra.sharpness_direction, state.rule_count % k == 0, alpha, eps
        )
        return base_grads, None, LookSAMState(w, (state.rule_count + 1) % k == 0)

    return sharpness_rule(base, combine, name="looksam", max_norm=max_norm, init_extra=init_extra)


def _full_or_reuse(
    g: optax.Updates, g_pert: optax.Updates, w: optax.Updates, full: jax.Array, alpha: Any, eps: Any
) -> tuple[optax.Updates, optax.Updates]:
    r"""LookSAM's step: ``(what the base optimizer sees, the new stored unit direction)``.

    ``full``: :math:`\tilde g` and the fresh direction; otherwise the reuse
    gradient :math:`g + \alpha \lVert g\rVert w` and ``w`` kept."""
    d, n = global_norm_parts(g)
    if same_arrays(g, g_pert):  # no second pass was run: a reuse step (NaN if it should not be)
        bad = jnp.where(full, jnp.nan, 0.0)
        return jax.tree.map(lambda gi, wi: gi + d * (alpha * n * wi) + bad, g, w), w
    w = _stored_direction(g, g_pert, w, full, eps)  # read w once: updated in place
    base_grads = jax.tree.map(lambda gi, si, wi: jnp.where(full, si, gi + d * (alpha * n * wi)), g, g_pert, w)
    return base_grads, w


class ScheduledLookSAMState(NamedTuple):
    """State (``extra``) of LookSAM whose full steps a scheduler around it chooses.

    Attributes:
      sharpness_direction: the stored unit sharpness direction (as :class:`LookSAMState`'s).
      sam_step: whether the current (after an update: the last) update is a full
        SAM step; written by the scheduler before each update (not a flag of the
        next update, so ``second_pass="auto"`` does not read it).
    """

    sharpness_direction: optax.Updates
    sam_step: jax.Array  # shape=(), dtype=bool.


def scheduled_looksam(
    base: optax.GradientTransformation,
    alpha: float = 0.7,
    *,
    eps: float = 1e-12,
    max_norm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM's full and reuse steps, the full ones chosen by the scheduler around it.

    The rule of :func:`looksam` with :math:`t mod k = 0` replaced by the
    scheduler's flag (``ScheduledLookSAMState.sam_step``, set by
    :func:`~sam_optax.rules.adaptive_policy`, :func:`~sam_optax.periodic`,
    :func:`~sam_optax.randomized` before each update). Alone it never takes a full
    step. Before the first full step the stored direction is 0, so a reuse step is
    the base step on :math:`g`. Used by :func:`sam_optax.rules.adaptive_looksam`.
    """
    _utils.check_range("alpha", alpha, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def init_extra(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _utils.compute_dtype(p)), params)
        return ScheduledLookSAMState(sharpness_direction=zeros, sam_step=jnp.asarray(False))

    def combine(g, g_pert, state, params):
        del params
        full = state.extra.sam_step
        base_grads, w = _full_or_reuse(g, g_pert, state.extra.sharpness_direction, full, alpha, eps)
        return base_grads, None, ScheduledLookSAMState(w, full)

    return sharpness_rule(base, combine, name="looksam", max_norm=max_norm, init_extra=init_extra)


def _stored_direction(
    g: optax.Updates, g_s: optax.Updates, w: optax.Updates, full: jax.Array, eps: Any
) -> optax.Updates:
    """The new stored unit direction: the fresh one on full steps, ``w`` otherwise.

    The reductions over the tree run under ``lax.cond`` with scalar outputs
    (nothing param-sized is copied), so a reuse step only selects ``w``."""
    zero = jnp.zeros((), _utils.tree_compute_dtype(g))
    zeros = (zero,) * 4
    inv_g, a, b1, b2 = jax.lax.cond(full, lambda: _direction_coefficients(g, g_s, eps), lambda: zeros)
    fresh = lambda gi, si: ((si - a * (gi * inv_g)) * b1) * b2  # noqa: E731
    return jax.tree.map(lambda gi, si, wi: jnp.where(full, fresh(gi, si), wi), g, g_s, w)


def _direction_coefficients(g: optax.Updates, g_s: optax.Updates, eps: Any) -> tuple[jax.Array, ...]:
    r"""Scalars ``(inv_g, a, b1, b2)`` with the unit sharpness direction
    :math:`w_i = ((g_{s,i} - a\, g_i\, \mathrm{inv}_g)\, b_1)\, b_2`."""
    g_v, (inv_g, a) = sharpness_direction(g_s, g, eps, coefficients=True)
    _, d_v, n_v = _utils.tree_norm_parts(g_v)
    inv_v = 1.0 / d_v  # d_v is a power of two: exact, normal
    dtype = _utils.tree_compute_dtype(g)
    out = (inv_g, a, 2 * inv_v, 0.5 / _utils.safe_divisor(n_v + eps / d_v))
    return tuple(jnp.asarray(x, dtype) for x in out)


def sharpness_direction(g_s: optax.Updates, g: optax.Updates, eps: Any, *, coefficients: bool = False) -> Any:
    r""":math:`g_v = g_s - \langle g, g_s\rangle\, g / (\lVert g\rVert^2 + \varepsilon)`.

    Overflow-safe: with ``u = g / d``, ``n = ||u||`` and :math:`g_s = d_s u_s`
    (``d``, :math:`d_s` powers of two near the largest entries) it is
    :math:`g_s - a\, u` with :math:`a = d_s \langle u, u_s\rangle / (n^2 + \varepsilon / d^2)`;
    a zero ``g`` gives :math:`g_v = g_s` (no NaN, also with ``eps = 0``).
    With ``coefficients=True`` returns ``(g_v, (1 / d, a))``.
    """
    u, d, n = _utils.tree_norm_parts(g)
    u_s, d_s = _utils.tree_scaled(g_s)
    # eps / d^2, and 0 for eps = 0: under jit XLA may fold eps / d / d into eps / (d * d),
    # which is 0 / 0 for a tiny gradient (d * d underflows)
    eps_term = jnp.where(eps > 0, eps / d / d, 0.0)
    c = _utils.tree_vdot(u, u_s) / _utils.safe_divisor(n * n + eps_term)
    a, inv_g = d_s * c, 1.0 / d
    g_v = jax.tree.map(lambda s, gi: s - a * (_utils.to_compute(gi) * inv_g), _utils.to_compute(g_s), g)
    return (g_v, (inv_g, a)) if coefficients else g_v


def _check_k(k: Any) -> Any:
    """``k`` as a Python int ``>= 1``; an integer tracer is kept (``count % k`` works)."""
    _utils.check_int("k", k, low=1, allow_array=True)  # a tracer: shape and dtype only
    if _utils.is_traced(k):
        return k
    return int(k)


def looksam_full_step(opt_state: optax.OptState) -> jax.Array:
    """Whether the next LookSAM update is a full SAM step (needs the second pass).

    Finds the LookSAM state anywhere inside ``opt_state`` (chains, wrappers).

    Examples:
      With ``k = 2`` the updates 0, 2, 4, ... are full steps:

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = optax.chain(sam_optax.looksam(optax.sgd(0.1), k=2), optax.scale(1.0))
      >>> w = g = jnp.ones(2)
      >>> state = tx.init(w)
      >>> flags = []
      >>> for _ in range(3):
      ...     flags.append(bool(sam_optax.looksam_full_step(state)))
      ...     updates, state = tx.update(g, state, w, perturbed_grads=2 * g)
      >>> print(flags)
      [True, False, True]
    """
    return optax.tree.get(opt_state, "looksam_full_step")


class LookSAMSchedule:
    """Host-side literal ``second_pass`` flags of a LookSAM rule (see :func:`looksam_schedule`).

    An endless iterator: the flag of update ``t`` is ``t % k == 0``, starting at
    ``t = step``; ``check(opt_state)`` raises ``ValueError`` when ``step`` is not
    the LookSAM state's ``rule_count`` or the next flag is not its
    ``looksam_full_step``. Build it with :func:`looksam_schedule`, which reads
    ``step`` from the state and checks it.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> state = sam_optax.looksam(optax.sgd(0.1), k=3).init(jnp.zeros(2))
      >>> schedule = sam_optax.looksam_schedule(3, state)
      >>> print(type(schedule).__name__, schedule.k, schedule.step)
      LookSAMSchedule 3 0
      >>> print([next(schedule) for _ in range(4)])
      [True, False, False, True]
    """

    def __init__(self, k: int, step: int):
        self.k, self.step = k, step

    def __iter__(self) -> LookSAMSchedule:
        return self

    def __next__(self) -> bool:
        full = self.step % self.k == 0
        self.step += 1
        return full

    def check(self, opt_state: optax.OptState) -> None:
        """``ValueError`` unless the next flag is the LookSAM state's own (one device read)."""
        count, full = _looksam_counter(opt_state)
        if count != self.step or bool(full) != (self.step % self.k == 0):
            raise ValueError(
                f"looksam_schedule is out of sync with the LookSAM state: the schedule is at step "
                f"{self.step} (k={self.k}, next full step: {self.step % self.k == 0}), the state at "
                f"rule_count {count} (next full step: {bool(full)}). Build the schedule from the "
                "state it drives, with the rule's k, and take one flag per update."
            )


def looksam_schedule(k: int, opt_state: optax.OptState) -> LookSAMSchedule:
    r"""The literal ``second_pass`` flag of each coming LookSAM update, from a Python counter.

    ``next(schedule)`` is ``True`` on full steps (:math:`t \bmod k = 0`) and
    ``False`` on reuse steps, with :math:`t` the rule's own ``rule_count``: read
    from ``opt_state`` once, here, and then advanced by one per flag, as the rule
    advances it by one per update. So the schedule stays in sync as long as each
    flag drives exactly one update of the rule (not under
    :func:`sam_optax.rules.accumulate` or :func:`sam_optax.rules.skip_nonfinite`,
    which update the rule on some calls only). No flag reads a device value, so
    the host never waits for the previous step. ``check(opt_state)`` compares the
    schedule with the state again (e.g. once per epoch); a reuse program run on a
    step that should be full gives a NaN update (see :func:`looksam`).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, sam_optax.looksam(optax.sgd(0.1), k=3))
      >>> programs = {f: jax.jit(lambda w, s, b, f=f: step(w, s, b, second_pass=f)) for f in (True, False)}
      >>> w = jnp.zeros(2); state = init(w)
      >>> schedule = sam_optax.looksam_schedule(3, state.opt_state)
      >>> flags = []
      >>> for _ in range(4):
      ...     flags.append(next(schedule))
      ...     w, state, out = programs[flags[-1]](w, state, jnp.ones((4, 2)))
      >>> flags
      [True, False, False, True]
      >>> schedule.check(state.opt_state)

    Args:
      k: the rule's period, a Python integer ``>= 1`` (the ``k`` given to :func:`looksam`).
      opt_state: the optimizer state holding the LookSAM state (e.g. ``state.opt_state``
        of :func:`sam_optax.sharpness_aware_step`), at the step the schedule starts.

    Returns:
      A :class:`LookSAMSchedule` (an endless iterator of bools, with ``check``).

    Raises:
      ValueError: if ``k`` is not an integer ``>= 1``, if ``opt_state`` holds no (or more
        than one) LookSAM state, or if its next full step disagrees with ``k``.
    """
    _utils.check_int("k", k, low=1)
    count, _ = _looksam_counter(opt_state)
    schedule = LookSAMSchedule(int(k), count)
    schedule.check(opt_state)
    return schedule


def _looksam_counter(opt_state: optax.OptState) -> tuple[int, Any]:
    """``(rule_count, looksam_full_step)`` of the only LookSAM rule state in ``opt_state``."""
    is_look = lambda x: isinstance(x, SharpnessRuleState) and isinstance(x.extra, LookSAMState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_look) if is_look(x)]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one LookSAM state, found {len(found)}.")
    return int(found[0].rule_count), found[0].extra.looksam_full_step
