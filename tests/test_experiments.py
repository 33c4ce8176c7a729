"""The experiments' building blocks: datasets, label noise, the whole-step helper."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_batch, make_params, train
from sam_optax import experiments, geometry


def test_symmetric_label_noise_flips_the_stated_fraction_to_other_classes():
    y = np.arange(20000) % 10
    noisy = experiments.add_label_noise(y, 0.4, 10, seed=0)
    flipped = noisy != y
    assert abs(flipped.mean() - 0.4) < 0.015
    # flipped labels are uniform over the 9 other classes
    counts = np.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()
    assert np.array_equal(noisy, experiments.add_label_noise(y, 0.4, 10, seed=0))
    with pytest.raises(ValueError, match="label noise"):
        experiments.add_label_noise(y, 1.5, 10, seed=0)


def test_datasets_are_generated_locally_and_deterministically():
    a = experiments.load("mnist1d", seed=3, num_samples=500)
    b = experiments.load("mnist1d", seed=3, num_samples=500)
    assert a.x_train.shape == (400, 40) and a.x_test.shape == (100, 40)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    d = experiments.load("digits", seed=0, label_noise=0.2)
    assert d.x_train.shape[1] == 64 and (d.y_train != d.y_train_clean).mean() > 0.1
    with pytest.raises(ValueError, match="dataset"):
        experiments.load("cifar")


@pytest.mark.slow
def test_sharpness_aware_step_skips_looksam_reuse_steps_and_matches_the_explicit_loop():
    tx = sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3)
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(0.1))
    p, s = make_params(), init(make_params())
    step = jax.jit(step)
    for b in batches(5):
        p, s, out = step(p, s, b)
    # on reuse steps the helper reported perturbed_grads == grads (second pass skipped)
    assert_trees_close(out.perturbed_grads, out.grads, rtol=1e-6, atol=1e-8)
    want, _ = train(sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3), geometry.l2(0.1), make_params(), batches(5))
    assert_trees_close(p, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_sharpness_aware_step_literal_second_pass_chosen_on_the_host_equals_the_cond():
    tx = lambda: sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3)  # noqa: E731
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx(), geometry.l2(0.1))
    full = jax.jit(lambda p, s, b: step(p, s, b, second_pass=True))
    reuse = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))
    for f in (full, reuse):  # literal flags: no gradient pass under a conditional in either program
        text = f.lower(make_params(), init(make_params()), batches(1)[0]).compile().as_text()
        conds = [line.split("conditional(")[0] for line in text.splitlines() if " conditional(" in line]
        assert not any(re.search(r"f32\[\d", c) for c in conds)  # only scalar (norm) conditionals
    p, s = make_params(), init(make_params())
    for b in batches(5):
        p, s, out = (full if bool(sam_optax.looksam_full_step(s.opt_state)) else reuse)(p, s, b)
    want, _ = train(tx(), geometry.l2(0.1), make_params(), batches(5))
    assert_trees_close(p, want, rtol=1e-6, atol=1e-7)


# ---- the efficient methods' recipes (sam_optax/experiments/methods.py) in the harness's step ----

from helpers import forward, per_example_loss, tree_norm  # noqa: E402
from sam_optax.experiments import training  # noqa: E402
from sam_optax.experiments.methods import Hyper, Recipe, StepContext, build_method  # noqa: E402

CTX = StepContext(
    loss_fn,
    per_example_loss,
    lambda p, b: forward(p, b["x"]),
    lambda z, b: optax.softmax_cross_entropy_with_integer_labels(z, b["y"]).mean(),
    32 * 8,
    3,
)


def recipe_run(name, hp, n=6, seed=0, data=None):
    """``n`` steps of the harness's jitted step for ``name``: (params, state, get_opt_state, counts after each step)."""
    recipe = build_method(name, hp, steps_per_epoch=4, epochs=2, seed=seed)
    init, step, get = training._make_step(recipe, loss_fn, per_example_loss, CTX)
    p = make_params()
    s = init(p, jax.random.PRNGKey(7))
    step = training._jit_step(step, s, get, recipe.host_schedule)
    counts = []
    for i, b in enumerate(data or batches(n)):
        p, s, loss = step(p, s, dict(b, index=np.arange(32) + 32 * i))
        counts.append(int(s.second_passes))
    assert np.isfinite(float(loss))
    return p, s, get, counts


@pytest.mark.slow
def test_periodic_recipe_counts_its_sam_steps_and_scales_rho_with_the_interval():
    _, _, _, counts = recipe_run("periodic", Hyper(periodic_every=3), n=7)
    assert counts == [0, 0, 1, 1, 1, 2, 2]  # SAM steps 3 and 6 (Composer's (t + 1) % every == 0)
    # periodic_rho=None is every x rho: the same run as the explicit radius 3 x 0.05, not as 0.05
    a, *_ = recipe_run("periodic", Hyper(periodic_every=3, rho=0.05), n=3)
    b, *_ = recipe_run("periodic", Hyper(periodic_every=3, periodic_rho=0.15), n=3)
    c, *_ = recipe_run("periodic", Hyper(periodic_every=3, periodic_rho=0.05), n=3)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    assert float(tree_norm(jax.tree.map(lambda x, y: x - y, a, c))) > 1e-4
    # every = 1 is SAM
    p1, *_ = recipe_run("periodic", Hyper(periodic_every=1, rho=0.1), n=3)
    p2, _, _, sam_counts = recipe_run("sam", Hyper(rho=0.1), n=3)
    assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7) and sam_counts == [1, 2, 3]


