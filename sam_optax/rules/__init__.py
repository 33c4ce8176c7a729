"""Combination rules: how the clean and perturbed gradients become an update."""

from sam_optax.rules._base import SharpnessRuleState, clip_by_global_norm, sharpness_rule
from sam_optax.rules._gsam import gsam, gsam_rho_schedule
from sam_optax.rules._looksam import LookSAMState, looksam, looksam_full_step
from sam_optax.rules._sam import sam
from sam_optax.rules._wsam import wsam

__all__ = [
    "LookSAMState",
    "looksam",
    "looksam_full_step",
    "SharpnessRuleState",
    "clip_by_global_norm",
    "gsam",
    "gsam_rho_schedule",
    "sam",
    "sharpness_rule",
    "wsam",
]
