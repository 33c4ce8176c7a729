"""Late-phase SAM: the base optimizer first, SAM from a switch step on (Zhou et al., ICLR 2025)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import optax

from sam_optax import _utils
from sam_optax.rules._schedules import count_scheduler


class LatePhaseState(NamedTuple):
    """State of :func:`late_phase`.

    Attributes:
      schedule_count: number of updates so far.
      sam_step_next: whether the *next* update is a SAM step (read by ``second_pass="auto"``).
      rule_state: the wrapped rule's state.
    """

    schedule_count: jax.Array  # shape=(), dtype=int32.
    sam_step_next: jax.Array  # shape=(), dtype=bool.
    rule_state: optax.OptState


def late_phase(rule: optax.GradientTransformation, start_step: int) -> optax.GradientTransformationExtraArgs:
    r"""Late-phase SAM: the base optimizer before update ``start_step``, SAM from it on.

    With :math:`t = 0, 1, \dots` the update count and :math:`\tilde T` = ``start_step``,

    .. math::

      u_t = \begin{cases}
        \mathrm{rule}(g_t, g_t) & t < \tilde T \quad (\text{the base step}) \\
        \mathrm{rule}(g_t, \tilde g_t) & t \ge \tilde T
      \end{cases}

    Zhou et al. train with SGD up to epoch :math:`\tilde T` and switch to SAM
    (their Eq. 3) until the last epoch :math:`T`, and find that a few SAM epochs
    at the end give nearly the generalization and sharpness of SAM all along
    (Fig. 1: WideResNet-16-8 on CIFAR-10, :math:`\tilde T = 175`, :math:`T = 200`;
    the official script's defaults: SAM from epoch 150 of 160). In updates:
    ``start_step = start_epoch * steps_per_epoch``. The flag of the next update
    is in the state (``sam_step_next``): ``second_pass="auto"`` of
    :func:`sam_optax.sharpness_aware_step` runs one gradient pass per step before
    the switch and two after it. ``start_step = 0`` is SAM; a ``start_step``
    beyond the last update is the base optimizer. The rule (its base optimizer's
    momentum, schedules) is updated on every step and carries over the switch;
    the official PyTorch script keeps two separate ``torch.optim.SGD`` instances
    (SGD and SAM's base), so its momentum buffer restarts from zero at the
    switch (learning rates are set per epoch on both): not reproduced here.
    Read: the abstract, Fig. 1's caption and the sentence on Eq. 3 (from
    renderings of the paper) and the official script; the paper's method and
    settings sections were not read.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.late_phase(sam_optax.sam(optax.sgd(0.1)), start_step=3)
      >>> init, step = sam_optax.sharpness_aware_step(loss_fn, tx)
      >>> w = jnp.zeros(2); state = init(w); step = jax.jit(step)
      >>> flags = []
      >>> for _ in range(5):
      ...     flags.append(bool(state.opt_state.sam_step_next))
      ...     w, state, out = step(w, state, jnp.ones((4, 2)))
      >>> flags
      [False, False, False, True, True]

    Args:
      rule: a rule (``sam``, ``wsam``, ``gsam``, possibly wrapped); not one that
        schedules its own second pass (``looksam``, another scheduler):
        ``ValueError`` at ``init``.
      start_step: :math:`\tilde T`, the first SAM update, a Python integer in
        ``[0, 2**31 - 1]``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`LatePhaseState`; ``update(grads, state, params, *, perturbed_grads,
      clean_grads=None, **extra_args)``.

    References:
      Zhou, Wang, Mao, Li, Yan, `Sharpness-Aware Minimization Efficiently Selects
      Flatter Minima Late in Training <https://arxiv.org/abs/2410.10373>`_, ICLR 2025;
      official code ``zzp1012/SAM-in-Late-Phase`` (``script/ERM_to_SAM.py``)
    """
    _utils.check_transformation("rule", rule)
    _utils.check_int("start_step", start_step, low=0)
    start_step = int(start_step)
    return count_scheduler(rule, LatePhaseState, lambda t: t >= start_step, "late_phase")


def late_phase_schedule(start_step: int, opt_state: optax.OptState) -> Iterator[bool]:
    """The literal ``second_pass`` flag of each coming :func:`late_phase` update, from a Python counter.

    ``t >= start_step`` for ``t`` = the state's ``schedule_count``, read once
    here, then one more per flag (as :func:`sam_optax.rules.periodic_schedule`):
    jit the ``second_pass=True`` and ``False`` programs and pick one per step on
    the host. A ``False`` program run on a SAM step gives a NaN update.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> state = sam_optax.late_phase(sam_optax.sam(optax.sgd(0.1)), 2).init(jnp.zeros(2))
      >>> flags = sam_optax.rules.late_phase_schedule(2, state)
      >>> [next(flags) for _ in range(4)]
      [False, False, True, True]

    Raises:
      ValueError: if ``start_step`` is not an integer ``>= 0``, ``opt_state``
        holds no (or more than one) late-phase state, or its next flag disagrees
        with ``start_step``.
    """
    _utils.check_int("start_step", start_step, low=0)
    found = [s for _, s in optax.tree_utils.tree_get_all_with_path(opt_state, "LatePhaseState")]
    if len(found) != 1:
        raise ValueError(f"opt_state must hold exactly one late_phase state, found {len(found)}.")
    start = int(found[0].schedule_count)
    if bool(found[0].sam_step_next) != (start >= start_step):
        raise ValueError(
            f"start_step={start_step} disagrees with the late_phase state at update {start}: "
            "pass the rule's start_step."
        )
    return (t >= start_step for t in itertools.count(start))
