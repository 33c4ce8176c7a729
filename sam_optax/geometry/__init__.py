"""Ascent geometries: how the perturbation ``eps`` is made from the gradient ``g``.

Every geometry is an :class:`AscentGeometry` (optax's ``init``/``update``
protocol plus the ball's ``norm``) and works with every combination rule.
"""

from sam_optax.geometry._adaptive import adaptive
from sam_optax.geometry._base import AscentGeometry, ScheduleState, make_geometry
from sam_optax.geometry._fisher import fisher
from sam_optax.geometry._pnorm import l2, pnorm
from sam_optax.geometry._stochastic import StochasticState, stochastic

__all__ = [
    "AscentGeometry",
    "ScheduleState",
    "StochasticState",
    "adaptive",
    "fisher",
    "l2",
    "make_geometry",
    "pnorm",
    "stochastic",
]
