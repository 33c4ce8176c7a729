"""Property-based tests (hypothesis): every public constructor fed bad and extreme input.

Each test draws a constructor, one of its arguments and a value for it (wrong
types, NaN, inf, values beyond float32, huge and tiny numbers, numpy and jax
scalars, schedules), the other arguments keeping working defaults. The
property: either a ``ValueError`` whose message names the argument, or a
successful construction followed by a finite update (of the params' shapes) on
a small param tree. Values that can never be valid (a string, ``None`` where not
allowed, a list, a complex, a non-scalar array, NaN, ``inf`` or beyond float32
for a finite argument, a float or an integer beyond int32 for an integer
argument) must be rejected. Geometries and rules are also run on an empty tree
and a tree with a zero-size leaf.

Kept fast: ``max_examples`` 30 per test (15 for the empty trees), eager updates on tiny trees.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sam_optax import averaging, data, decay, geometry, rules

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

F32_MAX = float(np.finfo(np.float32).max)
I32_MAX = 2**31 - 1

PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "s": jnp.asarray(0.3), "k": jnp.array([[1.0, -0.5], [0.25, 2.0]])}
GRADS = jax.tree.map(lambda p: 0.1 * p + 0.05, PARAMS)
PGRADS = jax.tree.map(lambda g: 1.5 * g - 0.01, GRADS)
TREES = {
    "small": (PARAMS, GRADS, PGRADS),
    "empty": ({}, {}, {}),
    "zero_size_leaf": (
        {"w": jnp.array([0.5, -1.0]), "z": jnp.zeros((0, 4))},
        {"w": jnp.array([0.1, 0.2]), "z": jnp.zeros((0, 4))},
        {"w": jnp.array([0.2, 0.1]), "z": jnp.zeros((0, 4))},
    ),
}
SCHEDULE = optax.linear_schedule(0.1, 0.01, 50)
SGD = optax.sgd(0.1)


# ---- the values -----------------------------------------------------------------------------

WRONG_TYPES = [
    "0.1",
    "",
    "inf",
    None,
    [0.1],
    [],
    (0.1,),
    {"a": 0.1},
    {0.1},
    1j,
    0.1 + 0j,
    np.complex64(1.0),
    True,
    False,
    np.bool_(True),
    np.array([0.1, 0.2]),
    np.zeros((1, 1)),
    jnp.ones((1,)),
    np.str_("0.5"),
    b"0.5",
    object(),
    jnp.asarray(0.5 + 0.5j),
    jnp.asarray(True),
]
SPECIAL = [
    math.nan,
    math.inf,
    -math.inf,
    np.float32(np.nan),
    np.float64(np.inf),
    jnp.asarray(jnp.nan),
    jnp.asarray(-jnp.inf),
    1e39,
    -1e39,
    1e300,
    10**400,
    -(10**400),
    0.0,
    -0.0,
    1e-45,
    5e-324,
    1e-30,
    -1e-30,
    1e30,
    -1e30,
    0.5,
    1.0,
    0.999999,
    2.0,
    3.0,
    np.float32(0.5),
    jnp.asarray(0.5),
    jnp.asarray(2, jnp.int32),
    0,
    1,
    2,
    3,
    -1,
    I32_MAX,
    I32_MAX + 1,
    2**63,
    -(2**31) - 1,
    np.int64(3),
    np.uint8(2),
    np.int64(2**40),
    SCHEDULE,
    len,
]

_wrap = st.sampled_from([lambda x: x, np.float32, np.float64, jnp.asarray])
VALUES = st.one_of(
    st.sampled_from(SPECIAL + WRONG_TYPES),
    st.builds(lambda f, x: f(x), _wrap, st.floats(min_value=-1e30, max_value=1e30)),
    st.floats(),  # anything, NaN and inf included
    st.integers(min_value=-(2**40), max_value=2**40),
    st.integers(min_value=0, max_value=12),
)


def _real(value: Any):
    """``value`` as a Python number if it is a real scalar (number or 0-d real array), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        if np.shape(value) != () or np.asarray(value).dtype.kind not in "iuf":
            return None
        return np.asarray(value).item()
    if isinstance(value, numbers.Real):
        return value
    return None


def _magnitude(x) -> float:
    try:
        return abs(float(x))
    except OverflowError:
        return math.inf


