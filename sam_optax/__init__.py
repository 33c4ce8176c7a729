"""sam_optax: sharpness-aware training as composable optax transformations.

Three independent axes:

* :mod:`sam_optax.geometry` -- how the perturbation is made from the gradient
  (L2 / p-norm ball of SAM, ASAM's adaptive ball, Fisher-SAM's Fisher ball,
  ESAM's stochastic weight perturbation around any of them);
* :mod:`sam_optax.data` -- which examples share a perturbation (m-sharpness
  shards: chunks inside a device, devices of a mesh) and which enter the second
  pass (ESAM's sharpness-sensitive data selection);
* :mod:`sam_optax.rules` -- how the clean and the perturbed gradient become an
  update with any base optax optimizer (SAM, WSAM, GSAM, LookSAM).

:func:`sharpness_aware_grad(loss_fn, geometry, data) <sharpness_aware_grad>`
runs the two gradient passes; the rules are
``optax.GradientTransformationExtraArgs``; :func:`sharpness_aware_step` is a
whole step and :func:`sharpness_aware` the one-object form (a rule and a
geometry as one transformation whose ``update`` takes a ``grad_fn``).

Around them: :mod:`sam_optax.decay` (decoupled weight decay as in the AdamW
paper: ``decay.adamw``, ``decay.sgdw``, ``decoupled_weight_decay``; the first
two are not exported here, where they would shadow ``optax.adamw``, whose
weight decay is multiplied by the learning rate) and
:mod:`sam_optax.averaging` (SWA, EMA of weights, Lookahead, SWAP, filter
grafting, BatchNorm recompute), which wrap any rule. :mod:`sam_optax.metrics`
measures sharpness (Hessian spectrum and trace, m-sharpness value);
:mod:`sam_optax.flax` trains Flax Linen and NNX models (BatchNorm, dropout)
with any rule (the ``flax`` extra: ``pip install sam-optax[flax]``; imported on
first use). :mod:`sam_optax.experiments` (the small reproducible experiments
behind the ``sam-optax`` command, the ``examples`` extra) and
``sam_optax.benchmarking`` use this package; it never imports them.
"""

# Submodules only import sam_optax._utils and each other, never this package's
# namespace, so the order of these imports does not matter (isort order).
from sam_optax import averaging, data, decay, geometry, metrics, one_pass, rules, swp, trajectory
from sam_optax._host import host_chosen_step
from sam_optax.averaging import (
    average_replicas,
    ema_params,
    filter_grafting,
    graft,
    lookahead,
    lookahead_slow_params,
    recompute_batch_stats,
    recompute_batch_stats_nnx,
    replicate,
    swa,
    swa_params,
    weight_ema,
)
from sam_optax.decay import decoupled_weight_decay
from sam_optax.one_object import SharpnessAwareTxState, sharpness_aware

# One-pass perturbations: MSAM, ARWP at 1x cost.
from sam_optax.one_pass import (
    mrwp_grad,
    mrwp_step,
    msam_adamw,
    msam_perturbed,
    msam_sgd,
    msam_unperturbed,
    rwp_grad,
    rwp_step,
)
from sam_optax.rules import (
    LookSAMState,
    SharpnessRuleState,
    accumulate,
    adaptive_looksam,
    adaptive_policy,
    apply_to_both,
    check_placement,
    gsam,
    gsam_rho_schedule,
    late_phase,
    looksam,
    looksam_full_step,
    looksam_schedule,
    periodic,
    randomized,
    sam,
    sharpness_rule,
    skip_nonfinite,
    wsam,
)
from sam_optax.train import SharpnessAwareState, plain_step, sharpness_aware_step
from sam_optax.two_pass import SharpnessAwareGrads, sharpness_aware_grad

__version__ = "0.1.0"


def __getattr__(name):
    # sam_optax.flax (flax.linen, flax.nnx: the optional `flax` extra) is imported on first use.
    if name == "flax":
        import importlib

        return importlib.import_module("sam_optax.flax")
    raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")


__all__ = [
    "host_chosen_step",
    "swp",
    "trajectory",
    # One-pass perturbations: MSAM, ARWP at 1x cost.
    "one_pass",
    "msam_adamw",
    "msam_perturbed",
    "msam_sgd",
    "msam_unperturbed",
    "mrwp_grad",
    "mrwp_step",
    "rwp_grad",
    "rwp_step",
    "LookSAMState",
    "accumulate",
    "apply_to_both",
    "check_placement",
    "skip_nonfinite",
    "SharpnessAwareGrads",
    "SharpnessAwareState",
    "SharpnessAwareTxState",
    "SharpnessRuleState",
    "average_replicas",
    "averaging",
    "data",
    "decay",
    "decoupled_weight_decay",
    "ema_params",
    "filter_grafting",
    "geometry",
    "graft",
    "metrics",
    "gsam",
    "gsam_rho_schedule",
    "looksam",
    "looksam_full_step",
    "looksam_schedule",
    "adaptive_looksam",
    "adaptive_policy",
    "late_phase",
    "periodic",
    "randomized",
    "lookahead",
    "lookahead_slow_params",
    "recompute_batch_stats",
    "recompute_batch_stats_nnx",
    "replicate",
    "rules",
    "sam",
    "plain_step",
    "sharpness_aware",
    "sharpness_aware_grad",
    "sharpness_aware_step",
    "sharpness_rule",
    "swa",
    "swa_params",
    "weight_ema",
    "wsam",
]
