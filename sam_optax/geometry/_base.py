"""The ascent-geometry protocol: how a perturbation is made from a gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

# perturb(grads, params, rho) -> perturbation; norm(perturbation, grads, params) -> scalar.
PerturbFn = Callable[[optax.Updates, optax.Params | None, jax.Array], optax.Updates]
NormFn = Callable[[optax.Updates, optax.Updates, optax.Params | None], jax.Array]


class AscentGeometry(NamedTuple):
    """An ascent geometry: maps a gradient ``g`` to a perturbation ``eps``.

    It follows optax's transformation protocol, so it can be wrapped by
    ``optax.inject_hyperparams`` (e.g. to change ``rho`` between steps) and its
    state is a pytree that checkpoints like any optimizer state:

    * ``init(params) -> state``;
    * ``update(grads, state, params=None, **extra_args) -> (perturbation, state)``:
      the perturbation has the structure of ``params`` and at least float32
      precision, and lies on the sphere of radius ``rho`` of the geometry's norm
      (or is zero when the gradient is zero);
    * ``norm(perturbation, grads, params) -> scalar``: that norm, used to project
      multi-step ascent back onto the ``rho``-ball and by the tests.

    ``norm`` may be ``None`` for a geometry without a ball (then multi-step
    ascent is not available for it).
    """

    init: Callable[[optax.Params], optax.OptState]
    update: Callable[..., tuple[optax.Updates, optax.OptState]]
    norm: NormFn | None = None


class ScheduleState(NamedTuple):
    """State of a geometry whose ``rho`` is a schedule.

    Attributes:
      count: number of perturbations made so far; ``rho`` is evaluated at it.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.


def make_geometry(perturb: PerturbFn, norm: NormFn, rho: _utils.ScalarOrSchedule) -> AscentGeometry:
    r"""Builds an :class:`AscentGeometry` from a stateless perturbation rule.

    Handles what every geometry shares: ``rho`` as a number, array or optax
    schedule (then the state counts steps), and at-least-float32 arithmetic.

    Args:
      perturb: ``perturb(grads, params, rho) -> perturbation``, with ``grads`` and
        ``params`` already cast to (at least) float32; ``params`` may be ``None``.
        ``rho`` is a 0-d array of the widest dtype of the cast gradient (float32,
        or float64 for float64 gradients under ``jax_enable_x64``).
      norm: ``norm(perturbation, grads, params) -> scalar`` in (at least) float32.
      rho: radius of the ball.

    Returns:
      The :class:`AscentGeometry`; its state is ``optax.EmptyState()`` for a
      fixed ``rho``, a :class:`ScheduleState` for a schedule.

    Examples:
      The max-norm ball, :math:`\epsilon = \rho\,\mathrm{sign}(g)`, with a radius
      halved at step 1: step 0 gives :math:`0.5\,\mathrm{sign}(3, -0.1) = (0.5, -0.5)`,
      step 1 gives :math:`(0.25, -0.25)`.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> def perturb(g, params, rho):
      ...     return jax.tree.map(lambda x: rho * jnp.sign(x), g)
      >>> def norm(e, g, params):
      ...     return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(e)]))
      >>> rho = optax.piecewise_constant_schedule(0.5, {1: 0.5})
      >>> geo = sam_optax.geometry.make_geometry(perturb, norm, rho)
      >>> g = jnp.array([3.0, -0.1])
      >>> state = geo.init(g)
      >>> for _ in range(2):
      ...     eps, state = geo.update(g, state)
      ...     print([round(float(x), 4) for x in eps], round(float(geo.norm(eps, g)), 4))
      [0.5, -0.5] 0.5
      [0.25, -0.25] 0.25
    """
    _utils.check_range("rho", rho, low=0.0, allow_schedule=True)
    scheduled = callable(rho)

    def init_fn(params):
        del params
        if scheduled:
            return ScheduleState(count=jnp.zeros([], jnp.int32))
        return optax.EmptyState()

    def update_fn(grads, state, params=None, **extra_args):
        del extra_args
        if scheduled:
            rho_t = _utils.value_at(rho, state.count)
            state = ScheduleState(count=optax.safe_increment(state.count))
        else:
            rho_t = jnp.asarray(rho)
        p32 = None if params is None else _utils.to_compute(params)
        rho_t = rho_t.astype(_utils.tree_compute_dtype(grads))
        eps = perturb(_utils.to_compute(grads), p32, rho_t)
        return eps, state

    def norm_fn(perturbation, grads, params=None):
        p32 = None if params is None else _utils.to_compute(params)
        return norm(_utils.to_compute(perturbation), _utils.to_compute(grads), p32)

    return AscentGeometry(init_fn, update_fn, norm_fn)


def require_params(params: optax.Params | None, geometry: str) -> None:
    """Raises ``ValueError`` if ``params`` is ``None`` (the geometry reads the weights)."""
    if params is None:
        raise ValueError(
            f"The {geometry} geometry needs the current params: call "
            "geometry.update(grads, state, params) (and geometry.norm(perturbation, grads, params))."
        )
