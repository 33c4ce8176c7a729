"""Small shared helpers: hyperparameter validation, float32 tree maths."""

from __future__ import annotations

import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


# --------------------------------------------------------------------------
# Validation. Hyperparameters may be Python numbers (checked at construction),
# jax arrays / tracers (e.g. under ``optax.inject_hyperparams``; not checked,
# since a traced value cannot be branched on) or schedules (callables).
# --------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
) -> None:
    """Raises ``ValueError`` if a Python-number hyperparameter is out of range.

    Traced values and schedules are accepted as they are (a schedule's values are
    only known at run time).
    """
    if callable(value):
        if not allow_schedule:
            raise ValueError(f"{name} must be a number, got the callable {value!r}.")
        return
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got the bool {value!r}.")
    if not _is_number(value):
        return  # a jax array or tracer: validated by the user, not branchable here
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    bad = False
    if low is not None:
        bad |= value < low if low_inclusive else value <= low
    if high is not None:
        bad |= value > high if high_inclusive else value >= high
    if value != value:  # NaN
        bad = True
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def value_at(value: ScalarOrSchedule, count: jax.Array | None) -> jax.Array:
    """Evaluates a number-or-schedule at a step count."""
    if callable(value):
        return jnp.asarray(value(count))
    return jnp.asarray(value)


# --------------------------------------------------------------------------
# Float32 tree maths (norms and perturbations are always computed in at least
# float32, whatever the dtype of the parameters and gradients).
# --------------------------------------------------------------------------


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32; float64 stays float64."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def to_compute(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, compute_dtype(x)), tree)


def cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.asarray(x, jnp.asarray(y).dtype), tree, like)


def tree_sum(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(jnp.sum(x) for x in leaves)


def tree_norm(tree: Any) -> jax.Array:
    """Global L2 norm in float32 (or float64 for float64 leaves)."""
    return jnp.sqrt(tree_sum(jax.tree.map(lambda x: jnp.square(to_compute(x)), tree)))


def tree_vdot(a: Any, b: Any) -> jax.Array:
    return tree_sum(jax.tree.map(lambda x, y: to_compute(x) * to_compute(y), a, b))


def add_perturbation(params: Any, perturbation: Any) -> Any:
    """``params + perturbation`` computed in float32, returned in the params' dtypes."""
    return jax.tree.map(
        lambda p, e: (to_compute(p) + e).astype(jnp.asarray(p).dtype), params, perturbation
    )


def is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def mask_like(template: Any, tree: Any) -> Any:
    """Replaces the leaves of ``tree`` by ``MaskedNode`` where ``template`` has one.

    Used so that a rule placed inside ``optax.masked`` / ``optax.multi_transform``
    (which hand it a tree with ``MaskedNode`` leaves) can read a full-size extra
    argument such as ``perturbed_grads``.
    """
    return jax.tree.map(
        lambda t, x: t if is_masked_node(t) else x, template, tree, is_leaf=is_masked_node
    )


# --------------------------------------------------------------------------
# Hyperparameters under ``optax.inject_hyperparams``, which passes every
# numeric argument (defaulted integers included) as a jax array: a concrete
# one outside ``jit``, a tracer inside it.
# --------------------------------------------------------------------------


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a tracer (its value is unknown while tracing)."""
    return isinstance(value, jax.core.Tracer)


def static_number(name: str, value: Any) -> Any:
    """A Python number from a number or a concrete 0-d array.

    Python numbers are returned unchanged; a concrete 0-d array (as
    ``optax.inject_hyperparams`` passes) becomes an ``int`` (integer dtype) or
    a ``float``.

    Args:
      name: the argument's name, for error messages.
      value: the hyperparameter.

    Returns:
      A Python number.

    Raises:
      ValueError: for a tracer (recommending ``static_args=(name,)``), a bool,
        an array that is not 0-d, or anything else that is not a number.
    """
    if is_traced(value):
        raise ValueError(
            f"{name} must be a concrete number here, got a traced value; with "
            f"optax.inject_hyperparams pass static_args=({name!r},)."
        )
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
        dtype = np.asarray(value).dtype
        if dtype == np.bool_:
            raise ValueError(f"{name} must be a number, got the bool {value!r}.")
        value = int(value) if np.issubdtype(dtype, np.integer) else float(value)
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    return value


def check_integer_tracer(name: str, value: Any) -> None:
    """Raises ``ValueError`` if a traced hyperparameter does not have an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
        raise ValueError(f"{name} must be an integer, got a traced value of dtype {jnp.result_type(value)}.")
