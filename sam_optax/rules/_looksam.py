"""LookSAM: a full SAM gradient every k steps, the stored sharpness direction in between."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.rules._base import sharpness_rule


class LookSAMState(NamedTuple):
    """LookSAM's own state (the ``extra`` of its :class:`SharpnessRuleState`).

    Attributes:
      sharpness_direction: :math:`g_v`, the part of the last full step's
        perturbed gradient orthogonal to its clean gradient.
      looksam_full_step: whether the *next* update is a full SAM step (read it
        with :func:`looksam_full_step` to skip the second pass on reuse steps).
    """

    sharpness_direction: Any
    looksam_full_step: jax.Array  # shape=(), dtype=bool.


def looksam(
    base: optax.GradientTransformation,
    k: int = 5,
    alpha: float = 0.7,
    *,
    eps: float = 1e-12,
    max_norm: Optional[float] = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: compute the SAM gradient every ``k`` steps and reuse its direction.

    On full steps (:math:`t \bmod k = 0`) the base optimizer sees the perturbed
    gradient :math:`g_s = \tilde g` and the sharpness direction is stored:

    .. math::

      g_v = g_s - \lVert g_s\rVert \cos\theta \, \frac{g}{\lVert g\rVert}
          = g_s - \frac{\langle g, g_s\rangle}{\lVert g\rVert^2} g .

    On the other steps only the clean gradient is computed and the base
    optimizer sees

    .. math::

      g_s = g + \alpha \, \frac{\lVert g\rVert}{\lVert g_v\rVert} \, g_v .

    ``k = 1`` is exactly SAM. To make the reuse steps cost one gradient pass,
    pass ``second_pass=sam_optax.looksam_full_step(opt_state)`` to the function
    made by :func:`sam_optax.sharpness_aware_grad`: the choice happens inside
    ``jit`` (``lax.cond``), with no recompilation. The decomposition is over the
    whole parameter vector, as in the paper's Algorithm 1 (some third-party
    implementations do it per tensor).

    Args:
      base: any optax optimizer.
      k: period of the full SAM steps, an integer ``>= 1``. An integer array
        works too, traced or not (``optax.inject_hyperparams`` injects ``k``
        unless ``static_args=('k',)``); a traced ``k`` is not range-checked.
      alpha: ``>= 0``, weight of the reused direction (0.7 in common settings).
      eps: ``>= 0``, added to norms in denominators.
      max_norm: optional ``> 0``; clip both gradients to this global norm first.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`; call its
      ``update(grads, state, params, perturbed_grads=...)`` (on reuse steps the
      ``perturbed_grads`` are ignored).

    References:
      Liu et al, `Towards Efficient and Scalable Sharpness-Aware Minimization
      <https://arxiv.org/abs/2203.02714>`_, CVPR 2022
    """
    k = _check_k(k)
    _utils.check_range("alpha", alpha, low=0.0)
    _utils.check_range("eps", eps, low=0.0)

    def init_extra(params):
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _utils.compute_dtype(p)), params)
        return LookSAMState(sharpness_direction=zeros, looksam_full_step=jnp.asarray(True))

    def combine(g, g_pert, state, params):
        del params
        full = state.rule_count % k == 0
        fresh = sharpness_direction(g_pert, g, eps)
        g_v = jax.tree.map(lambda a, b: jnp.where(full, a, b), fresh, state.extra.sharpness_direction)
        reused = reuse_direction(g, g_v, alpha, eps)
        base_grads = jax.tree.map(lambda s, r: jnp.where(full, s, r), g_pert, reused)
        next_full = (state.rule_count + 1) % k == 0
        return base_grads, None, LookSAMState(g_v, next_full)

    return sharpness_rule(base, combine, name="looksam", max_norm=max_norm, init_extra=init_extra)


def sharpness_direction(g_s: Any, g: Any, eps: Any) -> Any:
    r""":math:`g_v = g_s - \langle g, g_s\rangle\, g / (\lVert g\rVert^2 + \varepsilon)`.

    Overflow-safe: with ``u = g / d``, ``n = ||u||`` and :math:`g_s = d_s u_s`
    (``d``, :math:`d_s` powers of two near the largest entries) it is
    :math:`g_s - d_s \langle u, u_s\rangle u / (n^2 + \varepsilon / d^2)`;
    a zero ``g`` gives :math:`g_v = g_s` (no NaN, also with ``eps = 0``).
    """
    u, d, n = _utils.tree_norm_parts(g)
    u_s, d_s = _utils.tree_scaled(g_s)
    c = _utils.tree_vdot(u, u_s) / _utils.safe_divisor(n * n + eps / d / d)
    return jax.tree.map(lambda s, ui: s - d_s * (c * ui), g_s, u)


def reuse_direction(g: Any, g_v: Any, alpha: Any, eps: Any) -> Any:
    r""":math:`g + \alpha \lVert g\rVert\, g_v / (\lVert g_v\rVert + \varepsilon)`,
    computed as :math:`g + d\,(\alpha\, n\, w)` with :math:`\lVert g\rVert = d\,n`
    and ``w`` the scaled unit direction of :math:`g_v` (0 for :math:`g_v = 0`)."""
    _, d, n = _utils.tree_norm_parts(g)
    w = _utils.tree_direction(g_v, eps)
    return jax.tree.map(lambda c, wi: c + d * (alpha * n * wi), g, w)


def _check_k(k: Any) -> Any:
    """``k`` as a Python int ``>= 1``; an integer tracer is kept (``count % k`` works)."""
    _utils.check_int("k", k, low=1, allow_array=True)  # a tracer: shape and dtype only
    if _utils.is_traced(k):
        return k
    return int(k)


def looksam_full_step(opt_state: Any) -> jax.Array:
    """Whether the next LookSAM update is a full SAM step (needs the second pass).

    Finds the LookSAM state anywhere inside ``opt_state`` (chains, wrappers).
    """
    return optax.tree.get(opt_state, "looksam_full_step")
