"""ESAM (SWP geometry + SDS data selection) and LookSAM: formulas, identities,
per-shard behaviour, and the run-time skipping of the second pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import sam_optax
from helpers import (
    assert_trees_close,
    batches,
    looksam_direction_by_hand,
    loss_fn,
    make_batch,
    make_params,
    per_example_loss,
    sam_grads_by_hand,
    tmap,
    train,
    tree_norm,
)
from sam_optax import geometry
from sam_optax.data import sharpness_sensitive
from sam_optax.geometry._stochastic import sample_mask

RHO = 0.1
P0 = make_params()
BATCH = make_batch(n=32)
G = jax.grad(loss_fn)(P0, BATCH)


# ---- SWP ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["tensor", "coordinate"])
@pytest.mark.parametrize("normalize", ["masked", "full"])
def test_swp_beta1_is_the_wrapped_geometry(granularity, normalize):
    for inner in [geometry.l2(RHO), geometry.adaptive(0.5), geometry.fisher(RHO)]:
        geo = geometry.stochastic(inner, 1.0, granularity=granularity, normalize=normalize)
        eps, _ = geo.update(G, geo.init(P0), P0)
        assert_trees_close(eps, inner.update(G, inner.init(P0), P0)[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("granularity", ["tensor", "coordinate"])
def test_swp_formulas_given_the_mask(granularity):
    beta = 0.6
    for normalize in ["masked", "full"]:
        geo = geometry.stochastic(geometry.l2(RHO), beta, granularity=granularity, normalize=normalize, seed=3)
        state = geo.init(P0)
        eps, new_state = geo.update(G, state, P0)
        _, sub = jax.random.split(state.key)
        mask = sample_mask(sub, G, beta, granularity)
        mg = tmap(jnp.multiply, mask, G)
        norm = tree_norm(mg) if normalize == "masked" else tree_norm(G)
        assert_trees_close(eps, tmap(lambda x: RHO / beta * x / (norm + 1e-12), mg), rtol=1e-6, atol=1e-9)
        assert not np.array_equal(new_state.key, state.key)
        if granularity == "tensor":  # each tensor entirely kept or entirely dropped
            for mk in jax.tree.leaves(mask):
                assert np.all(mk == mk.ravel()[0])


def swp_draws(beta, granularity, normalize, n_masks=400):
    """The SWP perturbations of one gradient over n_masks masks, and SAM's."""
    g = {
        "a": jax.random.normal(jax.random.PRNGKey(0), (4000,)),
        "b": jax.random.normal(jax.random.PRNGKey(1), (50, 20)),
        **{f"t{i}": jax.random.normal(jax.random.PRNGKey(2 + i), (3, 4)) for i in range(30)},
    }
    geo = geometry.stochastic(geometry.l2(RHO), beta, granularity=granularity, normalize=normalize)

    def draw(key):
        return geo.update(g, geometry.StochasticState(key, optax.EmptyState()))[0]

    eps = jax.vmap(draw)(jax.random.split(jax.random.PRNGKey(5), n_masks))
    return eps, geometry.l2(RHO).update(g, optax.EmptyState())[0]


@pytest.mark.slow
def test_swp_coordinate_mask_rate_and_expected_perturbation():
    beta = 0.3
    eps, sam_eps = swp_draws(beta, "coordinate", "full")
    kept = np.mean(np.asarray(eps["a"]) != 0)
    assert abs(kept - beta) < 0.003  # 1.6e6 Bernoulli draws: sd ~ 4e-4
    # the average over 400 masks is SAM's perturbation (unbiased): relative error ~ sqrt((1-b)/(b 400)) = 0.076
    mean = tmap(lambda e: e.mean(0), eps)
    rel = tree_norm(tmap(jnp.subtract, mean, sam_eps)) / tree_norm(sam_eps)
    assert rel < 0.1
    nonzero = np.asarray(eps["a"][0])[np.asarray(eps["a"][0]) != 0]
    np.testing.assert_allclose(nonzero, np.asarray(sam_eps["a"])[np.asarray(eps["a"][0]) != 0] / beta, rtol=1e-5)


