"""Ascent geometries: each equals its formula written out by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import assert_trees_close, loss_fn, make_batch, make_params, tmap, tree_norm
from sam_optax import geometry

PARAMS = make_params()
GRADS = jax.grad(loss_fn)(PARAMS, make_batch())
ALL_GEOMETRIES = {
    "l2": lambda rho: geometry.l2(rho),
    "p3": lambda rho: geometry.pnorm(rho, p=3),
    "p1.5": lambda rho: geometry.pnorm(rho, p=1.5),
    "pinf": lambda rho: geometry.pnorm(rho, p=math.inf),
    "p1": lambda rho: geometry.pnorm(rho, p=1),
    "adaptive": lambda rho: geometry.adaptive(rho, eta=0.01),
    "adaptive_pinf": lambda rho: geometry.adaptive(rho, eta=0.1, p=math.inf),
    "fisher": lambda rho: geometry.fisher(rho, eta=1.0),
}


def perturb(geo, grads=GRADS, params=PARAMS):
    eps, _ = geo.update(grads, geo.init(params), params)
    return eps


def test_l2_formula():
    rho = 0.07
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(GRADS)))
    assert_trees_close(perturb(geometry.l2(rho)), tmap(lambda g: rho * g / (norm + 1e-12), GRADS))


def test_pnorm_formula_p3():
    rho, p = 0.2, 3.0
    q = p / (p - 1)
    dual = sum(jnp.sum(jnp.abs(g) ** q) for g in jax.tree.leaves(GRADS))
    expected = tmap(lambda g: rho * jnp.sign(g) * jnp.abs(g) ** (q - 1) / dual ** (1 / p), GRADS)
    assert_trees_close(perturb(geometry.pnorm(rho, p=p)), expected, rtol=1e-5)


def test_pnorm_inf_is_sign():
    assert_trees_close(perturb(geometry.pnorm(0.3, p=math.inf)), tmap(lambda g: 0.3 * jnp.sign(g), GRADS))


def test_pnorm_1_puts_all_mass_on_largest_entry():
    eps = perturb(geometry.pnorm(0.3, p=1))
    flat_g = jnp.concatenate([g.ravel() for g in jax.tree.leaves(GRADS)])
    flat_e = jnp.concatenate([e.ravel() for e in jax.tree.leaves(eps)])
    i = int(jnp.argmax(jnp.abs(flat_g)))
    expected = jnp.zeros_like(flat_g).at[i].set(0.3 * jnp.sign(flat_g[i]))
    np.testing.assert_allclose(flat_e, expected, atol=1e-7)


def test_pnorm_2_is_l2():
    assert_trees_close(perturb(geometry.pnorm(0.1, p=2)), perturb(geometry.l2(0.1)))


def test_adaptive_formula_p2_with_bias_mask():
    rho, eta = 0.5, 0.01
    mask = jax.tree_util.tree_map_with_path(lambda k, _: "bias" not in jax.tree_util.keystr(k), PARAMS)
    t = tmap(lambda w, mk: jnp.where(mk, jnp.abs(w) + eta, 1.0), PARAMS, mask)
    tg_norm = jnp.sqrt(sum(jnp.sum((ti * g) ** 2) for ti, g in zip(jax.tree.leaves(t), jax.tree.leaves(GRADS))))
    expected = tmap(lambda ti, g: rho * ti * ti * g / (tg_norm + 1e-12), t, GRADS)
    assert_trees_close(perturb(geometry.adaptive(rho, eta, mask=mask)), expected)

    # the same mask given as a function of the params
    def fn_mask(p):
        return jax.tree_util.tree_map_with_path(lambda k, _: "bias" not in jax.tree_util.keystr(k), p)

    assert_trees_close(perturb(geometry.adaptive(rho, eta, mask=fn_mask)), expected)


def test_adaptive_pinf_formula():
    rho, eta = 0.2, 0.1
    expected = tmap(lambda w, g: rho * (jnp.abs(w) + eta) * jnp.sign(g), PARAMS, GRADS)
    assert_trees_close(perturb(geometry.adaptive(rho, eta, p=math.inf)), expected)


def test_adaptive_eta_only_is_scaled_sam():
    zeros = tmap(jnp.zeros_like, PARAMS)
    rho, eta = 0.3, 0.25
    assert_trees_close(perturb(geometry.adaptive(rho, eta), params=zeros), perturb(geometry.l2(rho * eta)))


def test_fisher_formula():
    rho, eta = 0.1, 2.0
    fg = tmap(lambda g: g / (1 + eta * g * g), GRADS)
    denom = jnp.sqrt(sum(jnp.sum(g * f) for g, f in zip(jax.tree.leaves(GRADS), jax.tree.leaves(fg))))
    assert_trees_close(perturb(geometry.fisher(rho, eta)), tmap(lambda f: rho * f / (denom + 1e-12), fg))


def test_fisher_eta0_is_sam():
    assert_trees_close(perturb(geometry.fisher(0.1, eta=0.0)), perturb(geometry.l2(0.1)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALL_GEOMETRIES))
def test_zero_gradient_gives_zero_perturbation(name):
    geo = ALL_GEOMETRIES[name](0.1)
    zeros = tmap(jnp.zeros_like, GRADS)
    eps = jax.jit(lambda g: perturb(geo, g))(zeros)
    for e in jax.tree.leaves(eps):
        assert np.all(np.isfinite(e)) and np.all(e == 0)
    tiny = tmap(lambda g: jnp.full_like(g, 1e-30), GRADS)
    for e in jax.tree.leaves(jax.jit(lambda g: perturb(geo, g))(tiny)):
        assert np.all(np.isfinite(e))


@pytest.mark.parametrize("name", sorted(ALL_GEOMETRIES))
def test_norm_equals_rho(name):
    geo = ALL_GEOMETRIES[name](0.123)
    eps = perturb(geo)
    np.testing.assert_allclose(geo.norm(eps, GRADS, PARAMS), 0.123, rtol=1e-5)


def test_rho_schedule_uses_the_step_count():
    sched = optax.linear_schedule(0.1, 0.3, transition_steps=2)
    geo = geometry.l2(sched)
    state = geo.init(PARAMS)
    for step, rho in enumerate([0.1, 0.2, 0.3, 0.3]):
        eps, state = geo.update(GRADS, state, PARAMS)
        np.testing.assert_allclose(tree_norm(eps), rho, rtol=1e-6)
        assert int(state.count) == step + 1


def test_inject_hyperparams_changes_rho():
    geo = optax.inject_hyperparams(geometry.l2)(rho=0.1)
    state = geo.init(PARAMS)
    eps, state = jax.jit(geo.update)(GRADS, state, PARAMS)
    np.testing.assert_allclose(tree_norm(eps), 0.1, rtol=1e-6)
    state.hyperparams["rho"] = jnp.asarray(0.4)
    eps, state = jax.jit(geo.update)(GRADS, state, PARAMS)
    np.testing.assert_allclose(tree_norm(eps), 0.4, rtol=1e-6)


def test_bf16_grads_give_float32_perturbation():
    params = make_params(dtype=jnp.bfloat16)
    grads = tmap(lambda g: g.astype(jnp.bfloat16), GRADS)
    eps = perturb(geometry.adaptive(0.5), grads, params)
    for e in jax.tree.leaves(eps):
        assert e.dtype == jnp.float32
    np.testing.assert_allclose(
        tree_norm(tmap(lambda e, w: e / (jnp.abs(w.astype(jnp.float32)) + 0.01), eps, params)), 0.5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: geometry.l2(rho=-0.1), "rho"),
        (lambda: geometry.l2(0.1, eps=-1.0), "eps"),
        (lambda: geometry.pnorm(0.1, p=0.5), "p"),
        (lambda: geometry.pnorm(0.1, p="two"), "p"),
        (lambda: geometry.adaptive(0.5, eta=-0.01), "eta"),
        (lambda: geometry.adaptive(-1.0), "rho"),
        (lambda: geometry.fisher(0.1, eta=-1.0), "eta"),
        (lambda: geometry.fisher(float("nan")), "rho"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


# ---- property tests over random shapes -------------------------------------------------

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


def random_tree(shape_list, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(shape_list))
    g = {f"l{i}": jax.random.normal(keys[2 * i], tuple(s)) for i, s in enumerate(shape_list)}
    w = {f"l{i}": jax.random.normal(keys[2 * i + 1], tuple(s)) for i, s in enumerate(shape_list)}
    return g, w


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(0.01, 2.0), st.sampled_from(sorted(ALL_GEOMETRIES)))
def test_property_norm_is_rho(shape_list, seed, rho, name):
    g, w = random_tree(shape_list, seed)
    geo = ALL_GEOMETRIES[name](rho)
    eps, _ = geo.update(g, geo.init(w), w)
    np.testing.assert_allclose(geo.norm(eps, g, w), rho, rtol=2e-4)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(shapes, st.integers(0, 10_000), st.floats(0.01, 2.0), st.floats(0.01, 3.0))
def test_property_identities(shape_list, seed, rho, eta):
    g, w = random_tree(shape_list, seed)
    l2 = geometry.l2(rho).update(g, optax.EmptyState(), w)[0]
    assert_trees_close(geometry.fisher(rho, eta=0.0).update(g, optax.EmptyState(), w)[0], l2, rtol=1e-5, atol=1e-7)
    assert_trees_close(geometry.pnorm(rho, p=2).update(g, optax.EmptyState(), w)[0], l2, rtol=1e-5, atol=1e-7)
    zeros = tmap(jnp.zeros_like, w)
    ada = geometry.adaptive(rho, eta=eta).update(g, optax.EmptyState(), zeros)[0]
    assert_trees_close(ada, geometry.l2(rho * eta).update(g, optax.EmptyState(), w)[0], rtol=1e-4, atol=1e-7)


# ---- optax.inject_hyperparams over every factory (numeric args, defaulted ints included) ----

INJECTABLE = {
    "adaptive": (geometry.adaptive, dict(rho=0.5), "rho", ("p",)),
    "adaptive_pinf": (geometry.adaptive, dict(rho=0.5, eta=0.1, p=math.inf), "rho", ("p",)),
    "pnorm": (geometry.pnorm, dict(rho=0.2), "rho", ("p",)),
    "pnorm_p3": (geometry.pnorm, dict(rho=0.2, p=3), "rho", ("p",)),
    "pnorm_p1": (geometry.pnorm, dict(rho=0.2, p=1), "rho", ("p",)),
    "pnorm_pinf": (geometry.pnorm, dict(rho=0.2, p=math.inf), "rho", ("p",)),
    "stochastic": (
        geometry.stochastic,
        dict(geometry=geometry.l2(0.1), beta=0.5, granularity="coordinate", seed=3),
        "beta",
        ("seed",),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_inject_hyperparams_matches_the_plain_factory(name, static):
    factory, kwargs, knob, static_args = INJECTABLE[name]
    injected = optax.inject_hyperparams(factory, static_args=static_args if static else ())(**kwargs)
    plain = factory(**kwargs)
    state, plain_state = jax.jit(injected.init)(PARAMS), plain.init(PARAMS)
    for _ in range(2):
        eps, state = jax.jit(injected.update)(GRADS, state, PARAMS)
        want, plain_state = jax.jit(plain.update)(GRADS, plain_state, PARAMS)
        assert_trees_close(eps, want, rtol=1e-5, atol=1e-7)
    # changing an injected float between steps: the next step is the plain factory's with the new value
    new = 0.5 * kwargs[knob]
    state.hyperparams[knob] = jnp.asarray(new)
    eps, _ = jax.jit(injected.update)(GRADS, state, PARAMS)
    want, _ = factory(**{**kwargs, knob: new}).update(GRADS, state.inner_state, PARAMS)
    assert_trees_close(eps, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
def test_inject_hyperparams_looksam_k_and_alpha(static):
    import sam_optax

    gp = jax.grad(loss_fn)(PARAMS, make_batch(seed=9))
    kwargs = dict(k=2, alpha=0.7)
    inject = optax.inject_hyperparams(sam_optax.looksam, static_args=("k",) if static else ())
    injected = inject(optax.sgd(0.1), **kwargs)
    plain = sam_optax.looksam(optax.sgd(0.1), **kwargs)
    state, plain_state = injected.init(PARAMS), plain.init(PARAMS)
    for _ in range(3):  # full, reuse, full
        u, state = jax.jit(injected.update)(GRADS, state, PARAMS, perturbed_grads=gp)
        want, plain_state = jax.jit(plain.update)(GRADS, plain_state, PARAMS, perturbed_grads=gp)
        assert_trees_close(u, want, rtol=1e-6, atol=1e-8)
    state.hyperparams["alpha"] = jnp.asarray(0.3)  # the next step reuses the direction
    u, _ = jax.jit(injected.update)(GRADS, state, PARAMS, perturbed_grads=gp)
    lower = sam_optax.looksam(optax.sgd(0.1), k=2, alpha=0.3)
    want, _ = lower.update(GRADS, state.inner_state, PARAMS, perturbed_grads=gp)
    assert_trees_close(u, want, rtol=1e-6, atol=1e-8)


def test_concrete_arrays_are_accepted_as_static_numbers():
    import sam_optax
    from sam_optax import _utils

    assert_trees_close(perturb(geometry.pnorm(0.2, p=jnp.asarray(3.0))), perturb(geometry.pnorm(0.2, p=3)))
    sam_optax.looksam(optax.sgd(0.1), k=jnp.asarray(3))
    geometry.stochastic(geometry.l2(0.1), seed=jnp.asarray(4))
    for make, arg in [
        (lambda: geometry.pnorm(0.2, p=jnp.asarray(0.5)), "p"),
        (lambda: sam_optax.looksam(optax.sgd(0.1), k=jnp.asarray(0)), "k"),
        (lambda: sam_optax.looksam(optax.sgd(0.1), k=jnp.asarray(2.0)), "k"),
        (lambda: geometry.stochastic(geometry.l2(0.1), seed=jnp.asarray(1.5)), "seed"),
        (lambda: geometry.stochastic(geometry.l2(0.1), seed="0"), "seed"),
    ]:
        with pytest.raises(ValueError, match=arg):
            make()
    with pytest.raises(ValueError, match=r"static_args=\('p',\)"):
        jax.jit(lambda p: _utils.static_number("p", p))(2.0)
