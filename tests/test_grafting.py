"""Filter grafting: the entropy histogram, the alpha formula, the ring, and K networks
trained with SAM inside the grafting transform, all against numpy written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_params, sam_grads_by_hand, tmap
from sam_optax import averaging, geometry

RHO = 0.05


def np_entropy(x, n=10, exclusive_max=False):
    """The paper's H: n equal bins over [min, max]; natural log; p_k over all values."""
    x = np.ravel(np.asarray(x, np.float32))
    lo, hi = x.min(), x.max()
    s = (hi - lo) / n
    h = 0.0
    for k in range(n):
        upper = (x < lo + (k + 1) * s) if (exclusive_max or k < n - 1) else (x <= hi)
        p = np.sum((x >= lo + k * s) & upper) / x.size
        if p > 0:
            h -= p * np.log(p)
    return h


def np_alpha(h_self, h_other, a=0.4, c=500.0):
    return a / np.pi * np.arctan(c * (h_self - h_other)) + 0.5


@pytest.mark.slow
def test_weight_entropy_matches_histogram():
    x = jax.random.normal(jax.random.PRNGKey(0), (40, 25))
    np.testing.assert_allclose(averaging.weight_entropy(x), np_entropy(x), rtol=1e-5)
    np.testing.assert_allclose(averaging.weight_entropy(x, 7), np_entropy(x, 7), rtol=1e-5)
    # the official code's half-open last bin loses the maximum
    np.testing.assert_allclose(
        averaging.weight_entropy(x, exclusive_max=True), np_entropy(x, exclusive_max=True), rtol=1e-5
    )
    grid = jnp.arange(100.0)  # 10 values in each of 10 bins
    np.testing.assert_allclose(averaging.weight_entropy(grid), np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(
        averaging.weight_entropy(grid, exclusive_max=True), -(9 * 0.1 * np.log(0.1) + 0.09 * np.log(0.09)), rtol=1e-6
    )
    assert float(averaging.weight_entropy(jnp.full((5, 5), 3.0))) == 0.0


def test_grafting_coefficient_formula():
    for hs, ho in [(2.0, 1.999), (1.5, 1.7), (1.0, 1.0)]:
        for a, c in [(0.4, 500.0), (1.0, 5.0), (0.0, 500.0)]:
            np.testing.assert_allclose(averaging.grafting_coefficient(hs, ho, a, c), np_alpha(hs, ho, a, c), rtol=1e-5)
    alpha = averaging.grafting_coefficient(2.0, 1.999, round_decimals=2)
    assert float(alpha) == pytest.approx(round(np_alpha(2.0, 1.999), 2))
    big = averaging.grafting_coefficient(jnp.array([5.0, -5.0]), 0.0)
    assert 0.3 < float(big[1]) < 0.5 < float(big[0]) < 0.7  # alpha in (1/2 - A/2, 1/2 + A/2)


def stacked_networks(k=3):
    return tmap(lambda *xs: jnp.stack(xs), *[make_params(seed) for seed in range(k)])


def graft_by_hand(stacked, a, c, groups=None):
    """Ring: network i keeps alpha of its layer and takes 1 - alpha from network i - 1."""
    leaves, treedef = jax.tree.flatten(stacked)
    leaves = [np.asarray(x, np.float64) for x in leaves]
    k = leaves[0].shape[0]
    groups = groups or [[i] for i in range(len(leaves))]
    out = [x.copy() for x in leaves]
    for g in groups:
        values = [np.concatenate([np.ravel(leaves[j][i]) for j in g]) for i in range(k)]
        for i in range(k):
            alpha = np_alpha(np_entropy(values[i]), np_entropy(values[(i - 1) % k]), a, c)
            for j in g:
                out[j][i] = alpha * leaves[j][i] + (1 - alpha) * leaves[j][(i - 1) % k]
    return jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out])


@pytest.mark.parametrize("a, c", [(0.4, 500.0), (0.8, 5.0)])
def test_graft_ring_by_hand(a, c):
    stacked = stacked_networks()
    assert_trees_close(averaging.graft(stacked, a, c), graft_by_hand(stacked, a, c), rtol=1e-5, atol=1e-6)


