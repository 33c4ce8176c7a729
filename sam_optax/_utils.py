"""Small shared helpers: hyperparameter validation, float32 tree maths."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, TypeAlias, TypeGuard, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule: TypeAlias = float | jax.Array | optax.Schedule


# --------------------------------------------------------------------------
# Validation. Hyperparameters may be Python numbers (checked at construction),
# jax arrays / tracers (e.g. under ``optax.inject_hyperparams``; not checked,
# since a traced value cannot be branched on) or schedules (callables).
# --------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


#: Largest finite float32: a hyperparameter beyond it becomes ``inf`` once cast.
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Smallest normal float32: a positive hyperparameter below it may become 0.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
#: Integer hyperparameters meet int32 step counters in the optimizer states.
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_error(name: str, value: Any, expected: str) -> ValueError:
    """The ``ValueError`` for a value of the wrong kind (string, None, list, complex ...)."""
    if value is None:
        got = "None"
    elif isinstance(value, (bool, np.bool_)):
        got = f"the bool {value!r}"
    elif isinstance(value, str):
        got = f"the string {value!r}"
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        got = f"the complex number {value!r}"
    elif isinstance(value, (list, tuple, dict, set)):
        got = f"a {type(value).__name__} ({_short(value)})"
    elif callable(value):
        got = f"the callable {_short(value)}"
    else:
        got = f"{_short(value)} of type {type(value).__name__}"
    return ValueError(f"{name} must be {expected}, got {got}.")


def _array_scalar(name: str, value: Any, expected: str, *, integer: bool = False) -> Any:
    """Shape and dtype checks of an array hyperparameter (0-d, real, integer if asked).

    Returns ``None`` for a tracer (its value is unknown while tracing), else the
    value as a Python ``int`` / ``float``.
    """
    shape = jnp.shape(value)
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {shape}.")
    dtype = np.dtype(jnp.result_type(value)) if is_traced(value) else np.asarray(value).dtype
    if dtype == np.bool_:
        raise ValueError(f"{name} must be {expected}, got a bool array.")
    kinds = (np.integer,) if integer else (np.integer, np.floating)
    if not any(np.issubdtype(dtype, kind) for kind in kinds) and not (
        not integer and jnp.issubdtype(dtype, jnp.floating)  # bfloat16 and friends
    ):
        raise ValueError(f"{name} must be {expected}, got an array of dtype {dtype}.")
    if is_traced(value):
        return None
    item = np.asarray(value).item()
    return int(item) if np.issubdtype(dtype, np.integer) else float(item)


def real_scalar(name: str, value: Any, *, expected: str = "a real number") -> Any:
    """``value`` as a Python ``int`` / ``float``, or ``None`` for a tracer.

    Accepts Python and numpy real numbers and 0-d real jax / numpy arrays
    (concrete: converted; traced: shape and dtype checked, value unknown).

    Raises:
      ValueError: naming ``name``, for a bool, string, ``None``, list, complex
        number, non-scalar array or non-numeric dtype.
    """
    if isinstance(value, (bool, np.bool_)):
        raise _type_error(name, value, expected)
    if isinstance(value, _ARRAY_TYPES):
        return _array_scalar(name, value, expected)
    if _is_number(value):
        return value
    raise _type_error(name, value, expected)


def _bound(value: Any) -> Any:
    """A range bound as a Python number; ``None`` when unknown (traced) or not a real scalar."""
    if value is None:
        return None
    try:
        return real_scalar("bound", value)
    except ValueError:
        return None


def check_range(
    name: str,
    value: Any,
    *,
    low: Any = None,
    high: Any = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_schedule: bool = False,
    allow_inf: bool = False,
    allow_none: bool = False,
    low_name: str | None = None,
    high_name: str | None = None,
) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is a valid real hyperparameter.

    Accepted: a real Python / numpy number or a 0-d real jax / numpy array in
    the interval (``low``, ``high``, inclusive or not); a schedule (any callable)
    if ``allow_schedule``; ``None`` if ``allow_none``; a tracer (under ``jit``,
    e.g. ``optax.inject_hyperparams``) whose shape is ``()`` and dtype real (its
    value is not branchable, so it is not range-checked).

    Rejected with a ``ValueError`` naming the argument: strings, ``None``,
    bools, lists, complex numbers, arrays that are not 0-d or not real, NaN;
    ``inf`` and finite values beyond the float32 range (``|x| > 3.4e38``, which
    become ``inf`` once cast) unless ``allow_inf``; and, for a strictly
    positive range (``low=0, low_inclusive=False``), positive values below the
    smallest normal float32 (about ``1.2e-38``), which may round to 0.

    ``low`` and ``high`` may be numbers or 0-d arrays; an unknown (traced) bound
    is skipped. When a bound is another argument, ``low_name`` / ``high_name``
    name it in the message (``rho_max must be in [rho_min=0.5, inf]``).
    """
    what = "a real number or a schedule" if allow_schedule else "a real number"
    if value is None and allow_none:
        return
    if callable(value) and not isinstance(value, _ARRAY_TYPES):
        if not allow_schedule:
            raise _type_error(name, value, what)
        return
    x = real_scalar(name, value, expected=what)
    if x is None:
        return  # a tracer: validated by the user, not branchable here
    low, high = _bound(low), _bound(high)
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    low_text = "-inf" if low is None else (f"{low_name}={low}" if low_name else f"{low}")
    high_text = "inf" if high is None else (f"{high_name}={high}" if high_name else f"{high}")
    interval = f"{lo}{low_text}, {high_text}{hi}"
    try:
        magnitude = abs(float(x))
    except OverflowError:  # a Python int beyond the float range
        magnitude = math.inf
    if x != x:  # NaN
        raise ValueError(f"{name} must be in {interval}, got {value!r}.")
    if not allow_inf and magnitude > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be finite (|{name}| <= {FLOAT32_MAX:.4g}, the float32 range), got {_short(value)}."
        )
    bad = False
    if low is not None:
        bad |= x < low if low_inclusive else x <= low
    if high is not None:
        bad |= x > high if high_inclusive else x >= high
    if bad:
        raise ValueError(f"{name} must be in {interval}, got {_short(value)}.")
    if low == 0 and not low_inclusive and 0 < magnitude < FLOAT32_TINY:
        raise ValueError(
            f"{name} must be > 0 and at least {FLOAT32_TINY:.4g} (the smallest normal float32; "
            f"smaller values may round to 0), got {value!r}."
        )