class Arg(NamedTuple):
    """One argument of one constructor.

    ``build(value)`` constructs with that value (others at working defaults),
    ``run(obj)`` returns a pytree of outputs that must be finite. ``kind``:
    ``'real'`` (finite float), ``'real_inf'`` (inf allowed), ``'int'`` (int32
    range), ``'bigint'`` (any integer). ``run_max`` / ``build_max``: valid values
    larger than this (sizes that allocate: histogram bins, networks) are
    built but not run / not even built.
    """

    name: str
    build: Callable[[Any], Any]
    run: Callable[[Any], Any]
    kind: str = "real"
    none_ok: bool = False
    schedule_ok: bool = False
    run_max: float = math.inf
    build_max: float = math.inf
    int_arrays: bool = True  # 0-d integer arrays accepted (checked like numbers)

    def __repr__(self) -> str:  # in hypothesis' falsifying examples
        where = getattr(self.build, "factory", None) or inspect.getsource(self.build).strip()
        return f"Arg({self.name!r}, {where})"


def must_reject(arg: Arg, value: Any) -> bool:
    """Whether ``value`` can never be valid for ``arg``."""
    if value is None:
        return not arg.none_ok
    if callable(value) and not isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return not arg.schedule_ok
    x = _real(value)
    if x is None:
        return True
    if arg.kind in ("int", "bigint"):
        is_int = isinstance(value, numbers.Integral) or (
            arg.int_arrays and isinstance(value, (jax.Array, np.ndarray)) and np.asarray(value).dtype.kind in "iu"
        )
        if not is_int:
            return True
        return arg.kind == "int" and not -(2**31) <= x <= I32_MAX
    if x != x:
        return True
    return arg.kind != "real_inf" and _magnitude(x) > F32_MAX


def _shapes_and_finite(out: Any, like: Any = None) -> None:
    for leaf in jax.tree.leaves(out):
        assert bool(jnp.all(jnp.isfinite(jnp.asarray(leaf, jnp.float32)))), out
    if like is not None:
        assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, like)


def check(arg: Arg, value: Any, tree: str = "small") -> None:
    """The property, for one argument and one value."""
    x = _real(value)
    if x is not None and not must_reject(arg, value) and _magnitude(x) > arg.build_max:
        return
    try:
        obj = arg.build(value)
    except ValueError as e:
        assert arg.name in str(e), f"{arg.name}={value!r}: the message does not name it: {e}"
        return
    assert not must_reject(arg, value), f"{arg.name}={value!r} was accepted"
    if x is not None and _magnitude(x) > arg.run_max:
        return
    if x is not None and arg.kind.startswith("real") and _magnitude(x) > 1e30:
        return  # finite but near the float32 limit: overflow downstream is the caller's
    out, like = arg.run(obj) if tree == "small" else arg.run(obj, tree)
    _shapes_and_finite(out, like)


# ---- the constructors ---------------------------------------------------------------------


def run_geometry(geo, tree="small"):
    p, g, _ = TREES[tree]
    eps, state = geo.update(g, geo.init(p), p)
    eps, _ = geo.update(g, state, p)  # a second step (schedules, keys)
    return eps, p


def run_rule(tx, tree="small"):
    p, g, gp = TREES[tree]
    state = tx.init(p)
    for _ in range(2):
        u, state = tx.update(g, state, p, perturbed_grads=gp)
    return u, p


def run_transform(tx):
    state = tx.init(PARAMS)
    for _ in range(2):
        u, state = tx.update(GRADS, state, PARAMS)
    return u, PARAMS


def run_schedule(schedule):
    return [schedule(c) for c in (0, 1, 7, 50, 10**6)], None


def kw(factory, base=None, **fixed):
    """``build(value)`` for keyword argument ``name`` of ``factory``."""

    def builder(name):
        def build(value):
            return factory(**({} if base is None else base), **fixed, **{name: value})

        build.factory = f"{factory.__name__}(**{fixed}, {name}=...)"
        return build

    return builder


