"""Multi-step ascent: projected gradient ascent on the loss inside the geometry's rho-ball."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.geometry import AscentGeometry


def project(
    geometry: AscentGeometry, eps: optax.Updates, grads: optax.Updates, params: optax.Params, radius: jax.Array
) -> optax.Updates:
    """Radial rescaling of ``eps`` back onto the ball of ``radius`` (of the geometry's norm)."""
    assert geometry.norm is not None  # two_pass._check_args: ascent_steps > 1 needs a norm
    r = geometry.norm(eps, grads, params)
    scale = jnp.where(r > radius, radius / jnp.where(r > 0, r, 1.0), 1.0)
    return jax.tree.map(lambda x: scale * x, eps)


def refine(
    geometry: AscentGeometry,
    grad_at: Callable[[optax.Params], optax.Updates],
    params: optax.Params,
    grads: optax.Updates,
    state: optax.OptState,
    eps: optax.Updates,
    steps: int,
    step_size: float,
) -> optax.Updates:
    r"""``steps`` projected ascent steps from the one-step perturbation ``eps``.

    .. math::

      \epsilon_1 = \Pi_\rho(a\,\epsilon), \qquad
      \epsilon_{k+1} = \Pi_\rho\big(\epsilon_k + a\,\mathrm{geometry}(\nabla L(w+\epsilon_k))\big)

    with ``a = step_size`` and :math:`\Pi_\rho` the radial projection onto the
    ball of the radius of ``eps``; ``grad_at(perturbed params) -> grads`` is one
    gradient pass, so the ascent costs ``steps - 1`` passes beyond the first.
    """
    assert geometry.norm is not None  # two_pass._check_args: ascent_steps > 1 needs a norm
    radius = geometry.norm(eps, grads, params)
    eps = project(geometry, jax.tree.map(lambda x: step_size * x, eps), grads, params, radius)

    def ascend(_, eps):
        gk = grad_at(_utils.add_perturbation(params, eps))
        d, _ = geometry.update(gk, state, params)
        return project(geometry, jax.tree.map(lambda e, x: e + step_size * x, eps, d), gk, params, radius)

    # a loop, not an unrolled trace: the program's size (and compile time) does not grow with ``steps``
    return jax.lax.fori_loop(0, steps - 1, ascend, eps)