def test_graft_layers_grouped_by_module():
    stacked = stacked_networks()
    got = averaging.graft(stacked, 0.8, 5.0, layers=averaging.layers_by_module)
    # leaves flatten as dense1/{bias, kernel}, dense2/{bias, kernel}, scale
    assert_trees_close(got, graft_by_hand(stacked, 0.8, 5.0, groups=[[0, 1], [2, 3], [4]]), rtol=1e-5, atol=1e-6)
    labels = {"dense1": {"kernel": "a", "bias": "a"}, "dense2": {"kernel": "a", "bias": "b"}, "scale": "b"}
    got = averaging.graft(stacked, 0.8, 5.0, layers=labels)
    assert_trees_close(got, graft_by_hand(stacked, 0.8, 5.0, groups=[[0, 1, 3], [2, 4]]), rtol=1e-5, atol=1e-6)


def test_graft_of_identical_networks_is_identity():
    same = averaging.replicate(make_params(), 4)
    assert_trees_close(averaging.graft(same), same, rtol=0, atol=1e-7)


def test_difflr_learning_rates():
    lrs = averaging.grafting_learning_rates(0.1, 3)
    np.testing.assert_allclose(lrs, [0.1 * (1 + np.cos(np.pi * (3 - i) / 3)) / 2 for i in (1, 2, 3)], rtol=1e-6)


@pytest.mark.slow
def test_filter_grafting_trains_k_sam_networks_and_grafts_every_n_steps():
    k, every, steps, a, c = 3, 2, 4, 0.4, 50.0
    lrs = averaging.grafting_learning_rates(0.2, k)
    inner = sam_optax.sam(optax.inject_hyperparams(optax.sgd)(learning_rate=0.2, momentum=0.9))
    tx = averaging.filter_grafting(inner, every, a, c)
    params = averaging.replicate(make_params(), k)  # same start; different data and rates
    state = tx.init(params)
    state.inner_state.inner_state.hyperparams["learning_rate"] = jnp.asarray(lrs)
    data = [batches(steps, seed=40 + 10 * i) for i in range(k)]  # network i's own data order
    sa_grad = jax.vmap(sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO)))

    @jax.jit
    def step(params, state, batch):
        out = sa_grad(params, batch)
        u, state = tx.update(
            out.grads, state, params, perturbed_grads=out.perturbed_grads, unused_scalar=1.0
        )  # not per network: broadcast, ignored by the rule
        return optax.apply_updates(params, u), state

    for t in range(steps):
        params, state = step(params, state, tmap(lambda *xs: jnp.stack(xs), *[d[t] for d in data]))

    nets = [make_params() for _ in range(k)]
    bufs = [tmap(jnp.zeros_like, n) for n in nets]  # each network's momentum: never grafted
    for t in range(1, steps + 1):
        for i in range(k):
            _, gp = sam_grads_by_hand(nets[i], data[i][t - 1], RHO)
            bufs[i] = tmap(lambda m, g: g + 0.9 * m, bufs[i], gp)
            nets[i] = tmap(lambda w, m: w - lrs[i] * m, nets[i], bufs[i])
        if t % every == 0:
            grafted = graft_by_hand(tmap(lambda *xs: jnp.stack(xs), *nets), a, c)
            nets = [tmap(lambda x: x[i], grafted) for i in range(k)]
    assert_trees_close(params, tmap(lambda *xs: jnp.stack(xs), *nets), rtol=1e-4, atol=1e-5)
    assert int(state.count) == steps and step._cache_size() == 1


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: averaging.filter_grafting(optax.sgd(0.1), every=0), "every"),
        (lambda: averaging.filter_grafting(optax.sgd(0.1), 1, a=1.5), "a"),
        (lambda: averaging.graft(stacked_networks(), c=-1.0), "c"),
        (lambda: averaging.weight_entropy(jnp.ones(3), num_bins=0), "num_bins"),
        (lambda: averaging.graft({"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}), "leading axis"),
    ],
)
def test_bad_arguments_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()
