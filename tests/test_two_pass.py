"""The two-pass helper on one device: passes, m-sharpness chunks, micro-batches,
multi-step ascent, aux handling, weight decay in the ascent, errors, recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import (
    assert_trees_close,
    loss_fn,
    make_batch,
    make_params,
    sam_grads_by_hand,
    tmap,
    tree_norm,
)
from sam_optax import geometry

RHO = 0.1
P0 = make_params()
BATCH = make_batch(n=32)


def test_global_sam_matches_hand():
    out = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO))(P0, BATCH)
    g, gp = sam_grads_by_hand(P0, BATCH, RHO)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)
    np.testing.assert_allclose(out.loss, loss_fn(P0, BATCH), rtol=1e-6)
    norm = tree_norm(g)
    pert = tmap(lambda p, gi: p + RHO * gi / norm, P0, g)
    np.testing.assert_allclose(out.perturbed_loss, loss_fn(pert, BATCH), rtol=1e-6)
    assert out.aux is None


@pytest.mark.slow
@pytest.mark.parametrize("m", [4, 8, 16])
@pytest.mark.parametrize("mode", ["vmap", "scan", "unroll"])
def test_m_sharpness_chunks_match_per_chunk_loop(m, mode):
    out = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=m, chunk_mode=mode))(
        P0, BATCH
    )
    g, gp = sam_grads_by_hand(P0, BATCH, RHO, m=m)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)
    # and it really is different from global SAM
    _, gp_global = sam_grads_by_hand(P0, BATCH, RHO)
    assert tree_norm(tmap(jnp.subtract, gp, gp_global)) > 1e-4


def test_m_equal_batch_is_global_sam():
    a = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=32))(P0, BATCH)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO))(P0, BATCH)
    assert_trees_close(a.perturbed_grads, b.perturbed_grads, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vmap", "scan"])
def test_microbatches_inside_a_shard_share_one_perturbation(mode):
    out = sam_optax.sharpness_aware_grad(
        loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=16, microbatch_size=4, chunk_mode=mode)
    )(P0, BATCH)
    g, gp = sam_grads_by_hand(P0, BATCH, RHO, m=16)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)


def test_multi_step_ascent_by_hand():
    n = 3
    out = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), ascent_steps=n)(P0, BATCH)

    def grad(p):
        return jax.grad(loss_fn)(p, BATCH)

    def unit(g):
        return tmap(lambda x: x / tree_norm(g), g)

    def project(e):
        return tmap(lambda x: x * jnp.minimum(1.0, RHO / tree_norm(e)), e)

    eps = project(tmap(lambda d: RHO / n * d, unit(grad(P0))))
    for _ in range(n - 1):
        gk = grad(tmap(jnp.add, P0, eps))
        eps = project(tmap(lambda e, d: e + RHO / n * d, eps, unit(gk)))
    assert_trees_close(out.perturbed_grads, grad(tmap(jnp.add, P0, eps)), rtol=1e-5)
    assert float(tree_norm(eps)) <= RHO * (1 + 1e-6)


@pytest.mark.slow
def test_one_ascent_step_of_full_size_is_sam_and_more_steps_stay_in_ball():
    a = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), ascent_steps=1)(P0, BATCH)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO))(P0, BATCH)
    assert_trees_close(a.perturbed_grads, b.perturbed_grads, rtol=0, atol=0)
    # full-size steps: every iterate is projected back onto the sphere of radius rho
    c = sam_optax.sharpness_aware_grad(loss_fn, geometry.adaptive(0.5), ascent_steps=4, ascent_step_size=1.0)(P0, BATCH)
    assert np.isfinite(float(c.perturbed_loss))
    assert float(c.perturbed_loss) >= float(c.loss)


def test_aux_comes_from_the_clean_pass_only():
    def loss_with_aux(params, batch):
        logits = jnp.mean(jnp.abs(params["dense2"]["kernel"]))
        return loss_fn(params, batch), {"stat": logits, "calls": jnp.int32(1)}

    out = sam_optax.sharpness_aware_grad(
        loss_with_aux, geometry.l2(1.0), has_aux=True, data=sam_optax.data.shards(m=8)
    )(P0, BATCH)
    np.testing.assert_allclose(out.aux["stat"], jnp.mean(jnp.abs(P0["dense2"]["kernel"])), rtol=1e-6)
    assert int(out.aux["calls"]) == 1


def test_weight_decay_in_ascent_direction_by_chaining_before_the_geometry():
    wd = 0.3
    geo = optax.chain(optax.add_decayed_weights(wd), geometry.l2(RHO))
    out = sam_optax.sharpness_aware_grad(loss_fn, geo)(P0, BATCH)
    g = jax.grad(loss_fn)(P0, BATCH)
    d = tmap(lambda gi, w: gi + wd * w, g, P0)
    pert = tmap(lambda w, di: w + RHO * di / tree_norm(d), P0, d)
    assert_trees_close(out.grads, g)  # the clean gradient has no decay
    assert_trees_close(out.perturbed_grads, jax.grad(loss_fn)(pert, BATCH))


def test_l2_term_in_the_loss_is_the_original_jax_behaviour():
    wd = 0.3

    def l2_loss(p, b):
        return loss_fn(p, b) + 0.5 * wd * sum(jnp.sum(x * x) for x in jax.tree.leaves(p))

    out = sam_optax.sharpness_aware_grad(l2_loss, geometry.l2(RHO))(P0, BATCH)
    g = tmap(lambda gi, w: gi + wd * w, jax.grad(loss_fn)(P0, BATCH), P0)
    pert = tmap(lambda w, gi: w + RHO * gi / tree_norm(g), P0, g)
    gp = tmap(lambda gi, w: gi + wd * w, jax.grad(loss_fn)(pert, BATCH), pert)
    assert_trees_close(out.perturbed_grads, gp)


@pytest.mark.slow
def test_extra_args_are_passed_to_every_shard():
    def weighted(params, batch, temperature):
        return loss_fn(params, batch) * temperature

    a = sam_optax.sharpness_aware_grad(weighted, geometry.l2(RHO), data=sam_optax.data.shards(m=8))(P0, BATCH, 2.0)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=8))(P0, BATCH)
    assert_trees_close(a.perturbed_grads, tmap(lambda x: 2 * x, b.perturbed_grads))


def test_bf16_params():
    params = make_params(dtype=jnp.bfloat16)
    out = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(m=8))(params, BATCH)
    for x in jax.tree.leaves(out.perturbed_grads):
        assert x.dtype == jnp.bfloat16
    g32, gp32 = sam_grads_by_hand(tmap(lambda x: x.astype(jnp.float32), params), BATCH, RHO, m=8)
    assert_trees_close(out.perturbed_grads, gp32, rtol=5e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kwargs, batch_n, match",
    [
        (dict(m=5), 32, "m=5 must divide the batch size 32"),
        (dict(m=8, microbatch_size=3), 32, "microbatch_size=3 must divide the m-sharpness shard size 8"),
    ],
)
def test_indivisible_sizes_are_value_errors(kwargs, batch_n, match):
    with pytest.raises(ValueError, match=match):
        sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(**kwargs))(P0, make_batch(n=batch_n))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(m=0), "m must be an integer"),
        (dict(m=2.5), "m must be an integer"),
        (dict(chunk_mode="loop"), "chunk_mode"),
        (dict(ascent_steps=0), "ascent_steps"),
        (dict(ascent_step_size=0.0), "ascent_step_size"),
        (dict(microbatch_size=-1), "microbatch_size"),
        (dict(geometry="l2"), "geometry"),
        (dict(geometry=optax.sgd(0.1), ascent_steps=2), "norm"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    data_keys = {"m", "chunk_mode", "microbatch_size"}
    data = {k: v for k, v in kwargs.items() if k in data_keys}
    rest = {k: v for k, v in kwargs.items() if k not in data_keys}
    with pytest.raises(ValueError, match=match):
        sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(**data), **rest)


def test_stateful_geometry_requires_state():
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(optax.constant_schedule(0.1)))
    with pytest.raises(ValueError, match="ascent_state"):
        f(P0, BATCH)


@pytest.mark.slow
def test_rho_schedule_advances_and_no_recompile_after_step_one():
    sched = optax.linear_schedule(0.01, 0.2, 5)
    geo = geometry.l2(sched)
    f = sam_optax.sharpness_aware_grad(loss_fn, geo, data=sam_optax.data.shards(m=8))
    tx = sam_optax.wsam(
        optax.adam(optax.cosine_decay_schedule(1e-2, 10)), 0.9, learning_rate=optax.cosine_decay_schedule(1e-2, 10)
    )

    @jax.jit
    def step(params, opt_state, ascent, batch):
        out = f(params, batch, ascent_state=ascent)
        u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
        return optax.apply_updates(params, u), opt_state, out.ascent_state, out

    params, opt_state, ascent = P0, tx.init(P0), geo.init(P0)
    for t in range(6):
        b = make_batch(seed=t)
        g_hand, gp_hand = sam_grads_by_hand(params, b, float(sched(t)), m=8)
        params, opt_state, ascent, out = step(params, opt_state, ascent, b)
        assert_trees_close(out.perturbed_grads, gp_hand, rtol=1e-5)
    assert int(ascent.count) == 6
    assert step._cache_size() == 1
