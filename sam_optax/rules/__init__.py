"""Combination rules: how the clean and perturbed gradients become an update.

A rule (:func:`sam`, :func:`wsam`, :func:`gsam`, :func:`looksam`) is called as
``tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads,
clean_grads=out.grads)`` with ``out`` from :func:`sam_optax.sharpness_aware_grad`:
the clean gradient :math:`g` comes in as ``updates``, the perturbed gradient
:math:`\\tilde g` as an extra argument that optax's own pieces do not touch.

Where each optax piece goes:

============================  ==============================================================
Placement                     What the piece sees
============================  ==============================================================
inside ``base``               the gradient the rule gives its base optimizer (SAM:
                              :math:`\\tilde g`; decoupled WSAM: :math:`g`; GSAM:
                              :math:`\\tilde g - \\alpha g_\\perp`), e.g. decay or clipping
                              for SAM: ``sam(optax.chain(optax.clip_by_global_norm(1.0),
                              optax.sgd(0.1)))``
chained *before* a rule       not allowed: it would change :math:`g` but not
                              :math:`\\tilde g`; with ``clean_grads`` given (as the
                              library's steps do) the rule raises ``ValueError``
chained *after* a rule        the final updates
:func:`apply_to_both`         both gradients, each with its own state (instead of
                              chaining ``pre`` before the rule); clipping both is also
                              the rules' ``max_norm=``
:func:`accumulate`            both gradients averaged over micro-batches (instead of
                              ``optax.MultiSteps(rule, k)``)
:func:`skip_nonfinite`        both gradients checked for NaN / Inf (instead of
                              ``optax.apply_if_finite(rule, n)``)
============================  ==============================================================

``optax.masked``, ``optax.multi_transform`` and ``optax.inject_hyperparams``
around a rule are fine. ``optax.MultiSteps`` and ``optax.apply_if_finite``
around a rule are found by :func:`check_placement` on the optimizer state.
"""

from sam_optax.rules._adaptive import AdaptivePolicyState, adaptive_looksam, adaptive_policy
from sam_optax.rules._base import (
    SharpnessRuleState,
    check_clean_grads,
    clip_by_global_norm,
    sharpness_rule,
)
from sam_optax.rules._gsam import gsam, gsam_rho_schedule
from sam_optax.rules._late import LatePhaseState, late_phase, late_phase_schedule
from sam_optax.rules._looksam import (
    LookSAMSchedule,
    LookSAMState,
    ScheduledLookSAMState,
    looksam,
    looksam_full_step,
    looksam_schedule,
)
from sam_optax.rules._sam import sam
from sam_optax.rules._schedules import (
    PeriodicState,
    RandomizedState,
    periodic,
    periodic_schedule,
    randomized,
    randomized_schedule,
    scheduled_second_pass,
)
from sam_optax.rules._wrappers import (
    AccumulateState,
    ApplyToBothState,
    SkipNonfiniteState,
    accumulate,
    apply_to_both,
    check_placement,
    skip_nonfinite,
)
from sam_optax.rules._wsam import wsam

__all__ = [
    "AccumulateState",
    "ApplyToBothState",
    "LookSAMState",
    "SharpnessRuleState",
    "SkipNonfiniteState",
    "accumulate",
    "apply_to_both",
    "check_clean_grads",
    "check_placement",
    "clip_by_global_norm",
    "gsam",
    "gsam_rho_schedule",
    "looksam",
    "looksam_full_step",
    "looksam_schedule",
    "LookSAMSchedule",
    "AdaptivePolicyState",
    "adaptive_looksam",
    "adaptive_policy",
    "LatePhaseState",
    "late_phase",
    "late_phase_schedule",
    "ScheduledLookSAMState",
    "PeriodicState",
    "RandomizedState",
    "periodic",
    "periodic_schedule",
    "randomized_schedule",
    "randomized",
    "scheduled_second_pass",
    "sam",
    "sharpness_rule",
    "skip_nonfinite",
    "wsam",
]