def test_swp_tensor_mask_rate_and_expected_perturbation():
    beta = 0.5
    eps, sam_eps = swp_draws(beta, "tensor", "full")
    kept = np.mean([np.asarray(x[:, 0] if x.ndim == 2 else x[:, 0, 0]) != 0 for x in jax.tree.leaves(eps)])
    assert abs(kept - beta) < 0.02  # 32 tensors x 400 masks: sd ~ 4.4e-3
    for x, s in zip(jax.tree.leaves(eps), jax.tree.leaves(sam_eps)):  # whole tensors, scaled by 1 / beta
        for e in np.asarray(x[:20]):
            assert np.all(e == 0) or np.allclose(e, np.asarray(s) / beta, rtol=1e-5)
    mean = tmap(lambda e: e.mean(0), eps)
    rel = tree_norm(tmap(jnp.subtract, mean, sam_eps)) / tree_norm(sam_eps)
    assert rel < 0.15  # ~ sqrt((1-b)/(b 400)) = 0.05 per tensor, a few large tensors dominate


@pytest.mark.slow
def test_swp_masked_normalization_has_norm_rho_over_beta_and_is_biased():
    beta = 0.5
    eps, sam_eps = swp_draws(beta, "coordinate", "masked", n_masks=50)
    norms = jax.vmap(tree_norm)(eps)
    np.testing.assert_allclose(norms, RHO / beta, rtol=1e-5)  # every mask: the official code's rho / beta
    mean = tmap(lambda e: e.mean(0), eps)
    # E[eps] = sqrt(1/beta) x SAM's here (||m g|| ~ sqrt(beta) ||g||): not the SAM perturbation
    ratio = tree_norm(mean) / tree_norm(sam_eps)
    assert abs(ratio - np.sqrt(1 / beta)) < 0.1


