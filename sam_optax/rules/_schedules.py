"""Second-pass schedulers: periodic SAM (MosaicML Composer) and RST (randomized SAM).

Late-phase SAM (:func:`sam_optax.rules.late_phase`) and AE-SAM
(:func:`sam_optax.rules.adaptive_policy`) build on the pieces here.

A scheduler wraps any rule and decides, in its own state, whether the *next*
update is a SAM step (needs the second gradient pass) or a base step (the rule
is fed :math:`\\tilde g = g`, which every rule here turns into its base
optimizer's step). ``second_pass="auto"`` of :func:`sam_optax.sharpness_aware_step`
(and the one-object form) reads that flag before the step's passes, so skipped
steps run one gradient pass (``lax.cond``, no recompilation).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _utils
from sam_optax.rules._base import read_both, same_arrays
from sam_optax.rules._looksam import ScheduledLookSAMState

#: Names of the fields that hold "the next update is a SAM step" flags.
FLAG_FIELDS = ("looksam_full_step", "sam_step_next")


class PeriodicState(NamedTuple):
    """State of :func:`periodic`.

    Attributes:
      schedule_count: number of updates so far.
      sam_step_next: whether the *next* update is a SAM step (read by ``second_pass="auto"``).
      rule_state: the wrapped rule's state.
    """

    schedule_count: jax.Array  # shape=(), dtype=int32.
    sam_step_next: jax.Array  # shape=(), dtype=bool.
    rule_state: optax.OptState


class RandomizedState(NamedTuple):
    """State of :func:`randomized`.

    Attributes:
      schedule_count: number of updates so far.
      rng_key_data: the raw key data (``jax.random.key_data``, uint32), split once per update.
      sam_step_next: whether the *next* update is a SAM step (already drawn).
      rule_state: the wrapped rule's state.
    """

    schedule_count: jax.Array  # shape=(), dtype=int32.
    rng_key_data: jax.Array  # shape=(2,) for threefry, dtype=uint32.
    sam_step_next: jax.Array  # shape=(), dtype=bool.
    rule_state: optax.OptState


def schedule_flags(opt_state: optax.OptState) -> list:
    """Every second-pass decision in ``opt_state``: the "next update is a SAM step"
    flags (LookSAM's, the schedulers') and AE-SAM's ``clean_grads -> bool`` callables."""
    found = []
    for name in FLAG_FIELDS:
        found += [v for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, name)]
    found += [s.decision() for _, s in optax.tree_utils.tree_get_all_with_path(opt_state, "AdaptivePolicyState")]
    return found


def scheduled_second_pass(opt_state: optax.OptState) -> Any:
    """What ``second_pass="auto"`` means for ``opt_state``: the one scheduler's flag.

    Returns LookSAM's ``looksam_full_step`` or a scheduler's ``sam_step_next``
    (a traced bool under ``jit``); for AE-SAM (:func:`adaptive_policy`) a
    ``jax.tree_util.Partial`` ``clean_grads -> bool`` that the two-pass helper
    calls after the clean pass; ``True`` when ``opt_state`` holds none.

    Raises:
      ValueError: if ``opt_state`` holds more than one such flag (e.g.
        ``periodic`` around ``looksam``): which one should decide is ambiguous.

    Examples:
      Plain SAM always needs the second pass; ``periodic(..., every=2)`` needs it
      on updates 1, 3, ... (counting from 0), so not on the first; LookSAM needs
      it on its first update.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> rule, w = sam_optax.sam(optax.sgd(0.1)), jnp.zeros(2)
      >>> for tx in (rule, sam_optax.periodic(rule, every=2), sam_optax.looksam(optax.sgd(0.1), k=2)):
      ...     print(bool(sam_optax.rules.scheduled_second_pass(tx.init(w))))
      True
      False
      True
    """
    flags = schedule_flags(opt_state)
    if len(flags) > 1:
        raise ValueError(
            f"opt_state holds {len(flags)} second-pass schedules (LookSAM, periodic, randomized, late_phase, "
            "AE-SAM); "
            "second_pass='auto' needs at most one: wrap a plain rule (sam, wsam, gsam) in one scheduler."
        )
    return flags[0] if flags else True


