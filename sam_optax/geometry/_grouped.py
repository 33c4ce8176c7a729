"""Per-group radii with one global gradient norm: what PyTorch SAM's param groups give."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry, ScheduleState

LabelsOrFn = Any | Callable[[Any], Any]


def _leaf_radii(labels: Any, tree: Any, radii: Mapping[Hashable, Any]) -> Any:
    """A tree like ``tree`` whose leaves are the radius of their group."""

    def subtree(label, sub):
        if label not in radii:
            raise ValueError(f"rho has no radius for the label {label!r} (rho's labels: {sorted(map(str, radii))}).")
        return jax.tree.map(lambda _: radii[label], sub)

    return jax.tree.map(subtree, labels, tree)


def grouped_l2(
    labels: LabelsOrFn,
    rho: Mapping[Hashable, _utils.ScalarOrSchedule],
    *,
    eps: float = 1e-12,
) -> AscentGeometry:
    r"""SAM's L2 perturbation with one radius per parameter group (PyTorch param groups).

    Every leaf belongs to the group named by its label; group :math:`G` has
    radius :math:`\rho_G`. The gradient norm is ONE global norm over all the
    leaves (those of groups with :math:`\rho_G = 0` included):

    .. math::

      \epsilon_G = \frac{\rho_G}{\lVert g \rVert_2 + \varepsilon} \, g_G

    This is what PyTorch SAM implementations do with ``param_groups`` (e.g.
    ``davda54/sam``: ``scale = group['rho'] / (grad_norm + 1e-12)`` with
    ``grad_norm`` over every group). A group with :math:`\rho_G = 0` gets a
    zero perturbation: that is how to exclude layers while keeping their
    gradient in the norm (to exclude them from the norm as well, use
    :func:`only`). With one label, it is :func:`l2`.

    The ball. ``norm`` is the ellipsoidal norm
    :math:`N(\epsilon) = (\sum_{G:\,\rho_G > 0} \lVert\epsilon_G\rVert_2^2 /
    \rho_G^2)^{1/2}` (leaves of :math:`\rho_G = 0` groups must be zero). The
    perturbation has :math:`N = \lVert g_{\rho>0}\rVert / (\lVert g\rVert +
    \varepsilon)`: 1 when no group has radius 0, less otherwise. So the radii
    are in the ball's shape and its radius is 1 (not ``rho``); multi-step ascent
    projects radially onto the ellipsoid through the first perturbation. The
    perturbation is not the first-order maximizer over this ellipsoid (that
    would be :math:`\propto \rho_G^2 g_G`); it is PyTorch's rule, kept exactly.
    When a radius is a schedule ``norm`` is ``None`` (it is not told the step),
    and multi-step ascent is unavailable.

    Args:
      labels: a pytree of labels (strings or ints, not ``None``) with the
        structure of the params (or a prefix of it), or a function of the
        params returning one, as ``optax.multi_transform``'s ``param_labels``.
        A function is called with the params at ``init`` and with the gradient
        at ``update``, so it must depend only on the tree's structure.
      rho: a dict ``label -> radius``, each a number ``>= 0`` or an optax
        schedule of the step; it must have every label that occurs.
      eps: added to the global norm in the denominator, ``>= 0``.

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021; PyTorch
      implementation with parameter groups: https://github.com/davda54/sam

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> geo = sam_optax.geometry.grouped_l2({'w': 'body', 'b': 'head'}, {'body': 0.1, 'head': 0.0})
      >>> g = {'w': jnp.array([3.0]), 'b': jnp.array([4.0])}
      >>> eps, _ = geo.update(g, geo.init(g))
      >>> print(round(float(eps['w'][0]), 4), float(eps['b'][0]))
      0.06 0.0
    """
    if not isinstance(rho, Mapping) or not rho:
        raise ValueError(f"rho must be a non-empty dict label -> radius, got {rho!r}.")
    for label, value in rho.items():
        _utils.check_range(f"rho[{label!r}]", value, low=0.0, allow_schedule=True)
    _utils.check_range("eps", eps, low=0.0)
    scheduled = any(callable(value) for value in rho.values())
    label_tree = labels if callable(labels) else (lambda _: labels)

    def init_fn(params):
        _leaf_radii(label_tree(params), params, rho)  # every label has a radius
        return ScheduleState(count=jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

    def update_fn(grads, state, params=None, **extra_args):
        del params, extra_args
        if scheduled:
            radii = {k: _utils.value_at(v, state.count) for k, v in rho.items()}
            state = ScheduleState(count=optax.safe_increment(state.count))
        else:
            radii = {k: jnp.asarray(v) for k, v in rho.items()}
        unit = _utils.tree_direction(grads, eps)  # g / (||g|| + eps), 0 for g = 0
        r_tree = _leaf_radii(label_tree(grads), unit, radii)
        return jax.tree.map(lambda r, x: r.astype(x.dtype) * x, r_tree, unit), state

    def norm_fn(perturbation, grads, params=None):
        del grads, params
        e = _utils.to_compute(perturbation)
        r_tree = _leaf_radii(label_tree(perturbation), e, {k: jnp.asarray(v) for k, v in rho.items()})
        scaled = jax.tree.map(
            lambda r, x: jnp.where(r > 0, x / _utils.safe_divisor(r.astype(x.dtype)), jnp.zeros_like(x)), r_tree, e
        )
        return _utils.tree_norm(scaled)

    return AscentGeometry(init_fn, update_fn, None if scheduled else norm_fn)