def test_swp_is_reproducible_from_the_seed_and_checkpointable():
    def run(seed):
        geo = geometry.stochastic(geometry.l2(RHO), 0.5, granularity="coordinate", seed=seed)
        state, out = geo.init(P0), []
        for _ in range(3):
            eps, state = geo.update(G, state, P0)
            out.append(eps)
        return out, state

    a, state = run(11)
    b, _ = run(11)
    c, _ = run(12)
    assert_trees_close(a, b, rtol=0, atol=0)
    assert state.key.dtype == jnp.uint32
    for x, y in zip(a, c):  # another seed, other masks
        assert not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    for x, y in zip(a, a[1:]):  # and a new mask every step
        assert not all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: geometry.stochastic(geometry.l2(0.1), 0.0), "beta"),
        (lambda: geometry.stochastic(geometry.l2(0.1), 1.5), "beta"),
        (lambda: geometry.stochastic(geometry.l2(0.1), 0.5, granularity="layer"), "granularity"),
        (lambda: geometry.stochastic(geometry.l2(0.1), 0.5, normalize="none"), "normalize"),
        (lambda: sharpness_sensitive(0.0), "gamma"),
        (lambda: sharpness_sensitive(1.2), "gamma"),
        (lambda: sam_optax.looksam(optax.sgd(0.1), k=0), "k"),
        (lambda: sam_optax.looksam(optax.sgd(0.1), alpha=-1.0), "alpha"),
    ],
)
def test_bad_hyperparameters(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


# ---- SDS ------------------------------------------------------------------------------------


def test_selection_is_the_top_fraction_with_deterministic_ties():
    sel = sharpness_sensitive(0.5)
    clean = jnp.zeros(8)
    pert = jnp.asarray([0.1, 0.5, 0.5, -1.0, 0.3, 0.5, 0.0, 0.2])
    np.testing.assert_array_equal(np.sort(sel.select(clean, pert)), [1, 2, 4, 5])
    ties = jnp.asarray([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(np.sort(sel.select(clean, ties)), [0, 1, 2, 3])
    assert sharpness_sensitive(0.3).size(10) == 3 and sharpness_sensitive(0.01).size(10) == 1


def sds_by_hand(params, batch, gamma, rho, m=None):
    n = batch["x"].shape[0]
    m = n if m is None else m
    gps = []
    for i in range(n // m):
        chunk = jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch)
        g = jax.grad(loss_fn)(params, chunk)
        pert = tmap(lambda p, gi: p + rho * gi / (tree_norm(g) + 1e-12), params, g)
        rise = np.asarray(per_example_loss(pert, chunk) - per_example_loss(params, chunk))
        k = max(1, int(np.floor(gamma * m + 1e-9)))
        idx = np.argsort(-rise, kind="stable")[:k]
        gps.append(jax.grad(loss_fn)(pert, jax.tree.map(lambda a: a[idx], chunk)))
    return tmap(lambda *xs: sum(xs) / len(xs), *gps)


@pytest.mark.slow
@pytest.mark.parametrize("m", [None, 8])
def test_sds_second_pass_runs_on_the_selected_examples(m):
    f = sam_optax.sharpness_aware_grad(
        per_example_loss, geometry.l2(RHO), data=sam_optax.data.shards(m=m, selection=sharpness_sensitive(0.5))
    )
    out = f(P0, BATCH)
    assert_trees_close(out.perturbed_grads, sds_by_hand(P0, BATCH, 0.5, RHO, m=m), rtol=1e-5)
    g, _ = sam_grads_by_hand(P0, BATCH, RHO, m=m)
    assert_trees_close(out.grads, g)


@pytest.mark.slow
def test_esam_beta1_gamma1_is_sam():
    geo = geometry.stochastic(geometry.l2(RHO), 1.0)
    f = sam_optax.sharpness_aware_grad(
        per_example_loss, geo, data=sam_optax.data.shards(m=8, selection=sharpness_sensitive(1.0))
    )
    out = f(P0, BATCH, ascent_state=geo.init(P0))
    _, gp = sam_grads_by_hand(P0, BATCH, RHO, m=8)
    assert_trees_close(out.perturbed_grads, gp)
    # over several training steps with WSAM too
    a, _ = train(
        sam_optax.wsam(optax.sgd(0.1, momentum=0.9), 0.9, learning_rate=0.1),
        geo,
        P0,
        batches(3),
        loss=per_example_loss,
        data_selection=sharpness_sensitive(1.0),
    )
    b, _ = train(sam_optax.wsam(optax.sgd(0.1, momentum=0.9), 0.9, learning_rate=0.1), geometry.l2(RHO), P0, batches(3))
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.multidevice
def test_sds_under_shard_map_equals_per_chunk_reference():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    batch = make_batch(n=64)
    f = sam_optax.sharpness_aware_grad(
        per_example_loss, geometry.l2(RHO), data=sam_optax.data.shards(mesh=mesh, selection=sharpness_sensitive(0.5))
    )
    assert_trees_close(f(P0, batch).perturbed_grads, sds_by_hand(P0, batch, 0.5, RHO, m=8), rtol=1e-5)


def test_sds_needs_per_example_losses_and_no_microbatches():
    with pytest.raises(ValueError, match="per-example"):
        sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(selection=sharpness_sensitive(0.5)))(
            P0, BATCH
        )
    with pytest.raises(ValueError, match="microbatch_size"):
        sam_optax.sharpness_aware_grad(
            per_example_loss, data=sam_optax.data.shards(selection=sharpness_sensitive(0.5), microbatch_size=4)
        )


@pytest.mark.slow
def test_per_example_loss_without_selection_is_plain_sam():
    a = sam_optax.sharpness_aware_grad(per_example_loss, geometry.l2(RHO), data=sam_optax.data.shards(m=8))(P0, BATCH)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=8))(P0, BATCH)
    assert_trees_close(a.perturbed_grads, b.perturbed_grads, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_esam_with_every_rule_and_geometry_runs_and_learns():
    data = batches(6)
    geo = geometry.stochastic(geometry.adaptive(0.5), 0.5)
    for tx in [
        sam_optax.sam(optax.sgd(0.1)),
        sam_optax.wsam(optax.sgd(0.1), 0.8, learning_rate=0.1),
        sam_optax.gsam(optax.sgd(0.1), 0.3),
        sam_optax.looksam(optax.sgd(0.1), k=2),
    ]:
        p, _ = train(tx, geo, P0, data, loss=per_example_loss, data_selection=sharpness_sensitive(0.5))
        assert float(loss_fn(p, data[0])) < float(loss_fn(P0, data[0]))


# ---- LookSAM --------------------------------------------------------------------------------


@pytest.mark.slow
def test_looksam_k1_is_sam():
    a, _ = train(sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=1), geometry.l2(RHO), P0, batches(4))
    b, _ = train(sam_optax.sam(optax.sgd(0.1, momentum=0.9)), geometry.l2(RHO), P0, batches(4))
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_looksam_reuse_steps_by_hand():
    k, alpha, lr, beta = 3, 0.7, 0.1, 0.9
    data = batches(7)
    got, _ = train(sam_optax.looksam(optax.sgd(lr, momentum=beta), k=k, alpha=alpha), geometry.l2(RHO), P0, data)
    w, mom, g_v = P0, tmap(jnp.zeros_like, P0), None
    for t, b in enumerate(data):
        g, gp = sam_grads_by_hand(w, b, RHO)
        d, g_v = looksam_direction_by_hand(g, gp, t, k, alpha, g_v)
        mom = tmap(lambda mi, di: di + beta * mi, mom, d)
        w = tmap(lambda wi, mi: wi - lr * mi, w, mom)
    assert_trees_close(got, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_looksam_skips_the_second_pass_at_run_time_without_recompiling():
    k, steps = 3, 6
    calls = []

    def counted_loss(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    tx = sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=k)
    f = sam_optax.sharpness_aware_grad(counted_loss, geometry.l2(RHO))

    def run(skip):
        @jax.jit
        def step(params, opt_state, batch):
            flag = sam_optax.looksam_full_step(opt_state) if skip else True
            out = f(params, batch, second_pass=flag)
            u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
            return optax.apply_updates(params, u), opt_state

        params, state = P0, tx.init(P0)
        calls.clear()
        for b in batches(steps):
            params, state = step(params, state, b)
        jax.effects_barrier()
        assert step._cache_size() == 1
        return params, len(calls)

    skipped, n_skip = run(True)
    full, n_full = run(False)
    assert n_full == 2 * steps
    assert n_skip == steps + steps // k  # one pass per step, plus the second pass on full steps only
    assert_trees_close(skipped, full, rtol=1e-6, atol=1e-7)


def test_second_pass_false_returns_clean_gradient():
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=8))
    out = f(P0, BATCH, second_pass=jnp.asarray(False))
    assert_trees_close(out.perturbed_grads, out.grads, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.perturbed_loss, out.loss, rtol=1e-7)


def test_literal_false_compiles_no_second_pass():
    calls = []

    def counted_loss(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    f = sam_optax.sharpness_aware_grad(counted_loss, geometry.l2(RHO))
    out = f(P0, BATCH, second_pass=False)
    jax.effects_barrier()
    assert len(calls) == 1
    assert_trees_close(out.perturbed_grads, out.grads, rtol=0, atol=0)
    text = jax.jit(lambda p, b: f(p, b, second_pass=False).grads).lower(P0, BATCH).as_text()
    assert "cond" not in text and "case" not in text