def check_inner(rule_state: optax.OptState, name: str) -> None:
    if schedule_flags(rule_state):
        raise ValueError(
            f"{name}: rule already schedules its second pass (looksam, periodic, randomized, late_phase or "
            "adaptive_policy); "
            "two schedules in one state cannot both drive second_pass='auto'. Wrap a plain rule "
            "(AE-LookSAM: sam_optax.adaptive_looksam)."
        )


def scheduled_update(rule, flag, updates, rule_state, params, perturbed_grads, clean_grads, name, extra_args):
    r"""``rule.update`` with :math:`\tilde g` where ``flag``, :math:`g` elsewhere.

    Given ``perturbed_grads`` that *are* ``updates`` (a literal ``second_pass=False``),
    the rule compiles its one-pass update; where ``flag`` holds that is a NaN
    update (the SAM step's second pass is missing), never a silent base step.
    A rule whose SAM steps are chosen from outside (the LookSAM of
    :func:`sam_optax.rules.adaptive_looksam`) is told ``flag`` first (:func:`drive_inner`)."""
    perturbed_grads = read_both(updates, perturbed_grads, clean_grads, name)
    rule_state = drive_inner(rule_state, flag)
    if same_arrays(updates, perturbed_grads):
        new_updates, rule_state = rule.update(
            updates, rule_state, params, perturbed_grads=updates, clean_grads=clean_grads, **extra_args
        )
        bad = jnp.where(flag, jnp.nan, 0.0)
        return jax.tree.map(lambda u: u + bad.astype(u.dtype), new_updates), rule_state
    g_pert = jax.tree.map(lambda g, gp: jnp.where(flag, gp, g), updates, perturbed_grads)
    return rule.update(updates, rule_state, params, perturbed_grads=g_pert, clean_grads=clean_grads, **extra_args)


def drive_inner(rule_state: optax.OptState, flag: Any) -> optax.OptState:
    """``rule_state`` with every :class:`~sam_optax.rules._looksam.ScheduledLookSAMState`'s
    ``sam_step`` set to ``flag``: the scheduler's decision of this update, read by the rule."""
    is_driven = lambda x: isinstance(x, ScheduledLookSAMState)  # noqa: E731
    flag = jnp.asarray(flag, bool)
    return jax.tree.map(lambda x: x._replace(sam_step=flag) if is_driven(x) else x, rule_state, is_leaf=is_driven)


