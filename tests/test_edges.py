"""Issue 11 items 7 and 8: edge shapes, and loss outputs that would be misread."""

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, loss_fn, make_batch, make_params, per_example_loss
from sam_optax import geometry
from sam_optax.data import shards, sharpness_sensitive

P0 = make_params()
BATCH = make_batch()


# --------------------------------------------------------------------------- item 8: loss outputs


def test_a_pair_without_has_aux_is_an_error_not_two_losses():
    """Before: (loss, aux) was stacked into a vector of two 'per-example losses' (loss halved)."""
    f = sam_optax.sharpness_aware_grad(lambda p, b: (loss_fn(p, b), jnp.zeros(())), geometry.l2(0.05))
    with pytest.raises(ValueError, match="pass has_aux=True"):
        f(P0, BATCH)
    with pytest.raises(TypeError):  # what jax.value_and_grad does with the same function
        jax.value_and_grad(lambda p, b: (loss_fn(p, b), jnp.zeros(())))(P0, BATCH)


def test_has_aux_with_a_scalar_loss_is_a_clear_error():
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(0.05), has_aux=True)
    with pytest.raises(ValueError, match=r"has_aux=True loss_fn must return a pair \(loss, aux\)"):
        f(P0, BATCH)


@pytest.mark.parametrize(
    "data", [shards(), shards(8), shards(selection=sharpness_sensitive(0.5))], ids=["one", "chunks", "sds"]
)
def test_per_example_losses_must_match_the_batch(data):
    """Before: 5 losses for 32 examples were averaged, and SDS clamped indices past the batch."""
    f = sam_optax.sharpness_aware_grad(lambda p, b: per_example_loss(p, b)[:5], geometry.l2(0.05), data)
    with pytest.raises(ValueError, match="returned 5 per-example losses for a batch of"):
        f(P0, BATCH)


def test_per_example_losses_of_the_right_length_are_the_mean():
    a = sam_optax.sharpness_aware_grad(per_example_loss, geometry.l2(0.05))(P0, BATCH)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(0.05))(P0, BATCH)
    assert_trees_close(a.perturbed_grads, b.perturbed_grads)
    assert abs(float(a.loss) - float(b.loss)) < 1e-6


def test_rule_update_still_works_after_the_check():
    tx = sam_optax.sam(optax.sgd(0.1))
    out = sam_optax.sharpness_aware_grad(per_example_loss, geometry.l2(0.05))(P0, BATCH)
    u, _ = tx.update(out.grads, tx.init(P0), P0, perturbed_grads=out.perturbed_grads, clean_grads=out.grads)
    assert_trees_close(u, jax.tree.map(lambda g: -0.1 * g, out.perturbed_grads))


# --------------------------------------------------------------------------- item 7: edge shapes


def data_only_loss(params, batch):
    return jnp.mean(batch["x"] ** 2) + 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "data",
    [
        shards(8, chunk_mode="scan"),
        shards(microbatch_size=8),
        shards(8, chunk_mode="vmap"),
        shards(8, chunk_mode="unroll"),
    ],
    ids=["scan", "micro", "vmap", "unroll"],
)
def test_empty_params_give_empty_gradients_in_every_layout(data):
    """Before: chunk_mode='scan' and microbatch_size crashed (IndexError) on empty params."""
    out = sam_optax.sharpness_aware_grad(data_only_loss, geometry.l2(0.05), data)({}, BATCH)
    assert out.grads == {} and out.perturbed_grads == {}
    assert abs(float(out.loss) - float(jnp.mean(BATCH["x"] ** 2))) < 1e-6
    assert float(out.perturbed_loss) == pytest.approx(float(out.loss), abs=1e-6)


@pytest.mark.parametrize("data, match", [(shards(4), "0 examples"), (shards(microbatch_size=4), "0 examples")])
def test_a_zero_example_batch_is_a_clear_error(data, match):
    """Before: ZeroDivisionError."""
    empty = {"x": jnp.zeros((0, 5)), "y": jnp.zeros((0,), jnp.int32)}
    with pytest.raises(ValueError, match=match):
        sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(0.05), data)(P0, empty)


@pytest.mark.slow
def test_a_one_example_batch_is_sam_on_that_example():
    one = jax.tree.map(lambda x: x[:1], BATCH)
    a = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(0.05), shards(1, chunk_mode="scan"))(P0, one)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(0.05))(P0, one)
    assert_trees_close(a.perturbed_grads, b.perturbed_grads)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: geometry.pnorm(0.1, p=3),
        lambda: geometry.adaptive(0.1, p=3),
        lambda: geometry.pnorm(0.1, p=1),
        lambda: geometry.l2(0.1),
        lambda: geometry.fisher(0.1, 1.0),
    ],
    ids=["pnorm3", "adaptive3", "pnorm1", "l2", "fisher"],
)
def test_a_zero_size_leaf_gets_an_empty_perturbation_and_changes_nothing_else(make):
    """Before: pnorm (p not 2 or inf) and adaptive with p=3 crashed on a (0, 4) leaf."""
    geo = make()
    params = {"empty": jnp.zeros((0, 4)), "w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"empty": jnp.zeros((0, 4)), "w": jnp.array([0.3, 0.1, -0.2])}
    eps, _ = geo.update(grads, geo.init(params), params)
    ref, _ = geo.update({"w": grads["w"]}, geo.init({"w": params["w"]}), {"w": params["w"]})
    assert eps["empty"].shape == (0, 4)
    assert_trees_close(eps["w"], ref["w"], rtol=1e-6, atol=1e-8)