@pytest.mark.slow
def test_rst_recipe_counts_the_bernoulli_draws_of_the_run_seed():
    def by_hand(seed, n, p=0.5):
        key, flags = jax.random.key(seed), []
        for _ in range(n):
            key, sub = jax.random.split(key)
            flags.append(bool(jax.random.uniform(sub, (), jnp.float32) < p))
        return list(np.cumsum(flags))

    for seed in (1, 2):
        _, _, _, counts = recipe_run("rst", Hyper(), n=12, seed=seed)
        assert counts == by_hand(seed, 12)
    assert by_hand(1, 12) != by_hand(2, 12) and 0 < by_hand(1, 12)[-1] < 12
    _, _, _, counts = recipe_run("rst", Hyper(rst_p=1.0), n=3)
    assert counts == [1, 2, 3]


def test_ae_sam_recipe_counts_the_steps_whose_squared_gradient_norm_is_high():
    """The decision by hand (float64) from the state before each step and the clean gradient."""
    hp = Hyper()
    recipe = build_method("ae_sam", hp, steps_per_epoch=4, epochs=2)
    init, step, get = training._make_step(recipe, loss_fn, per_example_loss, CTX)
    p = make_params()
    s = init(p)
    step = jax.jit(step)
    total, want = 8, []
    for t, b in enumerate(batches(10, seed=300)):
        st = get(s)
        n = sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(jax.grad(loss_fn)(p, b)))
        mu = hp.ae_delta * float(st.grad_sq_mean) + (1 - hp.ae_delta) * n
        var = hp.ae_delta * float(st.grad_sq_var) + (1 - hp.ae_delta) * (n - mu) ** 2
        c = hp.ae_c_start + (hp.ae_c_end - hp.ae_c_start) * min(t / total, 1.0)
        want.append(n >= mu + c * np.sqrt(var))
        p, s, _ = step(p, s, b)
        assert int(s.second_passes) == sum(want), (t, want)
    assert 0 < sum(want) < len(want)  # both kinds of steps happened


def test_msam_recipe_stores_the_perturbed_point_and_is_sgd_at_rho_0():
    p0, *_ = recipe_run("msam", Hyper(msam_rho=0.0), n=3)
    p_sgd, _, _, counts = recipe_run("sgd", Hyper(), n=3)
    assert_trees_close(p0, p_sgd, rtol=1e-5, atol=1e-7) and counts == [0, 0, 0]
    p, s, get, _ = recipe_run("msam", Hyper(msam_rho=0.3), n=3)
    recipe = build_method("msam", Hyper(msam_rho=0.3), steps_per_epoch=4, epochs=2)
    w = recipe.eval_params(p, get(s))  # the real weights: |w - params| = rho
    np.testing.assert_allclose(float(tree_norm(jax.tree.map(lambda a, b: a - b, w, p))), 0.3, rtol=1e-4)


@pytest.mark.slow
def test_rwp_recipe_needs_a_key_is_sgd_at_sigma_0_and_is_reproducible():
    recipe = build_method("rwp", Hyper(), steps_per_epoch=4, epochs=2)
    assert recipe.needs_key and recipe.make_step is not None
    init, _, _ = training._make_step(recipe, loss_fn, per_example_loss, CTX)
    with pytest.raises(ValueError, match="PRNG key"):
        init(make_params())
    p0, *_ = recipe_run("rwp", Hyper(rwp_sigma=0.0), n=3)
    p_sgd, *_ = recipe_run("sgd", Hyper(), n=3)
    assert_trees_close(p0, p_sgd, rtol=1e-5, atol=1e-7)
    a, _, _, counts = recipe_run("rwp", Hyper(rwp_sigma=0.05), n=3)
    b, *_ = recipe_run("rwp", Hyper(rwp_sigma=0.05), n=3)
    assert_trees_close(a, b, rtol=0, atol=0) and counts == [0, 0, 0]
    assert float(tree_norm(jax.tree.map(lambda x, y: x - y, a, p_sgd))) > 1e-4


def test_own_step_builder_gets_the_example_ids_of_every_batch():
    """A Recipe.make_step that counts ids: two epochs over 64 examples see each id twice."""

    def make_step(ctx):
        tx = optax.sgd(0.1)

        def init(params):
            return tx.init(params), jnp.zeros(ctx.num_examples, jnp.int32)

        def step(params, state, batch):
            loss, g = jax.value_and_grad(ctx.loss_fn)(params, batch)
            updates, opt = tx.update(g, state[0], params)
            return optax.apply_updates(params, updates), (opt, state[1].at[batch["index"]].add(1)), (loss, None)

        return init, step, lambda state: state[0]

    n = 64
    ctx = CTX._replace(num_examples=n)
    recipe = Recipe(optax.sgd(0.1), None, {}, False, lambda p, s: p, make_step=make_step, needs_index=True)
    init, step, get = training._make_step(recipe, loss_fn, per_example_loss, ctx)
    x, y = np.asarray(make_batch(3, n)["x"]), np.asarray(make_batch(3, n)["y"])
    with pytest.raises(ValueError, match="index"):
        step(make_params(), init(make_params()), {"x": x[:16], "y": y[:16]})
    _, state, _, _, timed = training._train_epochs(
        jax.jit(step),
        lambda p, s: 0.0,
        make_params(),
        init(make_params()),
        jnp.asarray(x),
        jnp.asarray(y),
        epochs=2,
        batch_size=16,
        seed=0,
        bar=None,
    )
    assert state.inner[1].tolist() == [2] * n and timed == 7
