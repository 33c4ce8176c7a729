"""Shared test fixtures: a small MLP over a pytree of mixed-shape leaves, and
hand-written reference implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def make_params(seed: int = 0, dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "dense1": {
            "kernel": jax.random.normal(k[0], (5, 7), dtype) * 0.5,
            "bias": jax.random.normal(k[1], (7,), dtype) * 0.1,
        },
        "dense2": {"kernel": jax.random.normal(k[2], (7, 3), dtype) * 0.5, "bias": jnp.zeros((3,), dtype)},
        "scale": jnp.asarray(1.5, dtype),
    }


def make_batch(seed: int = 1, n: int = 32):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (n, 5))
    y = jax.random.randint(k2, (n,), 0, 3)
    return {"x": x, "y": y}


def forward(params, x):
    h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return params["scale"] * (h @ params["dense2"]["kernel"] + params["dense2"]["bias"])


def per_example_loss(params, batch):
    logits = forward(params, batch["x"]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch["y"][:, None], axis=1)[:, 0]


def loss_fn(params, batch):
    return jnp.mean(per_example_loss(params, batch))


def tree_norm(t):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t)))


def tmap(f, *trees):
    return jax.tree.map(f, *trees)


def sam_grads_by_hand(params, batch, rho, eps=1e-12, m=None):
    """Per-chunk loop: (mean g, mean g_pert) with each chunk's own L2 perturbation."""
    n = batch["x"].shape[0]
    m = n if m is None else m
    gs, gps = [], []
    for i in range(n // m):
        chunk = jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch)
        g = jax.grad(loss_fn)(params, chunk)
        norm = tree_norm(g)
        pert = tmap(lambda p, gi: p + rho * gi / (norm + eps), params, g)
        gps.append(jax.grad(loss_fn)(pert, chunk))
        gs.append(g)

    def mean(ts):
        return tmap(lambda *xs: sum(xs) / len(xs), *ts)

    return mean(gs), mean(gps)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), (jax.tree.structure(a), jax.tree.structure(b))
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def batches(n_steps: int, n: int = 32, seed: int = 100):
    return [make_batch(seed + i, n) for i in range(n_steps)]


def train(tx, geo, params, batch_list, *, m=None, mesh=None, loss=None, data_selection=None, **sa_kwargs):
    """Runs the library's two-pass helper + rule for len(batch_list) steps."""
    import optax

    import sam_optax

    f = sam_optax.sharpness_aware_grad(
        loss or loss_fn, geo, sam_optax.data.shards(m=m, mesh=mesh, selection=data_selection), **sa_kwargs
    )
    state, ascent = tx.init(params), geo.init(params)

    @jax.jit
    def step(params, state, ascent, batch):
        out = f(params, batch, ascent_state=ascent)
        u, state = tx.update(out.grads, state, params, perturbed_grads=out.perturbed_grads, clean_grads=out.grads)
        return optax.apply_updates(params, u), state, out.ascent_state

    for b in batch_list:
        params, state, ascent = step(params, state, ascent, b)
    return params, state


def looksam_direction_by_hand(g, gp, t, k, alpha, g_v):
    """LookSAM (Liu et al. 2022, Alg. 1) at step t: (what the base optimizer sees, the stored g_v).

    Full steps (t % k == 0) see g_pert and store its part orthogonal to g; the others see
    g + alpha ||g|| / ||g_v|| g_v."""
    vdot = lambda a, b: sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
    if t % k == 0:
        return gp, tmap(lambda s, c: s - vdot(g, gp) / vdot(g, g) * c, gp, g)
    return tmap(lambda c, v: c + alpha * tree_norm(g) / tree_norm(g_v) * v, g, g_v), g_v
