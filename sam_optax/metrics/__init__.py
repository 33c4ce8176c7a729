"""Sharpness metrics: Hessian spectrum (power iteration, Lanczos, Hutchinson) and
the m-sharpness value of the loss.

Every Hessian metric is matrix-free (forward-over-reverse Hessian-vector
products), compiled once per ``loss_fn`` (a static argument: keep the same
function object), works on any pytree of parameters, on one batch or on the
mean over several (:func:`stack_batches`), and inside ``jax.shard_map`` /
``jax.pmap`` over a batch-sharded mesh axis (``axis_name=``).
"""

from sam_optax.metrics._hessian import (
    Batches,
    EigenvalueRatio,
    LanczosResult,
    PowerIterationResult,
    SpectralDensity,
    TraceEstimate,
    eigenvalue_ratio,
    hessian_vector_product,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
    stack_batches,
    top_k_eigenvalues,
)
from sam_optax.metrics._sharpness import MSharpness, m_sharpness

__all__ = [
    "Batches",
    "EigenvalueRatio",
    "LanczosResult",
    "MSharpness",
    "PowerIterationResult",
    "SpectralDensity",
    "TraceEstimate",
    "eigenvalue_ratio",
    "hessian_vector_product",
    "hutchinson_trace",
    "lanczos",
    "m_sharpness",
    "power_iteration",
    "spectral_density",
    "stack_batches",
    "top_k_eigenvalues",
]