def count_scheduler(
    rule: optax.GradientTransformation, state_cls: type, flag_of: Callable[[jax.Array], Any], name: str
) -> optax.GradientTransformationExtraArgs:
    """A scheduler whose flag is a function of the update count: ``flag_of(t)``
    says whether update ``t`` (from 0) is a SAM step; the state is
    ``state_cls(schedule_count, sam_step_next, rule_state)`` (:func:`periodic`,
    :func:`sam_optax.rules.late_phase`)."""
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        rule_state = rule.init(params)
        check_inner(rule_state, name)
        count = jnp.zeros([], jnp.int32)
        return state_cls(count, jnp.asarray(flag_of(count), bool), rule_state)

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        new_updates, rule_state = scheduled_update(
            rule,
            state.sam_step_next,
            updates,
            state.rule_state,
            params,
            perturbed_grads,
            clean_grads,
            name,
            extra_args,
        )
        count = optax.safe_increment(state.schedule_count)
        return new_updates, state_cls(count, jnp.asarray(flag_of(count), bool), rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def periodic(rule: optax.GradientTransformation, every: int) -> optax.GradientTransformationExtraArgs:
    r"""Periodic SAM (MosaicML Composer's ``SAM(interval=every)``): SAM every ``every`` steps.

    With :math:`t = 0, 1, \dots` the update count,

    .. math::

      u_t = \begin{cases}
        \mathrm{rule}(g_t, \tilde g_t) & (t + 1) \bmod \mathrm{every} = 0 \\
        \mathrm{rule}(g_t, g_t) & \text{otherwise}
      \end{cases}

    i.e. SAM steps on updates ``every``, ``2 every``, ... counting from 1, as
    Composer's ``(global_step + 1) % interval == 0``. The rule is updated on
    every step (its base optimizer's momentum and schedules advance), and
    :math:`\mathrm{rule}(g, g)` is the base optimizer's step for ``sam``,
    ``wsam`` and ``gsam``. The flag of the next update is in the state
    (``sam_step_next``): ``sharpness_aware_step``'s ``second_pass="auto"`` runs
    the second pass only on SAM steps, for :math:`1 + 1/\mathrm{every}` gradient
    passes per step on average (the Flax Linen and NNX steps do the same). A
    step that runs both passes anyway (``second_pass=True``) gives the same
    updates, at SAM's cost. ``every = 1`` is SAM.

    Composer advises scaling ``rho`` with ``every`` (its authors used
    ``every=10``, ``rho=0.5`` on ImageNet); nothing is rescaled here.
    Composer's first (ascent) gradient is the per-device one under DDP: with
    ``data=sam_optax.data.shards(axis_name=...)`` each device's own
    perturbation is that.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.periodic(sam_optax.sam(optax.sgd(0.1)), every=3)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, tx)
      >>> w = jnp.zeros(2); state = init(w); step = jax.jit(step)
      >>> flags = []
      >>> for _ in range(6):
      ...     flags.append(bool(state.opt_state.sam_step_next))
      ...     w, state, out = step(w, state, jnp.ones((4, 2)))
      >>> flags
      [False, False, True, False, False, True]

    Args:
      rule: a rule (``sam``, ``wsam``, ``gsam``), possibly wrapped; not one that
        schedules its own second pass (``looksam``, another scheduler):
        ``ValueError`` at ``init``.
      every: the period, a Python integer ``>= 1``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`PeriodicState`; ``update(grads, state, params, *, perturbed_grads,
      clean_grads=None, **extra_args)``.

    References:
      MosaicML Composer, ``composer/algorithms/sam`` (README and ``sam.py``);
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    """
    _utils.check_transformation("rule", rule)
    _utils.check_positive_int("every", every)
    every = int(every)
    return count_scheduler(rule, PeriodicState, lambda t: (t + 1) % every == 0, "periodic")


def periodic_schedule(every: int, opt_state: optax.OptState) -> Iterator[bool]:
    """The literal ``second_pass`` flag of each coming :func:`periodic` update, from a Python counter.

    ``(t + 1) % every == 0`` for ``t`` = the state's ``schedule_count``, read
    once here, then one more per flag (as :func:`sam_optax.looksam_schedule`):
    jit the ``second_pass=True`` and ``False`` programs and pick one per step on
    the host, reading no device value (faster on XLA:CPU for convnets). A
    ``False`` program run on a SAM step gives a NaN update.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> state = sam_optax.periodic(sam_optax.sam(optax.sgd(0.1)), every=3).init(jnp.zeros(2))
      >>> flags = sam_optax.rules.periodic_schedule(3, state)
      >>> [next(flags) for _ in range(6)]
      [False, False, True, False, False, True]

    Raises:
      ValueError: if ``every`` is not an integer ``>= 1``, ``opt_state`` holds no
        (or more than one) periodic state, or its next flag disagrees with ``every``.
    """
    _utils.check_positive_int("every", every)
    found = [s for _, s in optax.tree_utils.tree_get_all_with_path(opt_state, "PeriodicState")]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one periodic state, found {len(found)}.")
    start = int(found[0].schedule_count)
    if bool(found[0].sam_step_next) != ((start + 1) % every == 0):
        raise ValueError(f"every={every} disagrees with the periodic state at update {start}: pass the rule's every.")
    return (((t + 1) % every == 0) for t in itertools.count(start))


def _check_p(p: Any) -> None:
    """``p`` a probability in [0, 1], or a schedule whose value at count 0 is one."""
    if callable(p) and not isinstance(p, (jax.Array,)):
        try:
            p0 = p(0)
        except Exception as e:  # noqa: BLE001 -- any failure: not a schedule of the count
            raise ValueError(f"p must be a probability in [0, 1] or a schedule count -> p; p(0) failed: {e}") from e
        _utils.check_range("p(0)", p0, low=0.0, high=1.0)
        return
    _utils.check_range("p", p, low=0.0, high=1.0)


def _draw(key_data: jax.Array, p: Any, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(new key data, Bernoulli(p_count))``: the key is split once."""
    key, sub = jax.random.split(jax.random.wrap_key_data(key_data))
    p_t = jnp.asarray(_utils.value_at(p, count), jnp.float32)
    return jax.random.key_data(key), jax.random.uniform(sub, (), jnp.float32) < p_t


def randomized_schedule(
    p: float | Callable[[Any], Any], opt_state: optax.OptState, *, block: int = 1024
) -> Iterator[bool]:
    r"""The literal ``second_pass`` flag of each coming :func:`randomized` update, drawn ahead on the device.

    RST's flags are a function of the state's key and the count alone, so they
    can be drawn before the updates: the state's ``sam_step_next`` first, then
    :math:`b_{t+1}, b_{t+2}, \dots` by the rule's own key splits, ``block`` at a
    time in one jitted ``lax.scan`` whose result the host reads once (one device
    read per ``block`` steps instead of one per step, as
    :func:`sam_optax.host_chosen_step` does). Jit the ``second_pass=True`` and
    ``False`` programs and pick one per step, as with
    :func:`sam_optax.rules.periodic_schedule`. ``p`` must be the rule's: with
    another ``p`` a ``False`` program runs on some SAM step, whose update is
    NaN (never a silent SGD step).

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> tx = sam_optax.randomized(sam_optax.sam(optax.sgd(0.1)), p=0.5, seed=0)
      >>> state = tx.init(jnp.zeros(2))
      >>> ahead = sam_optax.rules.randomized_schedule(0.5, state, block=4)
      >>> flags = []
      >>> for _ in range(6):  # the state's own flag before each update, for comparison
      ...     flags.append((next(ahead), bool(state.sam_step_next)))
      ...     _, state = tx.update(jnp.ones(2), state, jnp.zeros(2), perturbed_grads=jnp.ones(2))
      >>> all(a == b for a, b in flags)
      True

    Raises:
      ValueError: if ``p`` is not a probability or a schedule of the count,
        ``block`` is not an integer ``>= 1``, or ``opt_state`` holds no (or more
        than one) randomized state.
    """
    _check_p(p)
    _utils.check_positive_int("block", block)
    found = [s for _, s in optax.tree_utils.tree_get_all_with_path(opt_state, "RandomizedState")]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one randomized state, found {len(found)}.")
    state = found[0]

    @jax.jit
    def draw_block(key_data, count):
        def one(carry, _):
            key_data, count = carry
            count = count + 1
            key_data, flag = _draw(key_data, p, count)
            return (key_data, count), flag

        (key_data, count), flags = jax.lax.scan(one, (key_data, jnp.asarray(count, jnp.int32)), None, length=block)
        return key_data, count, flags

    # Read now: a step that donates the state deletes its arrays.
    first, key_data, count = bool(state.sam_step_next), np.asarray(state.rng_key_data), int(state.schedule_count)

    def flags() -> Iterator[bool]:
        nonlocal key_data, count
        yield first
        while True:
            key_data, count, block_flags = draw_block(key_data, count)
            yield from (bool(f) for f in np.asarray(block_flags))

    return flags()


def randomized(
    rule: optax.GradientTransformation, p: float | Callable[[Any], Any], *, seed: int = 0
) -> optax.GradientTransformationExtraArgs:
    r"""RST (randomized sharpness-aware training): a SAM step with probability :math:`p_t`.

    With :math:`t = 0, 1, \dots` the update count and :math:`b_t \sim
    \mathrm{Bernoulli}(p_t)`,

    .. math::

      u_t = \begin{cases}
        \mathrm{rule}(g_t, \tilde g_t) & b_t = 1 \\
        \mathrm{rule}(g_t, g_t) & b_t = 0
      \end{cases}

    (:math:`\mathrm{rule}(g, g)` is the base optimizer's step for ``sam``,
    ``wsam`` and ``gsam``). :math:`b_t = [U_t < p_t]` with :math:`U_t` uniform
    on [0, 1) from a key in the state, split once per update: :math:`b_0` is
    drawn at ``init`` and :math:`b_{t+1}` at the end of update :math:`t`, so
    ``second_pass="auto"`` reads it (``sam_step_next``) before the step's passes
    and runs the second pass only when :math:`b_t = 1`: :math:`1 + \bar p`
    gradient passes per step on average. The draw is part of the (replicated)
    optimizer state, so it is the same on every device and reproducible from
    ``seed``. ``p = 1`` is SAM, ``p = 0`` the base optimizer.

    The paper's schedule functions (constant, piecewise, linear, trigonometric)
    are not reproduced from guesses: pass any optax schedule as ``p``. Its G-RST
    generalization is not implemented.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.randomized(sam_optax.sam(optax.sgd(0.1)), p=0.5, seed=0)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, tx)
      >>> w = jnp.zeros(2); state = init(w); step = jax.jit(step)
      >>> for _ in range(4):
      ...     w, state, out = step(w, state, jnp.ones((4, 2)))
      >>> int(state.opt_state.schedule_count)
      4

    Args:
      rule: a rule (``sam``, ``wsam``, ``gsam``), possibly wrapped; not one that
        schedules its own second pass (``ValueError`` at ``init``).
      p: the SAM probability, a number in [0, 1], or a schedule ``count -> p_t``
        (e.g. ``optax.linear_schedule(0.2, 0.8, T)``); a schedule is checked at
        count 0 only, and later values outside [0, 1] act as 0 or 1.
      seed: integer in ``[0, 2**32 - 1]``, the seed of the draws.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`RandomizedState`.

    References:
      Zhao, Zhang, Hu, `Randomized Sharpness-Aware Training for Boosting
      Computational Efficiency in Deep Learning <https://arxiv.org/abs/2203.09962>`_, 2022
      (v1: SS-SAM)
    """
    _utils.check_transformation("rule", rule)
    _check_p(p)
    _utils.check_int("seed", seed, low=0, high=2**32 - 1)
    seed = int(seed)
    rule = optax.with_extra_args_support(rule)

    def init_fn(params):
        rule_state = rule.init(params)
        check_inner(rule_state, "randomized")
        count = jnp.zeros([], jnp.int32)
        key_data, flag = _draw(jax.random.key_data(jax.random.key(seed)), p, count)
        return RandomizedState(count, key_data, flag, rule_state)

    def update_fn(updates, state, params=None, *, perturbed_grads=None, clean_grads=None, **extra_args):
        new_updates, rule_state = scheduled_update(
            rule,
            state.sam_step_next,
            updates,
            state.rule_state,
            params,
            perturbed_grads,
            clean_grads,
            "randomized",
            extra_args,
        )
        count = optax.safe_increment(state.schedule_count)
        key_data, flag = _draw(state.rng_key_data, p, count)
        return new_updates, RandomizedState(count, key_data, flag, rule_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
