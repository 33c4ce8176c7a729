"""Weight averaging around any optimizer (SAM-family rules included).

* :func:`swa` (+ :func:`swa_cyclic_schedule`, :func:`swa_official_schedule`):
  Stochastic Weight Averaging, read with :func:`swa_params`;
* :func:`weight_ema`: exponential moving average of the weights, read with
  :func:`ema_params`;
* :func:`lookahead`: fast weights as params, slow weights in the state
  (:func:`lookahead_slow_params`), with the official momentum options;
* :func:`replicate`, :func:`average_replicas`: SWAP's parallel phase and average;
* :func:`filter_grafting`, :func:`graft`: entropy-weighted ring grafting of K
  networks;
* :func:`recompute_batch_stats` (Linen), :func:`recompute_batch_stats_nnx`
  (NNX): BatchNorm statistics for averaged weights.

Every wrapper forwards extra arguments (``perturbed_grads=``) to its inner
optimizer and keeps its state in a NamedTuple of arrays (orbax-checkpointable
with an abstract target, e.g. ``jax.eval_shape(tx.init, params)``).
"""

from sam_optax.averaging._batchnorm import recompute_batch_stats, recompute_batch_stats_nnx
from sam_optax.averaging._ema import WeightEMAState, ema_params, weight_ema
from sam_optax.averaging._grafting import (
    GraftingState,
    filter_grafting,
    graft,
    grafting_coefficient,
    grafting_learning_rates,
    layers_by_module,
    weight_entropy,
)
from sam_optax.averaging._lookahead import (
    LookaheadState,
    lookahead,
    lookahead_slow_params,
    momentum_leaves,
)
from sam_optax.averaging._swa import (
    SWAState,
    swa,
    swa_cyclic_schedule,
    swa_official_schedule,
    swa_params,
)
from sam_optax.averaging._swap import average_replicas, replicate

__all__ = [
    "GraftingState",
    "LookaheadState",
    "SWAState",
    "WeightEMAState",
    "average_replicas",
    "ema_params",
    "filter_grafting",
    "graft",
    "grafting_coefficient",
    "grafting_learning_rates",
    "layers_by_module",
    "lookahead",
    "lookahead_slow_params",
    "momentum_leaves",
    "recompute_batch_stats",
    "recompute_batch_stats_nnx",
    "replicate",
    "swa",
    "swa_cyclic_schedule",
    "swa_official_schedule",
    "swa_params",
    "weight_ema",
    "weight_entropy",
]
