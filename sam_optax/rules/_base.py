"""What every combination rule shares: reading both gradients, clipping, the base step.

A combination rule turns the clean gradient ``g`` and the perturbed gradient
``g_pert`` (from :func:`sam_optax.sharpness_aware_grad`) into an update, using
any base optax optimizer. A rule is written as a ``combine`` function:

``combine(g, g_pert, state, params) -> (base_grads, post, extra)``

* ``state``: the rule's :class:`SharpnessRuleState` before this step;
* ``base_grads``: the gradient the base optimizer sees;
* ``post``: ``None`` or ``post(updates, new_inner_state) -> updates``, applied
  to the base optimizer's updates (e.g. WSAM's decoupled sharpness step);
* ``extra``: the rule's new own state (or ``None``).

``g`` and ``g_pert`` come in at least float32; the base optimizer receives
``base_grads`` cast back to the dtype of the incoming gradient.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

CombineFn = Callable[[Any, Any, Any, Any], tuple[Any, Optional[Callable[[Any, Any], Any]], Any]]


class SharpnessRuleState(NamedTuple):
    """State of a combination rule.

    Attributes:
      count: number of updates so far (for learning-rate schedules of the rule).
      inner_state: the base optimizer's state.
      extra: the rule's own state (``None`` for most rules).
    """

    count: jax.Array  # shape=(), dtype=jnp.int32.
    inner_state: Any
    extra: Any = None


MISSING_PERTURBED = (
    "{name} needs the gradient at the perturbed weights: call "
    "tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads) "
    "with out = sam_optax.sharpness_aware_grad(...)(params, batch)."
)


def clip_by_global_norm(tree: Any, max_norm: Any) -> Any:
    """``tree * min(1, max_norm / ||tree||)`` (no NaN for a zero tree)."""
    norm = _utils.tree_norm(tree)
    scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree.map(lambda x: scale * x, tree)


def sharpness_rule(
    base: optax.GradientTransformation,
    combine: CombineFn,
    *,
    name: str,
    max_norm: Optional[float] = None,
    init_extra: Optional[Callable[[Any], Any]] = None,
    check_init: Optional[Callable[[Any], None]] = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds a combination rule around a base optimizer.

    Args:
      base: any optax ``GradientTransformation``; extra keyword arguments given
        to the rule's ``update`` (other than ``perturbed_grads``) are forwarded
        to it.
      combine: the rule (see the module docstring).
      name: the rule's name, for error messages.
      max_norm: if given, ``> 0``: both ``g`` and ``g_pert`` are clipped to this
        global norm before ``combine`` (as the official WSAM code's ``max_norm``).
      init_extra: ``params -> extra`` initial rule state.
      check_init: ``inner_state -> None``, may raise ``ValueError`` at init.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`, whose
      ``update(grads, state, params=None, *, perturbed_grads, **extra_args)``
      takes the clean gradient as ``grads``.
    """
    if max_norm is not None:
        _utils.check_range("max_norm", max_norm, low=0.0, low_inclusive=False)
    base = optax.with_extra_args_support(base)

    def init_fn(params):
        inner = base.init(params)
        if check_init is not None:
            check_init(inner)
        extra = init_extra(params) if init_extra is not None else None
        return SharpnessRuleState(count=jnp.zeros([], jnp.int32), inner_state=inner, extra=extra)

    def update_fn(updates, state, params=None, *, perturbed_grads=None, **extra_args):
        if perturbed_grads is None:
            raise ValueError(MISSING_PERTURBED.format(name=name))
        perturbed_grads = _utils.mask_like(updates, perturbed_grads)
        g = _utils.to_compute(updates)
        g_pert = _utils.to_compute(perturbed_grads)
        if max_norm is not None:
            g = clip_by_global_norm(g, max_norm)
            g_pert = clip_by_global_norm(g_pert, max_norm)
        base_grads, post, extra = combine(g, g_pert, state, params)
        base_grads = _utils.cast_like(base_grads, updates)
        new_updates, inner = base.update(base_grads, state.inner_state, params, **extra_args)
        if post is not None:
            new_updates = _utils.cast_like(post(new_updates, inner), new_updates)
        new_state = SharpnessRuleState(
            count=optax.safe_increment(state.count), inner_state=inner, extra=extra
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