def check_int(
    name: str,
    value: Any,
    *,
    low: int | None = 1,
    high: int | None = INT32_MAX,
    allow_none: bool = False,
    allow_array: bool = False,
) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is an integer in ``[low, high]``.

    Accepted: Python and numpy integers (not bools); ``None`` if ``allow_none``;
    with ``allow_array``, 0-d integer jax / numpy arrays too (concrete: range
    checked; traced, e.g. under ``optax.inject_hyperparams`` in ``jit``: only
    the shape and dtype). The default upper bound is ``2**31 - 1``: integer
    hyperparameters meet the int32 step counters of the optimizer states.
    """
    if low is None and high is None:
        interval = "an integer"
    elif high is None:
        interval = f"an integer >= {low}"
    elif low is None:
        interval = f"an integer <= {high}"
    else:
        interval = f"an integer in [{low}, {high}]"
    if value is None and allow_none:
        return
    if isinstance(value, (bool, np.bool_)):
        raise _type_error(name, value, interval)
    if isinstance(value, _ARRAY_TYPES) and not isinstance(value, np.integer):
        if not allow_array:
            raise _type_error(name, value, interval)
        value = _array_scalar(name, value, interval, integer=True)
        if value is None:
            return  # traced
    elif not isinstance(value, numbers.Integral):
        raise _type_error(name, value, interval)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {interval}, got {_short(value)}.")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False, high: int | None = INT32_MAX) -> None:
    """:func:`check_int` with ``low=1``: Python / numpy integers ``>= 1`` (and ``<= high``)."""
    check_int(name, value, low=1, high=high, allow_none=allow_none)


def check_float_dtype(name: str, value: Any) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is ``None`` or a floating dtype."""
    if value is None:
        return
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be None or a floating dtype (e.g. jnp.float32), got {_short(value)}.")


