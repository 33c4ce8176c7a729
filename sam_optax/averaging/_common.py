"""What the weight-averaging wrappers share: validation, copies, state look-up."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

NO_PARAMS = "{name} needs the current weights: call tx.update(grads, opt_state, params, **extra_args)."


def check_int(name: str, value: Any, *, low: int, high: int | None = _utils.INT32_MAX) -> None:
    """``ValueError`` unless ``value`` is an integer in ``[low, high]`` (Python / numpy
    integer or 0-d integer array); tracers (``optax.inject_hyperparams`` under
    ``jit``) are checked for shape and dtype only. See :func:`sam_optax._utils.check_int`."""
    _utils.check_int(name, value, low=low, high=high, allow_array=True)


def copy_tree(tree: Any, dtype: Any | None = None) -> Any:
    """A fresh copy of every leaf (never an alias: buffer donation would break)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=dtype or jnp.asarray(x).dtype, copy=True), tree)


def interpolate(old: optax.Params, new: optax.Params, weight: jax.Array, take: jax.Array) -> optax.Params:
    """``old * (1 - w) + new * w`` where ``take``, else ``old``; computed in at least
    float32 (``w`` cast to that dtype), stored in ``old``'s dtype. With ``w = 1``
    the result is exactly ``new``."""

    def leaf(o, n):
        o32, n32 = _utils.to_compute(o), _utils.to_compute(n)
        w = weight.astype(o32.dtype)
        mixed = o32 * (1 - w) + n32 * w
        return jnp.where(take, mixed, o32).astype(o.dtype)

    return jax.tree.map(leaf, old, new)


def find_state(opt_state: optax.OptState, cls: type, what: str) -> optax.OptState:
    """The unique ``cls`` state anywhere inside a (possibly chained) optimizer state."""
    found = optax.tree.get(opt_state, cls.__name__, filtering=lambda path, v: isinstance(v, cls))
    if found is None:
        raise ValueError(f"no {cls.__name__} in this optimizer state: was it built with {what}?")
    return found
