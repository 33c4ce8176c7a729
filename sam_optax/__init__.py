"""sam_optax: sharpness-aware training as composable optax transformations.

Three independent axes:

* :mod:`sam_optax.geometry` -- how the perturbation is made from the gradient
  (L2 / p-norm ball of SAM, ASAM's adaptive ball, Fisher-SAM's Fisher ball);
* :mod:`sam_optax.data` -- which examples share a perturbation (m-sharpness
  shards: chunks inside a device, devices of a mesh);
* :mod:`sam_optax.rules` -- how the clean and the perturbed gradient become an
  update with any base optax optimizer (SAM, WSAM, GSAM).

:func:`sharpness_aware_grad` runs the two gradient passes (geometry x data);
the rules are ``optax.GradientTransformationExtraArgs``.

:mod:`sam_optax.metrics` measures sharpness (Hessian spectrum and trace,
m-sharpness value); :mod:`sam_optax.flax` trains Flax Linen and NNX models
(BatchNorm, dropout) with any rule.
"""

from sam_optax import data, geometry, metrics, rules
from sam_optax.rules import (
    SharpnessRuleState,
    gsam,
    gsam_rho_schedule,
    sam,
    sharpness_rule,
    wsam,
)
from sam_optax.two_pass import SharpnessAwareGrads, sharpness_aware_grad

__version__ = "0.1.0"


def __getattr__(name):
    # sam_optax.flax is imported on first use (it imports flax.linen and flax.nnx).
    if name == "flax":
        import importlib

        return importlib.import_module("sam_optax.flax")
    raise AttributeError(f"module 'sam_optax' has no attribute {name!r}")


__all__ = [
    "SharpnessAwareGrads",
    "SharpnessRuleState",
    "data",
    "flax",
    "geometry",
    "metrics",
    "gsam",
    "gsam_rho_schedule",
    "rules",
    "sam",
    "sharpness_aware_grad",
    "sharpness_rule",
    "wsam",
]
