"""The m-sharpness value of the loss, from the two-pass machinery of training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax.geometry import AscentGeometry
from sam_optax.metrics._hessian import Batches
from sam_optax.two_pass import sharpness_aware_grad


class MSharpness(NamedTuple):
    """What the function made by :func:`m_sharpness` returns (means over shards and batches).

    Attributes:
      sharpness: ``perturbed_loss - loss``, the m-sharpness value.
      loss: the clean loss :math:`L(w)`.
      perturbed_loss: :math:`L(w + \\epsilon)` (each shard at its own perturbation).
    """

    sharpness: jax.Array
    loss: jax.Array
    perturbed_loss: jax.Array


def m_sharpness(
    loss_fn: Callable[..., Any],
    geometry: AscentGeometry | None = None,
    *,
    has_aux: bool = False,
    **sa_kwargs: Any,
) -> Callable[..., MSharpness]:
    r"""Builds a jitted function measuring the m-sharpness of the loss.

    .. math::

      S_m(w) = \frac{1}{|\mathcal S|} \sum_{S \in \mathcal S}
      \max_{\lVert \epsilon \rVert \le \rho} L_S(w + \epsilon) - L_S(w)

    over the m-sharpness shards :math:`S` (disjoint groups of ``m`` examples:
    chunks inside a device, devices of a mesh). The inner maximum is
    approximated by the ascent of :func:`sam_optax.sharpness_aware_grad`, with
    the same arguments: ``ascent_steps=1`` is the first-order solution
    :math:`\epsilon_S = \rho\, g_S / \lVert g_S \rVert` (for the L2 geometry),
    ``ascent_steps=n`` is ``n`` projected ascent steps (a lower bound on the
    maximum that tightens with more steps). This is exactly
    ``perturbed_loss - loss`` of the training machinery: what SAM minimizes.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), a mean over the examples.
      geometry: the ball (default ``sam_optax.geometry.l2(rho=0.05)``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **sa_kwargs: the other arguments of :func:`sam_optax.sharpness_aware_grad`:
        ``data=sam_optax.data.shards(m, ...)`` (the shards; default one shard
        per device), ``ascent_steps`` (``n`` projected ascent steps),
        ``ascent_step_size``.

    Returns:
      ``f(params, batch, *args, ascent_state=None) -> MSharpness``, jitted.
      ``batch`` is one batch or a :class:`~sam_optax.metrics.Batches` (the mean
      over them; every batch uses the same ``ascent_state``, i.e. the same
      radius of a scheduled ``rho``).

    Examples:
      :math:`L(w) = \frac12\lVert w\rVert^2` at :math:`w = (3, 4)` with
      :math:`\rho = 0.5`: :math:`\epsilon = \rho\, w/\lVert w\rVert = 0.1\,w`, so
      :math:`L(w + \epsilon) = 1.21 \cdot 12.5 = 15.125` and the sharpness is
      :math:`15.125 - 12.5 = 2.625`.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> loss_fn = lambda w, batch: 0.5 * jnp.sum(w**2) * jnp.mean(batch)
      >>> f = sam_optax.metrics.m_sharpness(loss_fn, sam_optax.geometry.l2(0.5))
      >>> out = f(jnp.array([3.0, 4.0]), jnp.ones(4))
      >>> print(f"{float(out.loss):.4f} {float(out.perturbed_loss):.4f} {float(out.sharpness):.4f}")
      12.5000 15.1250 2.6250

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (sections 2 and 5.1)
    """
    sa_grad = sharpness_aware_grad(loss_fn, geometry, has_aux=has_aux, **sa_kwargs)

    def one(params, batch, args, ascent_state):
        out = sa_grad(params, batch, *args, ascent_state=ascent_state)

        def wide(x):
            return jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))

        return wide(out.loss), wide(out.perturbed_loss)

    @jax.jit
    def f(params, batch, *args, ascent_state=None):
        if isinstance(batch, Batches):

            def body(acc, b):
                loss, ploss = one(params, b, args, ascent_state)
                return (acc[0] + loss, acc[1] + ploss), None

            shapes = jax.eval_shape(
                lambda: one(params, jax.tree.map(lambda x: x[0], batch.stacked), args, ascent_state)
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (loss, ploss), _ = jax.lax.scan(body, zeros, batch.stacked)
            num = jax.tree.leaves(batch.stacked)[0].shape[0]
            loss, ploss = loss / num, ploss / num
        else:
            loss, ploss = one(params, batch, args, ascent_state)
        return MSharpness(sharpness=ploss - loss, loss=loss, perturbed_loss=ploss)

    return f