def geometry_args():
    out = []
    for name, factory in [
        ("l2", geometry.l2),
        ("pnorm", geometry.pnorm),
        ("adaptive", geometry.adaptive),
        ("fisher", geometry.fisher),
    ]:
        b = kw(factory)
        out.append(Arg("rho", b("rho"), run_geometry, schedule_ok=True))
        out.append(Arg("eps", b("eps"), run_geometry))
        if name in ("pnorm", "adaptive"):
            out.append(Arg("p", b("p"), run_geometry, kind="real_inf"))
        if name in ("adaptive", "fisher"):
            out.append(Arg("eta", b("eta"), run_geometry))
    stoch = kw(geometry.stochastic, geometry=geometry.l2(0.1), granularity="coordinate")
    stoch_masked = kw(geometry.stochastic, geometry=geometry.l2(0.1), normalize="masked")
    out += [
        Arg("beta", stoch("beta"), run_geometry),
        Arg("beta", stoch_masked("beta"), run_geometry),
        Arg("seed", stoch("seed"), run_geometry, kind="int"),
        Arg(
            "rho",
            lambda v: geometry.grouped_l2(lambda t: jax.tree.map(lambda _: "a", t), {"a": v}),
            run_geometry,
            schedule_ok=True,
        ),
        Arg(
            "eps",
            lambda v: geometry.grouped_l2(lambda t: jax.tree.map(lambda _: "a", t), {"a": 0.1}, eps=v),
            run_geometry,
        ),
        Arg(
            "rho",
            lambda v: geometry.only(geometry.l2(v), lambda t: jax.tree.map(lambda _: True, t)),
            run_geometry,
            schedule_ok=True,
        ),
    ]
    return out


def rule_args():
    out = [Arg("max_norm", kw(rules.sam, base=dict(base=SGD))("max_norm"), run_rule, none_ok=True)]
    wsam = kw(rules.wsam, base=dict(base=SGD), learning_rate=0.1)
    wsam_coupled = kw(rules.wsam, base=dict(base=SGD), decouple=False)
    out += [
        Arg("gamma", wsam("gamma"), run_rule),
        Arg("gamma", wsam_coupled("gamma"), run_rule),
        Arg("max_norm", wsam("max_norm"), run_rule, none_ok=True),
        Arg(
            "learning_rate", kw(rules.wsam, base=dict(base=SGD), gamma=0.9)("learning_rate"), run_rule, schedule_ok=True
        ),
    ]
    for factory in (rules.gsam, rules.looksam):
        b = kw(factory, base=dict(base=SGD))
        out += [
            Arg("alpha", b("alpha"), run_rule),
            Arg("eps", b("eps"), run_rule),
            Arg("max_norm", b("max_norm"), run_rule, none_ok=True),
        ]
    out.append(Arg("k", kw(rules.looksam, base=dict(base=SGD))("k"), run_rule, kind="int"))
    out.append(Arg("every_k", lambda v: rules.accumulate(rules.sam(SGD), v), run_rule, kind="int", int_arrays=False))
    out.append(
        Arg(
            "max_consecutive_errors",
            lambda v: rules.skip_nonfinite(rules.sam(SGD), v),
            run_rule,
            kind="int",
            int_arrays=False,
        )
    )
    defaults = dict(rho_max=0.05, rho_min=0.02, lr_max=0.1, lr_min=0.01)
    for name in defaults:  # (None for lr_max / lr_min: "required when learning_rate is a schedule")
        others = {k: v for k, v in defaults.items() if k != name}
        out.append(Arg(name, kw(rules.gsam_rho_schedule, learning_rate=SCHEDULE, **others)(name), run_schedule))
    out.append(
        Arg("learning_rate", kw(rules.gsam_rho_schedule, **defaults)("learning_rate"), run_schedule, schedule_ok=True)
    )
    return out