def check_transformation(name: str, value: Any, what: str = "an optax GradientTransformation") -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` has callable ``init`` and ``update``."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise ValueError(f"{name} must be {what} (with init and update), got {_short(value)}.")


def value_at(value: ScalarOrSchedule, count: jax.Array | None) -> jax.Array:
    """Evaluates a number-or-schedule at a step count."""
    if callable(value):
        return jnp.asarray(value(count))
    return jnp.asarray(value)


# --------------------------------------------------------------------------
# Tree maths in at least float32 (float64 stays float64), whatever the dtype of
# the parameters and gradients. Norms, unit directions and inner products are
# overflow- and underflow-safe: the tree is first divided by a power of two
# close to its largest magnitude (an exact scaling), so squaring cannot leave
# the float range. A zero tree gives a zero norm and a zero direction (no NaN,
# also with ``eps = 0``).
# --------------------------------------------------------------------------


def compute_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32; float64 stays float64."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def tree_compute_dtype(tree: Any) -> jnp.dtype:
    """The widest :func:`compute_dtype` of the leaves (float32 for an empty tree)."""
    dtypes = [compute_dtype(x) for x in jax.tree.leaves(tree)]
    return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def hyper_dtype() -> jnp.dtype:
    """Dtype of scalar hyperparameter arithmetic: float64 under ``jax_enable_x64``, else float32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def to_compute(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, compute_dtype(x)), tree)


def cast_like(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.asarray(x, jnp.asarray(y).dtype), tree, like)


def tree_sum(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return cast(jax.Array, sum(jnp.sum(x) for x in leaves))


def safe_divisor(x: jax.Array) -> jax.Array:
    """``x`` where ``x > 0``, else 1: ``a / safe_divisor(b)`` is 0 for ``a = b = 0``."""
    return jnp.where(x > 0, x, jnp.ones_like(x))


def tree_max_abs(tree: Any) -> jax.Array:
    """:math:`\\max_i |x_i|` over every entry (0 for an empty or zero-size tree)."""
    leaves = [jnp.max(jnp.abs(x), initial=0) for x in jax.tree.leaves(to_compute(tree))]
    return functools.reduce(jnp.maximum, leaves, jnp.zeros((), jnp.float32))


def _pow2_scale(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Powers of two ``(d, 1 / d)``, both normal numbers, with ``d`` close to ``m``.

    ``d`` is ``m`` with its mantissa bits cleared (:math:`m / 2 < d \le m`),
    clipped to ``[tiny, 2 ** (maxexp - 2)]`` (so ``m / d < 4``); 1 for ``inf``
    or NaN. ``1 / d`` is made from the exponent bits too: multiplying by it is
    exact, and no division by a huge number is needed (XLA may compute ``x / y``
    as ``x * (1 / y)``, which flushes to zero for ``y > 2 ** 126`` in float32).
    """
    info = jnp.finfo(m.dtype)
    ints = jnp.int64 if m.dtype.itemsize == 8 else jnp.int32

    def bits(x):
        return jax.lax.bitcast_convert_type(jnp.asarray(x, m.dtype), ints)

    d = jax.lax.bitcast_convert_type(bits(m) & bits(jnp.inf), m.dtype)
    d = jnp.where(jnp.isfinite(m), jnp.clip(d, info.tiny, 2.0 ** (info.maxexp - 2)), 1.0).astype(m.dtype)
    inv = jax.lax.bitcast_convert_type(2 * bits(1.0) - bits(d), m.dtype)
    return d, inv


def tree_scaled(tree: Any) -> tuple[Any, jax.Array]:
    r"""``(tree / d, d)`` with ``d`` the power of two of :func:`_pow2_scale` for
    :math:`\max_i |x_i|` (an exact scaling); ``tree / d`` is at least float32."""
    tree = to_compute(tree)
    d, inv = _pow2_scale(tree_max_abs(tree))
    return jax.tree.map(lambda x: x * inv, tree), d


def tree_norm_parts(tree: Any) -> tuple[Any, jax.Array, jax.Array]:
    r"""``(u, d, n)`` with ``u = tree / d`` and :math:`\lVert tree\rVert_2 = d\, n`.

    ``d`` is a power of two near :math:`\max_i |x_i|` (see :func:`_pow2_scale`),
    so :math:`|u_i| < 4` and ``n`` (the norm of ``u``) neither overflows nor
    underflows; ``u`` is at least float32.
    """
    u, d = tree_scaled(tree)
    return u, d, jnp.sqrt(tree_sum(jax.tree.map(jnp.square, u)))


def tree_norm(tree: Any) -> jax.Array:
    r"""Global L2 norm :math:`d\,\lVert x / d\rVert` (see :func:`tree_norm_parts`).

    In at least float32 (float64 for float64 leaves); ``inf`` only when the norm
    itself exceeds the dtype's range.
    """
    _, d, n = tree_norm_parts(tree)
    return d * n


def tree_direction(tree: Any, eps: Any = 0.0) -> Any:
    r""":math:`x / (\lVert x\rVert_2 + \varepsilon)`, with the norm computed as
    :math:`d\,\lVert x / d\rVert` (see :func:`tree_norm_parts`); zero for a
    zero tree, also when ``eps = 0``.

    Each entry is ``(x * 2/d) * (0.5 / (n + eps/d))``: two scalar factors, both
    normal numbers (:math:`|x\cdot 2/d| < 4`). Not ``(x / d) /
    (...)``: XLA would share ``x / d`` with the norm's reduction and keep it in
    memory, a second copy of the tree (twice the temporaries of vmapped
    m-sharpness chunks, measured); nor ``x * (1 / (d (n + eps/d)))``, a factor
    that flushes to zero for ``d`` near the dtype's maximum.
    """
    tree = to_compute(tree)
    d, inv = _pow2_scale(tree_max_abs(tree))
    n = jnp.sqrt(tree_sum(jax.tree.map(lambda x: jnp.square(x * inv), tree)))
    scale, unit = 2 * inv, 0.5 / safe_divisor(n + eps / d)
    return jax.tree.map(lambda x: (x * scale) * unit, tree)


def tree_vdot(a: Any, b: Any) -> jax.Array:
    """:math:`\\langle a, b\\rangle` (plain: use it on scaled trees, entries of order 1)."""
    return tree_sum(jax.tree.map(lambda x, y: to_compute(x) * to_compute(y), a, b))


def add_perturbation(params: optax.Params, perturbation: optax.Updates) -> optax.Params:
    """``params + perturbation`` computed in float32, returned in the params' dtypes."""
    return jax.tree.map(lambda p, e: (to_compute(p) + e).astype(jnp.asarray(p).dtype), params, perturbation)


def is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def mask_like(template: Any, tree: Any) -> Any:
    """Replaces the leaves of ``tree`` by ``MaskedNode`` where ``template`` has one.

    Used so that a rule placed inside ``optax.masked`` / ``optax.multi_transform``
    (which hand it a tree with ``MaskedNode`` leaves) can read a full-size extra
    argument such as ``perturbed_grads``.
    """
    return jax.tree.map(lambda t, x: t if is_masked_node(t) else x, template, tree, is_leaf=is_masked_node)


# --------------------------------------------------------------------------
# Hyperparameters under ``optax.inject_hyperparams``, which passes every
# numeric argument (defaulted integers included) as a jax array: a concrete
# one outside ``jit``, a tracer inside it.
# --------------------------------------------------------------------------


def is_traced(value: Any) -> TypeGuard[jax.Array]:
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
    return real_scalar(name, value, expected="a number")


def check_integer_tracer(name: str, value: Any) -> None:
    """Raises ``ValueError`` if a traced hyperparameter does not have an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
        raise ValueError(f"{name} must be an integer, got a traced value of dtype {jnp.result_type(value)}.")
