"""Sharpness-aware training at one gradient pass per step: no clean pass.

* :func:`msam_sgd`, :func:`msam_adamw`: Momentum-SAM (Becker et al. 2024), plain
  optax optimizers whose params are the stored *perturbed* point
  :math:`\\tilde w = w - \\rho\\, m/\\lVert m\\rVert`; :func:`msam_unperturbed`
  returns the real weights (evaluate and checkpoint those), :func:`msam_perturbed`
  goes back.
* :func:`rwp_grad`, :func:`rwp_step`, :func:`rwp_noise`: (adaptive) random weight
  perturbation at 1x cost (Li et al., TMLR 2024): the gradient at
  :math:`w+\\epsilon` only, with any optax base optimizer; the key is in the state.
* :func:`mrwp_grad`, :func:`mrwp_step`: m-RWP, :math:`\\lambda g_{B_1}(w+\\epsilon) +
  (1-\\lambda) g_{B_0}(w)` on two batches, two independent passes (not one pass:
  here because it shares RWP's noise and state).
"""

from sam_optax.one_pass._mrwp import mrwp_grad, mrwp_step
from sam_optax.one_pass._msam import (
    MSAMAdamWState,
    MSAMState,
    msam_adamw,
    msam_perturbed,
    msam_sgd,
    msam_unperturbed,
)
from sam_optax.one_pass._rwp import (
    RWPState,
    RWPTrainState,
    rwp_grad,
    rwp_init,
    rwp_noise,
    rwp_sigma_schedule,
    rwp_step,
)

__all__ = [
    "MSAMAdamWState",
    "MSAMState",
    "RWPState",
    "RWPTrainState",
    "msam_adamw",
    "msam_perturbed",
    "msam_sgd",
    "msam_unperturbed",
    "mrwp_grad",
    "mrwp_step",
    "rwp_grad",
    "rwp_init",
    "rwp_noise",
    "rwp_sigma_schedule",
    "rwp_step",
]
