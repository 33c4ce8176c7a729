"""Decoupled weight decay as in Loshchilov & Hutter (AdamW / SGDW), and their schedules.

* :func:`adamw`, :func:`sgdw`: Algorithms 2 and 1 of the paper, the decay
  multiplied by the schedule multiplier :math:`\\eta_t`, not the learning rate;
* :func:`decoupled_weight_decay`: the decay step alone, to chain after any
  optimizer (or any ``sam_optax`` rule), with a mask;
* :func:`normalized_weight_decay`, :func:`normalized_weight_decay_restarts`,
  :func:`cosine_warm_restarts`: App. B.1 and B.2.
"""

from sam_optax.decay._decoupled import (
    DecoupledWeightDecayState,
    adamw,
    decoupled_weight_decay,
    sgdw,
    weight_decay_mask,
)
from sam_optax.decay._schedules import (
    cosine_warm_restarts,
    normalized_weight_decay,
    normalized_weight_decay_restarts,
)

__all__ = [
    "DecoupledWeightDecayState",
    "adamw",
    "cosine_warm_restarts",
    "decoupled_weight_decay",
    "normalized_weight_decay",
    "normalized_weight_decay_restarts",
    "sgdw",
    "weight_decay_mask",
]