def averaging_args():
    inner = rules.sam(SGD)
    out = [
        Arg("start_step", lambda v: averaging.swa(inner, v), run_rule, kind="int"),
        Arg("period", lambda v: averaging.swa(inner, 0, v), run_rule, kind="int"),
        Arg("decay", lambda v: averaging.weight_ema(inner, v), run_rule),
        Arg("decay", lambda v: averaging.weight_ema(inner, v, debias=True), run_rule),
        Arg("sync_period", lambda v: averaging.lookahead(inner, v), run_rule, kind="int"),
        Arg("slow_step_size", lambda v: averaging.lookahead(inner, 1, v, momentum="pullback"), run_rule),
        Arg("alpha1", lambda v: averaging.swa_cyclic_schedule(v, 0.01, 5), run_schedule),
        Arg("alpha2", lambda v: averaging.swa_cyclic_schedule(0.1, v, 5), run_schedule),
        Arg("cycle_length", lambda v: averaging.swa_cyclic_schedule(0.1, 0.01, v), run_schedule, kind="int"),
        Arg("lr_init", lambda v: averaging.swa_official_schedule(v, 0.05, 10), run_schedule),
        Arg("swa_lr", lambda v: averaging.swa_official_schedule(0.1, v, 10), run_schedule),
        Arg("swa_start", lambda v: averaging.swa_official_schedule(0.1, 0.05, v), run_schedule, kind="int"),
        Arg("steps_per_epoch", lambda v: averaging.swa_official_schedule(0.1, 0.05, 10, v), run_schedule, kind="int"),
        Arg("learning_rate", lambda v: averaging.grafting_learning_rates(v, 3), lambda r: (r, None)),
        Arg(
            "num_networks",
            lambda v: averaging.grafting_learning_rates(0.1, v),
            lambda r: (r, None),
            kind="int",
            build_max=1000,
        ),
        Arg("a", lambda v: averaging.grafting_coefficient(0.5, 0.4, a=v), lambda r: (r, None)),
        Arg("c", lambda v: averaging.grafting_coefficient(0.5, 0.4, c=v), lambda r: (r, None)),
        Arg(
            "round_decimals",
            lambda v: averaging.grafting_coefficient(0.5, 0.4, round_decimals=v),
            lambda r: (r, None),
            kind="int",
            none_ok=True,
        ),
        Arg(
            "num_bins",
            lambda v: averaging.weight_entropy(jnp.arange(6.0), v),
            lambda r: (r, None),
            kind="int",
            build_max=1000,
        ),
    ]
    for name, _default in [("every", 1), ("a", 0.4), ("c", 500.0), ("num_bins", 10)]:

        def build(v, name=name):
            return averaging.filter_grafting(SGD, **{"every": 1, name: v})

        out.append(
            Arg(name, build, run_grafting, kind="int" if name in ("every", "num_bins") else "real", run_max=1000)
        )
    return out


STACKED = jax.tree.map(lambda p: jnp.stack([p, 0.5 * p + 0.1]), PARAMS)


def run_grafting(tx):
    g = jax.tree.map(lambda p: 0.1 * p + 0.05, STACKED)
    u, _ = tx.update(g, tx.init(STACKED), STACKED)
    return u, STACKED


def decay_args():
    out = []
    adamw = kw(decay.adamw, weight_decay=1e-2)
    for name in ("learning_rate", "b1", "b2", "eps", "eps_root"):
        out.append(Arg(name, adamw(name), run_transform))
    out.append(Arg("weight_decay", kw(decay.adamw, learning_rate=0.1)("weight_decay"), run_transform, schedule_ok=True))
    out.append(Arg("schedule_multiplier", adamw("schedule_multiplier"), run_transform, schedule_ok=True))
    sgdw = kw(decay.sgdw, learning_rate=0.1, weight_decay=1e-2)
    out += [
        Arg("learning_rate", kw(decay.sgdw, weight_decay=1e-2)("learning_rate"), run_transform),
        Arg("momentum", sgdw("momentum"), run_transform),
        Arg("schedule_multiplier", sgdw("schedule_multiplier"), run_transform, schedule_ok=True),
        Arg("weight_decay", kw(decay.sgdw, learning_rate=0.1)("weight_decay"), run_transform, schedule_ok=True),
        Arg("weight_decay", kw(decay.decoupled_weight_decay)("weight_decay"), run_transform, schedule_ok=True),
        Arg(
            "schedule_multiplier",
            kw(decay.decoupled_weight_decay, weight_decay=0.1)("schedule_multiplier"),
            run_transform,
            schedule_ok=True,
        ),
        Arg("min_ndim", lambda v: decay.weight_decay_mask(PARAMS, v), lambda r: ({}, None), kind="int"),
    ]
    cwr = {"period": 10.0, "t_mult": 2.0, "eta_min": 0.1, "eta_max": 1.0}
    for name in cwr:
        others = {k: v for k, v in cwr.items() if k != name}
        out.append(Arg(name, kw(decay.cosine_warm_restarts, **others)(name), run_schedule))
    nwd = {"lambda_norm": 0.05, "batch_size": 128, "dataset_size": 50000, "epochs": 200.0}
    for name in nwd:
        others = {k: v for k, v in nwd.items() if k != name}
        out.append(
            Arg(
                name,
                kw(decay.normalized_weight_decay, **others)(name),
                lambda r: (r, None),
                kind="bigint" if name.endswith("size") else "real",
                int_arrays=False,
            )
        )
    nwdr = {"lambda_norm": 0.05, "period": 10.0, "t_mult": 2.0}
    for name in nwdr:
        others = {k: v for k, v in nwdr.items() if k != name}
        out.append(Arg(name, kw(decay.normalized_weight_decay_restarts, **others)(name), run_schedule))
    return out


