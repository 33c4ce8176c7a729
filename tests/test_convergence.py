"""Convergence on a small real problem: an MLP on sklearn's bundled digits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import sam_optax
from sam_optax import geometry


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def init_mlp(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (64, 64)) * 0.125,
        "b1": jnp.zeros(64),
        "w2": jax.random.normal(k2, (64, 10)) * 0.125,
        "b2": jnp.zeros(10),
    }


def logits(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch["x"]), batch["y"]).mean()


RULES = {
    "sam-l2": (lambda: sam_optax.sam(optax.sgd(0.2, momentum=0.9)), lambda: geometry.l2(0.05)),
    "wsam-decoupled": (
        lambda: sam_optax.wsam(optax.sgd(0.2, momentum=0.9), 0.8, learning_rate=0.2),
        lambda: geometry.l2(0.05),
    ),
    "wsam-coupled-adam": (lambda: sam_optax.wsam(optax.adam(1e-2), 0.8, decouple=False), lambda: geometry.l2(0.05)),
    "gsam": (lambda: sam_optax.gsam(optax.sgd(0.2, momentum=0.9), 0.3), lambda: geometry.l2(0.05)),
    "asam": (lambda: sam_optax.sam(optax.sgd(0.2, momentum=0.9)), lambda: geometry.adaptive(0.5)),
    "fisher-sam": (lambda: sam_optax.sam(optax.sgd(0.2, momentum=0.9)), lambda: geometry.fisher(0.1, 1.0)),
    "sam-m16": (lambda: sam_optax.sam(optax.sgd(0.2, momentum=0.9)), lambda: geometry.l2(0.05)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RULES))
def test_reaches_accuracy_on_digits(name, digits):
    (xtr, ytr), (xte, yte) = digits
    tx, geo = RULES[name][0](), RULES[name][1]()
    f = sam_optax.sharpness_aware_grad(loss, geo, data=sam_optax.data.shards(m=16 if name.endswith("m16") else None))
    params = init_mlp(jax.random.PRNGKey(0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        out = f(params, batch)
        u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
        return optax.apply_updates(params, u), opt_state, out.loss

    rng = np.random.default_rng(1)
    for _epoch in range(8):
        perm = rng.permutation(len(xtr))
        for i in range(0, len(xtr) - 127, 128):
            idx = perm[i : i + 128]
            params, opt_state, _loss = step(params, opt_state, {"x": xtr[idx], "y": ytr[idx]})
    acc = float(jnp.mean(jnp.argmax(logits(params, xte), -1) == yte))
    assert acc >= 0.95, f"{name}: test accuracy {acc:.3f}"
