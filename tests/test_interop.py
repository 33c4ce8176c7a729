"""Interoperability: optax.contrib.sam agreement, Flax Linen BatchNorm, checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_params, train
from sam_optax import geometry


def test_agrees_with_optax_contrib_sam_over_many_steps():
    rho, steps = 0.05, 25
    data = batches(steps, seed=7)
    ours, _ = train(sam_optax.sam(optax.sgd(0.05, momentum=0.9)), geometry.l2(rho), make_params(), data)

    tx = optax.contrib.sam(
        optax.sgd(0.05, momentum=0.9),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(loss_fn)(params, batch)
        u, state = tx.update(g, state, params, grad_fn=lambda p, _: jax.grad(loss_fn)(p, batch))
        return optax.apply_updates(params, u), state

    params, state = make_params(), tx.init(make_params())
    for b in data:
        params, state = step(params, state, b)
    assert_trees_close(ours, params, rtol=1e-5, atol=1e-6)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x))


@pytest.mark.slow
def test_linen_batchnorm_statistics_advance_once_per_step():
    model = BNNet()
    x = jax.random.normal(jax.random.PRNGKey(0), (16, 5))
    y = jnp.arange(16) % 3
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def loss(p, batch, batch_stats):
        logits, updates = model.apply(
            {"params": p, "batch_stats": batch_stats}, batch["x"], train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return ce, updates["batch_stats"]

    f = sam_optax.sharpness_aware_grad(loss, geometry.l2(0.5), has_aux=True)
    tx = sam_optax.sam(optax.sgd(0.1))
    opt_state = tx.init(params)
    out = f(params, {"x": x, "y": y}, stats)
    # expected: exactly one momentum update from the clean forward pass at w
    h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    want_mean = 0.9 * stats["BatchNorm_0"]["mean"] + 0.1 * h.mean(0)
    want_var = 0.9 * stats["BatchNorm_0"]["var"] + 0.1 * h.var(0)
    np.testing.assert_allclose(out.aux["BatchNorm_0"]["mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.aux["BatchNorm_0"]["var"], want_var, rtol=1e-5, atol=1e-6)
    u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
    assert not np.allclose(out.grads["Dense_0"]["kernel"], out.perturbed_grads["Dense_0"]["kernel"])


@pytest.mark.slow
def test_checkpoint_restore_continues_the_identical_trajectory(tmp_path):
    sched = optax.cosine_decay_schedule(1e-2, 8)
    geo = geometry.l2(optax.linear_schedule(0.02, 0.1, 8))

    def make_tx():
        return sam_optax.wsam(optax.adamw(sched, weight_decay=1e-3), 0.9, learning_rate=sched)

    data = batches(8, seed=3)
    f = sam_optax.sharpness_aware_grad(loss_fn, geo, data=sam_optax.data.shards(m=8))

    def step(tx, params, opt_state, ascent, batch):
        out = f(params, batch, ascent_state=ascent)
        u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
        return optax.apply_updates(params, u), opt_state, out.ascent_state

    tx = make_tx()
    p, s, a = make_params(), tx.init(make_params()), geo.init(make_params())
    for b in data:
        p, s, a = step(tx, p, s, a, b)
    uninterrupted = p

    p, s, a = make_params(), tx.init(make_params()), geo.init(make_params())
    for b in data[:4]:
        p, s, a = step(tx, p, s, a, b)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s, "ascent": a})
    ckpt.wait_until_finished()

    tx2 = make_tx()
    target = {"params": make_params(), "opt_state": tx2.init(make_params()), "ascent": geo.init(make_params())}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
    assert type(restored["opt_state"]) is type(s)
    p, s, a = restored["params"], restored["opt_state"], restored["ascent"]
    for b in data[4:]:
        p, s, a = step(tx2, p, s, a, b)
    assert_trees_close(p, uninterrupted, rtol=0, atol=0)
