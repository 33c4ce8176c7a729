"""Argument validation of the public constructors (issue 11, items 1, 2 and 9).

Bad input gives a ``ValueError`` naming the argument, at construction; traced
values (``jit``, ``optax.inject_hyperparams``) keep working unchecked.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import averaging, data, decay, geometry, rules

PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "s": jnp.asarray(0.3)}
GRADS = {"w": jnp.array([0.1, 0.2, -0.3]), "s": jnp.asarray(-0.2)}
PGRADS = {"w": jnp.array([0.15, 0.1, -0.35]), "s": jnp.asarray(-0.1)}
SGD = optax.sgd(0.1)


def finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def rule_step(tx, perturbed=PGRADS, params=PARAMS):
    return tx.update(GRADS, tx.init(params), params, perturbed_grads=perturbed)[0]


def geometry_step(geo, params=PARAMS):
    return geo.update(GRADS, geo.init(params), params)[0]


# ---- item 1: wrong types --------------------------------------------------------------


def test_string_rho_is_rejected_at_construction():
    with pytest.raises(ValueError, match="rho must be a real number"):
        geometry.l2(rho="0.05")


def test_wsam_gamma_none_is_a_value_error():
    with pytest.raises(ValueError, match="gamma"):
        rules.wsam(SGD, None, learning_rate=0.1)


def test_weight_ema_string_decay_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        averaging.weight_ema(SGD, "0.99")


@pytest.mark.parametrize("rho", [[0.05], (0.05,), np.array([0.05]), jnp.ones((1,)) * 0.05, jnp.ones((2, 2))])
def test_non_scalar_rho_is_rejected(rho):
    # before: a scalar param became shape (1,) after one step
    with pytest.raises(ValueError, match="rho"):
        geometry.l2(rho=rho)


@pytest.mark.parametrize("rho", [0.05 + 1j, 0.05 + 0j, np.complex64(0.05), jnp.asarray(0.05 + 0.1j)])
def test_complex_rho_is_rejected(rho):
    with pytest.raises(ValueError, match="rho must be a real number"):
        geometry.l2(rho=rho)


WRONG_TYPES = [
    "0.1",
    None,
    [0.1],
    (0.1,),
    {"a": 0.1},
    0.1 + 1j,
    True,
    np.bool_(False),
    np.array([0.1, 0.2]),
    np.str_("0.1"),
    object(),
]

REAL_ARGS = [
    (geometry.l2, {}, "rho"),
    (geometry.l2, {}, "eps"),
    (geometry.pnorm, {}, "p"),
    (geometry.adaptive, {}, "eta"),
    (geometry.fisher, {}, "eta"),
    (lambda **kw: geometry.stochastic(geometry.l2(), **kw), {}, "beta"),
    (lambda **kw: rules.sam(SGD, **kw), {}, "max_norm"),
    (lambda **kw: rules.wsam(SGD, **kw), {"learning_rate": 0.1}, "gamma"),
    (lambda **kw: rules.gsam(SGD, **kw), {}, "alpha"),
    (lambda **kw: rules.looksam(SGD, **kw), {}, "alpha"),
    (lambda **kw: averaging.weight_ema(SGD, **kw), {}, "decay"),
    (lambda **kw: averaging.lookahead(SGD, **kw), {}, "slow_step_size"),
    (lambda **kw: averaging.filter_grafting(SGD, 1, **kw), {}, "c"),
    (decay.adamw, {"weight_decay": 0.1}, "learning_rate"),
    (decay.sgdw, {"learning_rate": 0.1, "weight_decay": 0.1}, "momentum"),
    (decay.decoupled_weight_decay, {}, "weight_decay"),
    (decay.cosine_warm_restarts, {}, "period"),
    (data.sharpness_sensitive, {}, "gamma"),
]


@pytest.mark.parametrize("value", WRONG_TYPES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("factory,kwargs,arg", REAL_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_wrong_types_name_the_argument(factory, kwargs, arg, value):
    if value is None and arg == "max_norm":
        factory(**kwargs, **{arg: value})  # None is allowed: no clipping
        return
    with pytest.raises(ValueError, match=arg):
        factory(**kwargs, **{arg: value})


def test_base_optimizers_and_geometries_must_be_transformations():
    for make, arg in [
        (lambda: rules.sam(None), "base"),
        (lambda: rules.wsam("sgd", 0.9, learning_rate=0.1), "base"),
        (lambda: rules.gsam(optax.sgd), "base"),  # the factory, not an optimizer
        (lambda: rules.accumulate(0.1, 2), "rule"),
        (lambda: rules.apply_to_both(None, rules.sam(SGD)), "pre"),
        (lambda: rules.skip_nonfinite("sam", 2), "rule"),
        (lambda: averaging.swa(None, 1), "inner"),
        (lambda: averaging.weight_ema(1.0), "inner"),
        (lambda: averaging.lookahead(None), "inner"),
        (lambda: averaging.filter_grafting(None, 1), "inner"),
        (lambda: geometry.stochastic(0.05), "geometry"),
    ]:
        with pytest.raises(ValueError, match=arg):
            make()


def test_concrete_scalar_arrays_are_checked_like_numbers():
    for value in [
        np.float32(0.1),
        np.float64(0.1),
        jnp.asarray(0.1),
        np.asarray(0.1),
        jnp.asarray(1, jnp.int32),
        jnp.asarray(0.1, jnp.bfloat16),
    ]:
        eps = geometry_step(geometry.l2(rho=value))
        assert finite(eps) and jnp.shape(eps["s"]) == ()
    for value in [jnp.asarray(-0.1), np.float32(np.nan), jnp.asarray(jnp.inf), np.asarray([0.1])]:
        with pytest.raises(ValueError, match="rho"):
            geometry.l2(rho=value)


def test_traced_values_keep_working_inside_jit():
    @jax.jit
    def perturb(rho, p, seed, k, start_step, decay_):
        eps = geometry_step(geometry.pnorm(rho, p=p))
        eps2 = geometry_step(geometry.stochastic(geometry.l2(rho), seed=seed))
        u = rule_step(rules.looksam(SGD, k=k))
        u2 = rule_step(averaging.swa(SGD, start_step=start_step))
        u3 = rule_step(averaging.weight_ema(rules.sam(SGD), decay_))
        return eps, eps2, u, u2, u3

    out = perturb(0.05, 3.0, 1, 2, 3, 0.9)
    assert finite(out)
    want = geometry_step(geometry.pnorm(0.05, p=3.0))
    np.testing.assert_allclose(out[0]["w"], want["w"], rtol=1e-5)


def test_inject_hyperparams_still_works_inside_and_outside_jit():
    tx = optax.inject_hyperparams(rules.wsam)(SGD, gamma=0.9, learning_rate=0.1)
    state = tx.init(PARAMS)
    u, state = jax.jit(lambda s: tx.update(GRADS, s, PARAMS, perturbed_grads=PGRADS))(state)
    u2, _ = tx.update(GRADS, state, PARAMS, perturbed_grads=PGRADS)  # concrete arrays
    assert finite(u) and finite(u2)
    geo = optax.inject_hyperparams(geometry.l2)(rho=0.05)
    eps, _ = jax.jit(geo.update)(GRADS, geo.init(PARAMS), PARAMS)
    assert finite(eps)


def test_traced_non_scalar_or_complex_values_are_rejected_at_trace_time():
    with pytest.raises(ValueError, match="rho must be a scalar"):
        jax.jit(lambda r: geometry_step(geometry.l2(r)))(jnp.ones(2))
    with pytest.raises(ValueError, match="rho"):
        jax.jit(lambda r: geometry_step(geometry.l2(r)))(jnp.asarray(0.1 + 0.1j))
    with pytest.raises(ValueError, match="k"):
        jax.jit(lambda k: rule_step(rules.looksam(SGD, k=k)))(2.0)


# ---- item 2: inf (and values beyond float32) --------------------------------------------

LR_SCHED = optax.constant_schedule(0.1)
INF_ARGS = [
    (geometry.l2, {}, "rho"),
    (geometry.pnorm, {}, "rho"),
    (geometry.adaptive, {}, "rho"),
    (geometry.adaptive, {}, "eta"),
    (geometry.fisher, {}, "eta"),
    (geometry.fisher, {}, "eps"),
    (lambda **kw: geometry.grouped_l2({"w": "a", "s": "a"}, {"a": kw["rho"]}), {}, "rho"),
    (lambda **kw: rules.wsam(SGD, 0.9, **kw), {}, "learning_rate"),
    (lambda **kw: rules.gsam(SGD, **kw), {}, "alpha"),
    (lambda **kw: rules.looksam(SGD, **kw), {}, "alpha"),
    (lambda **kw: rules.sam(SGD, **kw), {}, "max_norm"),
    (lambda **kw: rules.gsam_rho_schedule(**kw), {"rho_max": 0.1, "rho_min": 0.05}, "learning_rate"),
    (decay.adamw, {"weight_decay": 0.1}, "learning_rate"),
    (decay.adamw, {"learning_rate": 0.1}, "weight_decay"),
    (decay.adamw, {"weight_decay": 0.1}, "schedule_multiplier"),
    (decay.sgdw, {"weight_decay": 0.1}, "learning_rate"),
    (decay.sgdw, {"learning_rate": 0.1, "schedule_multiplier": 1.0}, "weight_decay"),
    (decay.decoupled_weight_decay, {"weight_decay": 0.1}, "schedule_multiplier"),
    (decay.decoupled_weight_decay, {}, "weight_decay"),
    (decay.cosine_warm_restarts, {}, "period"),
    (decay.cosine_warm_restarts, {"period": 10}, "t_mult"),
    (decay.cosine_warm_restarts, {"period": 10}, "eta_max"),
    (decay.normalized_weight_decay_restarts, {"lambda_norm": 0.05}, "period"),
    (lambda **kw: averaging.swa_official_schedule(swa_lr=0.05, swa_start=10, **kw), {}, "lr_init"),
    (lambda **kw: averaging.swa_cyclic_schedule(0.1, cycle_length=5, **kw), {}, "alpha2"),
    (lambda **kw: averaging.grafting_learning_rates(num_networks=2, **kw), {}, "learning_rate"),
    (lambda **kw: averaging.filter_grafting(SGD, 1, **kw), {}, "c"),
]


@pytest.mark.parametrize(
    "value",
    [math.inf, -math.inf, np.float32(np.inf), jnp.asarray(jnp.inf), 1e39, 1e300, 10**400],
    ids=["inf", "-inf", "np_inf", "jnp_inf", "1e39", "1e300", "10**400"],
)
@pytest.mark.parametrize("factory,kwargs,arg", INF_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_inf_and_beyond_float32_are_rejected_by_name(factory, kwargs, arg, value):
    with pytest.raises(ValueError, match=arg):
        factory(**kwargs, **{arg: value})


def test_p_may_still_be_inf():
    eps = geometry_step(geometry.pnorm(0.5, p=math.inf))
    np.testing.assert_allclose(eps["w"], [0.5, 0.5, -0.5])
    assert finite(geometry_step(geometry.adaptive(0.5, p=np.float64(np.inf))))
    with pytest.raises(ValueError, match="p"):
        geometry.pnorm(0.5, p=math.nan)


def test_positive_values_that_round_to_zero_in_float32_are_rejected():
    # 1e-45 / 5e-324 become 0 in float32: a division by them gives inf or NaN
    for make, arg in [
        (lambda v: geometry.stochastic(geometry.l2(), beta=v), "beta"),
        (lambda v: decay.cosine_warm_restarts(v), "period"),
        (lambda v: averaging.swa_official_schedule(v, 0.05, 10), "lr_init"),
    ]:
        for v in (1e-45, 5e-324):
            with pytest.raises(ValueError, match=arg):
                make(v)
        make(1e-30)  # small but a normal float32: accepted


def test_ascent_step_size_inf_is_rejected():
    with pytest.raises(ValueError, match="ascent_step_size"):
        sam_optax.sharpness_aware_grad(
            lambda p, b: jnp.sum(p["w"] ** 2), geometry.l2(), ascent_steps=2, ascent_step_size=math.inf
        )


def test_ascent_step_size_above_one_is_rejected():
    # 1e30 silently turned SAM into SGD; a step larger than the radius is always projected back
    with pytest.raises(ValueError, match="ascent_step_size"):
        sam_optax.sharpness_aware_grad(
            lambda p, b: jnp.sum(p["w"] ** 2), geometry.l2(), ascent_steps=2, ascent_step_size=1e30
        )


# ---- item 9 -------------------------------------------------------------------------------

RULES = {
    "sam": lambda: rules.sam(SGD),
    "wsam": lambda: rules.wsam(SGD, 0.9, learning_rate=0.1),
    "wsam_coupled": lambda: rules.wsam(SGD, 0.9, decouple=False),
    "gsam": lambda: rules.gsam(SGD),
    "looksam": lambda: rules.looksam(SGD, k=2),
    "apply_to_both": lambda: rules.apply_to_both(optax.clip_by_global_norm(1.0), rules.sam(SGD)),
    "accumulate": lambda: rules.accumulate(rules.sam(SGD), 2),
    "skip_nonfinite": lambda: rules.skip_nonfinite(rules.sam(SGD), 2),
}
BAD_PERTURBED = {
    "shape": {"w": jnp.ones(1), "s": jnp.asarray(0.1)},
    "scalar_as_vector": {"w": jnp.ones(3), "s": jnp.ones(1)},
    "missing_key": {"w": jnp.ones(3)},
    "extra_key": {"w": jnp.ones(3), "s": jnp.asarray(0.1), "t": jnp.ones(2)},
    "deeper": {"w": {"a": jnp.ones(3)}, "s": jnp.asarray(0.1)},
    "list": [jnp.ones(3), jnp.asarray(0.1)],
}


@pytest.mark.parametrize("bad", sorted(BAD_PERTURBED))
@pytest.mark.parametrize("name", sorted(RULES))
def test_mismatched_perturbed_grads_are_rejected(name, bad):
    tx = RULES[name]()
    with pytest.raises(ValueError, match="perturbed_grads"):
        rule_step(tx, BAD_PERTURBED[bad])


def test_mismatched_perturbed_grads_are_rejected_at_trace_time():
    tx = rules.sam(SGD)
    state = tx.init(PARAMS)
    step = jax.jit(lambda s, gp: tx.update(GRADS, s, PARAMS, perturbed_grads=gp))
    with pytest.raises(ValueError, match="perturbed_grads"):
        step(state, BAD_PERTURBED["shape"])
    assert finite(step(state, PGRADS)[0])


def test_masked_rule_still_takes_the_full_perturbed_grads():
    tx = optax.masked(rules.sam(SGD), {"w": True, "s": False})
    u = rule_step(tx)
    np.testing.assert_allclose(u["w"], -0.1 * PGRADS["w"], rtol=1e-6)


def test_gsam_rho_schedule_blames_the_infinite_argument():
    lr = optax.cosine_decay_schedule(0.1, 100)
    for kwargs, arg in [
        (dict(rho_max=0.05, rho_min=math.inf), "rho_min"),
        (dict(rho_max=math.inf, rho_min=0.01), "rho_max"),
        (dict(rho_max=0.05, rho_min=0.01, lr_min=math.inf), "lr_min"),
        (dict(rho_max=0.05, rho_min=0.01, lr_max=math.inf), "lr_max"),
    ]:
        kwargs = {"lr_max": 0.1, "lr_min": 0.0, **kwargs}
        with pytest.raises(ValueError, match=f"^{arg} "):
            rules.gsam_rho_schedule(lr, **kwargs)


BIG = 2**31
INT_ARGS = [
    (lambda v: rules.looksam(SGD, k=v), "k"),
    (lambda v: averaging.swa(SGD, start_step=v), "start_step"),
    (lambda v: averaging.swa(SGD, 0, period=v), "period"),
    (lambda v: averaging.lookahead(SGD, sync_period=v), "sync_period"),
    (lambda v: rules.accumulate(rules.sam(SGD), v), "every_k"),
    (lambda v: rules.skip_nonfinite(rules.sam(SGD), v), "max_consecutive_errors"),
    (lambda v: averaging.filter_grafting(SGD, v), "every"),
    (lambda v: averaging.swa_cyclic_schedule(0.1, 0.01, v), "cycle_length"),
    (lambda v: averaging.swa_official_schedule(0.1, 0.05, v), "swa_start"),
    (lambda v: averaging.swa_official_schedule(0.1, 0.05, 10, v), "steps_per_epoch"),
    (lambda v: geometry.stochastic(geometry.l2(), seed=v), "seed"),
    (lambda v: data.shards(v), "m"),
    (lambda v: data.shards(microbatch_size=v), "microbatch_size"),
]


@pytest.mark.parametrize(
    "value",
    [BIG, 2**63, np.int64(BIG), np.uint64(2**63), 10**12],
    ids=["2**31", "2**63", "np_2**31", "np_u2**63", "10**12"],
)
@pytest.mark.parametrize("make,arg", INT_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_integers_beyond_int32_are_rejected(make, arg, value):
    with pytest.raises(ValueError, match=arg):
        make(value)


def test_int32_max_still_works_at_the_first_update():
    for tx in [
        rules.looksam(SGD, k=BIG - 1),
        averaging.swa(SGD, start_step=BIG - 1),
        averaging.lookahead(SGD, sync_period=BIG - 1),
        rules.accumulate(rules.sam(SGD), BIG - 1),
        rules.skip_nonfinite(rules.sam(SGD), BIG - 1),
    ]:
        assert finite(rule_step(tx))


@pytest.mark.parametrize("seed", [np.int64(1), np.int32(1), np.uint8(1), np.asarray(1), jnp.asarray(1), 1, -5])
def test_numpy_integer_seeds_are_accepted(seed):
    geo = geometry.stochastic(geometry.l2(), seed=seed)
    want = geometry.stochastic(geometry.l2(), seed=int(seed))
    np.testing.assert_array_equal(geo.init(PARAMS).key, want.init(PARAMS).key)


@pytest.mark.parametrize("make,arg", INT_ARGS, ids=lambda x: x if isinstance(x, str) else "")
def test_numpy_ints_accepted_bools_and_floats_rejected(make, arg):
    make(np.int64(3))
    make(np.int32(3))
    for bad in [
        True,
        np.bool_(True),
        3.0,
        np.float64(3.0),
        "3",
        [3],
        None if arg not in ("m", "microbatch_size") else "x",
    ]:
        with pytest.raises(ValueError, match=arg):
            make(bad)


def test_other_argument_kinds_are_checked_by_name():
    for make, arg in [
        (lambda: averaging.swa(SGD, 1, accumulator_dtype="floaty"), "accumulator_dtype"),
        (lambda: averaging.weight_ema(SGD, accumulator_dtype=jnp.int32), "accumulator_dtype"),
        (lambda: decay.sgdw(0.1, weight_decay=0.1, accumulator_dtype="nope"), "accumulator_dtype"),
        (lambda: decay.adamw(weight_decay=0.1, mu_dtype=3), "mu_dtype"),
        (lambda: averaging.lookahead(SGD, momentum_fields="trace"), "momentum_fields"),
        (lambda: averaging.lookahead(SGD, momentum=None), "momentum"),
        (lambda: averaging.filter_grafting(SGD, 1, exclusive_max="yes"), "exclusive_max"),
        (lambda: averaging.filter_grafting(SGD, 1, round_decimals=2**31 - 1), "round_decimals"),
        (lambda: averaging.graft(PARAMS, round_decimals=-1), "round_decimals"),
        (lambda: decay.weight_decay_mask(PARAMS, min_ndim=1.5), "min_ndim"),
        (lambda: rules.gsam_rho_schedule("0.1", 0.05, 0.02), "learning_rate"),
        (lambda: rules.gsam_rho_schedule(0.1, 0.01, 0.5), "rho_min"),  # rho_max < rho_min names both
    ]:
        with pytest.raises(ValueError, match=arg):
            make()
    averaging.swa(SGD, 1, accumulator_dtype=jnp.bfloat16)
    decay.adamw(weight_decay=0.1, mu_dtype="float32")