def run_selection(sel):
    clean = jnp.linspace(0.0, 1.0, 8)
    idx = sel.select(clean, clean + jnp.arange(8.0) * 0.1)
    assert 1 <= idx.shape[0] <= 8
    return jnp.asarray(sel.fraction), None


def run_axis(axis):
    return jnp.zeros(()), None


def data_args():
    return [
        Arg("gamma", data.sharpness_sensitive, run_selection),
        Arg("m", lambda v: data.shards(v), run_axis, kind="int", none_ok=True, int_arrays=False),
        Arg(
            "microbatch_size",
            lambda v: data.shards(microbatch_size=v),
            run_axis,
            kind="int",
            none_ok=True,
            int_arrays=False,
        ),
    ]


GEOMETRY, RULES, AVERAGING, DECAY, DATA = geometry_args(), rule_args(), averaging_args(), decay_args(), data_args()


def _ids(args):
    return st.sampled_from(args)


@pytest.mark.slow
@SETTINGS
@given(arg=_ids(GEOMETRY), value=VALUES)
def test_geometries(arg, value):
    check(arg, value)


@settings(SETTINGS, max_examples=15)
@given(
    arg=_ids(GEOMETRY),
    value=st.sampled_from([0.05, 1e-30, 1e30, 0.0, 2.0, 3.0, np.float32(0.5)]),
    tree=st.sampled_from(["empty", "zero_size_leaf"]),
)
def test_geometries_on_empty_and_zero_size_trees(arg, value, tree):
    check(arg, value, tree)


@pytest.mark.slow
@SETTINGS
@given(arg=_ids(RULES), value=VALUES)
def test_rules(arg, value):
    check(arg, value)


@settings(SETTINGS, max_examples=15)
@given(
    arg=_ids([a for a in RULES if a.run is run_rule]),
    value=st.sampled_from([0.5, 1e-30, 1e30, 0.0, 1, 3, None, np.float32(0.9)]),
    tree=st.sampled_from(["empty", "zero_size_leaf"]),
)
def test_rules_on_empty_and_zero_size_trees(arg, value, tree):
    check(arg, value, tree)


@SETTINGS
@given(arg=_ids(AVERAGING), value=VALUES)
def test_averaging(arg, value):
    check(arg, value)


@SETTINGS
@given(arg=_ids(DECAY), value=VALUES)
def test_decay_and_schedules(arg, value):
    check(arg, value)


@SETTINGS
@given(arg=_ids(DATA), value=VALUES)
def test_data(arg, value):
    check(arg, value)


OBJECTS = [None, "sgd", 0.1, [SGD], optax.sgd, lambda g: g, object(), {"init": 1, "update": 2}]
OBJECT_ARGS = [
    ("base", lambda v: rules.sam(v)),
    ("base", lambda v: rules.wsam(v, 0.9, learning_rate=0.1)),
    ("base", lambda v: rules.gsam(v)),
    ("base", lambda v: rules.looksam(v)),
    ("pre", lambda v: rules.apply_to_both(v, rules.sam(SGD))),
    ("rule", lambda v: rules.apply_to_both(optax.identity(), v)),
    ("rule", lambda v: rules.accumulate(v, 2)),
    ("rule", lambda v: rules.skip_nonfinite(v, 2)),
    ("inner", lambda v: averaging.swa(v, 1)),
    ("inner", lambda v: averaging.weight_ema(v)),
    ("inner", lambda v: averaging.lookahead(v)),
    ("inner", lambda v: averaging.filter_grafting(v, 1)),
    ("geometry", lambda v: geometry.stochastic(v)),
    ("geometry", lambda v: geometry.only(v, {"w": True})),
]


@SETTINGS
@given(spec=st.sampled_from(OBJECT_ARGS), value=st.sampled_from(OBJECTS))
def test_optimizer_and_geometry_arguments(spec, value):
    name, build = spec
    with pytest.raises(ValueError, match=name):
        build(value)
