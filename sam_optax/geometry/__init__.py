"""Ascent geometries: how the perturbation ``eps`` is made from the gradient ``g``.

Every geometry is an :class:`AscentGeometry` (optax's ``init``/``update``
protocol plus the ball's ``norm``) and works with every combination rule.
"""

from sam_optax.geometry._adaptive import adaptive
from sam_optax.geometry._base import AscentGeometry, ScheduleState, make_geometry
from sam_optax.geometry._fisher import fisher
from sam_optax.geometry._grouped import grouped_l2
from sam_optax.geometry._pnorm import l2, pnorm
from sam_optax.geometry._stochastic import StochasticState, stochastic
from sam_optax.geometry._subset import norm_layer_mask, only

__all__ = [
    "AscentGeometry",
    "ScheduleState",
    "StochasticState",
    "adaptive",
    "fisher",
    "grouped_l2",
    "l2",
    "make_geometry",
    "norm_layer_mask",
    "only",
    "pnorm",
    "stochastic",
]
