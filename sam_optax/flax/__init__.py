"""Flax integration: train Linen and NNX models (BatchNorm, dropout) with any rule.

* Linen: :class:`TrainState` (adds ``batch_stats``, the geometry and its
  ``ascent_state``; ``apply_gradients`` forwards ``perturbed_grads``) and
  :func:`linen_train_step`.
* NNX: :func:`nnx_sharpness_aware_grad` (the two passes for an
  ``nnx.Module``), :class:`SharpnessAwareOptimizer` (an ``nnx.Optimizer``
  holding the ascent state) and :func:`nnx_train_step`.

BatchNorm statistics come from the clean pass only; both passes of a shard use
the same dropout key, different shards different keys.

Flax is an optional dependency: ``pip install sam-optax[flax]``.
"""

try:
    import flax  # noqa: F401
except ImportError as e:  # the message names the extra to install
    raise ImportError(f"sam_optax.flax needs Flax, an optional dependency ({e}): pip install sam-optax[flax]") from e

from sam_optax.flax._linen import TrainState, linen_train_step
from sam_optax.flax._nnx import SharpnessAwareOptimizer, nnx_sharpness_aware_grad, nnx_train_step

__all__ = [
    "SharpnessAwareOptimizer",
    "TrainState",
    "linen_train_step",
    "nnx_sharpness_aware_grad",
    "nnx_train_step",
]
