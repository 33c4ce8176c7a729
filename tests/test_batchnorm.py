"""BatchNorm recompute for averaged weights: the statistics equal those of the averaged
network's activations over the data, computed by hand (Flax Linen and NNX)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_trees_close
from sam_optax import averaging

EPS = 1e-5  # Flax's BatchNorm epsilon
X = jax.random.normal(jax.random.PRNGKey(3), (64, 5)) * 2.0 + 1.0


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(6)(x))
        return nn.BatchNorm(use_running_average=not train, momentum=0.99, name="bn_out")(nn.Dense(4)(nn.relu(h)))


def hand_stats(dense1, bn1, dense2, xs):
    """Per batch: (mean, biased var) of each BatchNorm's input, the network in train mode."""
    out = []
    for x in xs:
        h1 = np.asarray(x, np.float64) @ dense1[0] + dense1[1]
        m1, v1 = h1.mean(0), h1.var(0)
        r = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * bn1[0] + bn1[1], 0.0)
        h2 = r @ dense2[0] + dense2[1]
        out.append((h1, m1, v1, h2, h2.mean(0), h2.var(0)))
    return out


def expected(per_batch, variance):
    sizes = np.array([len(b[0]) for b in per_batch], np.float64)
    w = sizes / sizes.sum()
    res = []
    for layer in (0, 3):
        acts = np.concatenate([b[layer] for b in per_batch])
        mean = sum(wi * b[layer + 1] for wi, b in zip(w, per_batch))
        np.testing.assert_allclose(mean, acts.mean(0), rtol=1e-10, atol=1e-10)  # the data mean
        if variance == "total":
            var = acts.var(0)
        else:
            var = sum(wi * b[layer + 2] for wi, b in zip(w, per_batch))
        res.append((mean, var))
    return res


def averaged_linen_variables():
    model = Net()
    inits = [model.init(jax.random.PRNGKey(s), X[:2], train=False) for s in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[v["params"] for v in inits])
    params = averaging.average_replicas(stacked)  # e.g. the SWAP / SWA average
    params["BatchNorm_0"]["scale"] = params["BatchNorm_0"]["scale"] * 1.5  # a non-trivial affine
    params["BatchNorm_0"]["bias"] = params["BatchNorm_0"]["bias"] + 0.3
    return model, {"params": params, "batch_stats": inits[0]["batch_stats"]}


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["batch_average", "total"])
@pytest.mark.parametrize("sizes", [(16, 16, 16, 16), (10, 22, 32)])
def test_linen_recompute_gives_the_averaged_models_statistics(variance, sizes):
    model, variables = averaged_linen_variables()
    xs = np.split(np.asarray(X), np.cumsum(sizes)[:-1])

    def forward(v, b):
        return model.apply(v, b, train=True, mutable=["batch_stats"])

    stats = averaging.recompute_batch_stats(forward, variables, xs, variance=variance)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    per_batch = hand_stats(
        (p["Dense_0"]["kernel"], p["Dense_0"]["bias"]),
        (p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]),
        (p["Dense_1"]["kernel"], p["Dense_1"]["bias"]),
        xs,
    )
    (m1, v1), (m2, v2) = expected(per_batch, variance)
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], m1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["BatchNorm_0"]["var"], v1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["bn_out"]["mean"], m2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["bn_out"]["var"], v2, rtol=1e-5, atol=1e-5)
    if variance == "batch_average" and len(sizes) == 4:  # bn_update's statistics differ from the total variance
        assert not np.allclose(v2, expected(per_batch, "total")[1][1], rtol=1e-3)
    # evaluation with the recomputed statistics normalizes by them
    out = model.apply({"params": variables["params"], "batch_stats": stats}, X[:3], train=False)
    h1 = np.asarray(X[:3], np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    r = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"], 0)
    h2 = r @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    np.testing.assert_allclose(out, (h2 - m2) / np.sqrt(v2 + EPS), rtol=1e-4, atol=1e-4)


def test_linen_recompute_errors():
    model, variables = averaged_linen_variables()

    def forward(v, b):
        return model.apply(v, b, train=True, mutable=["batch_stats"])

    with pytest.raises(ValueError, match="empty"):
        averaging.recompute_batch_stats(forward, variables, [])
    with pytest.raises(ValueError, match="variance"):
        averaging.recompute_batch_stats(forward, variables, [X], variance="unbiased")
    extra = {**variables, "batch_stats": {**variables["batch_stats"], "Other": {"mean": jnp.zeros(2)}}}
    with pytest.raises(ValueError, match="Other"):
        averaging.recompute_batch_stats(forward, extra, [X])


class NNet(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 6, rngs=rngs)
        self.bn1 = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
        self.l2 = nnx.Linear(6, 4, rngs=rngs)
        self.bn2 = nnx.BatchNorm(4, momentum=0.99, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.l2(nnx.relu(self.bn1(self.l1(x)))))


@pytest.mark.parametrize("variance", ["batch_average", "total"])
def test_nnx_recompute_in_place(variance):
    model = NNet(nnx.Rngs(0))
    model.bn1.scale[...] = model.bn1.scale[...] * 0.7
    model.eval()
    xs = np.split(np.asarray(X), [24, 40])
    assert averaging.recompute_batch_stats_nnx(model, xs, variance=variance) is model
    per_batch = hand_stats(
        (np.asarray(model.l1.kernel[...], np.float64), np.asarray(model.l1.bias[...], np.float64)),
        (np.asarray(model.bn1.scale[...], np.float64), np.asarray(model.bn1.bias[...], np.float64)),
        (np.asarray(model.l2.kernel[...], np.float64), np.asarray(model.l2.bias[...], np.float64)),
        xs,
    )
    (m1, v1), (m2, v2) = expected(per_batch, variance)
    for bn, m, v in [(model.bn1, m1, v1), (model.bn2, m2, v2)]:
        np.testing.assert_allclose(bn.mean[...], m, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.var[...], v, rtol=1e-5, atol=1e-5)
    assert model.bn1.momentum == 0.9 and model.bn2.momentum == 0.99
    assert model.bn1.use_running_average and model.bn2.use_running_average  # eval mode restored


def test_linen_and_nnx_agree_with_each_other():
    # same weights in both APIs -> same statistics
    model, variables = averaged_linen_variables()
    nmodel = NNet(nnx.Rngs(0))
    p = variables["params"]
    nmodel.l1.kernel[...], nmodel.l1.bias[...] = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    nmodel.bn1.scale[...], nmodel.bn1.bias[...] = p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]
    nmodel.l2.kernel[...], nmodel.l2.bias[...] = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
    xs = [X[:32], X[32:]]
    stats = averaging.recompute_batch_stats(
        lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"]), variables, xs
    )
    averaging.recompute_batch_stats_nnx(nmodel, xs)
    assert_trees_close(
        {"m": nmodel.bn2.mean[...], "v": nmodel.bn2.var[...]},
        {"m": stats["bn_out"]["mean"], "v": stats["bn_out"]["var"]},
        rtol=1e-5,
        atol=1e-6,
    )


def test_linen_recompute_twice_and_with_a_jitted_forward():
    # Each epoch of SWA evaluation recomputes with the same forward: the second call must not
    # reuse a cached trace (which hid the BatchNorm momenta and raised), nor may a jitted forward.
    model, variables = averaged_linen_variables()

    def forward(v, b):
        return model.apply(v, b, train=True, mutable=["batch_stats"])

    xs = [X[:32], X[32:]]
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    per_batch = hand_stats(
        (p["Dense_0"]["kernel"], p["Dense_0"]["bias"]),
        (p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]),
        (p["Dense_1"]["kernel"], p["Dense_1"]["bias"]),
        xs,
    )
    (m1, _), (m2, _) = expected(per_batch, "batch_average")
    jitted = jax.jit(forward)
    jitted(variables, X[:32])  # traced before, as a training loop would have
    for fwd in (forward, forward, jitted):
        stats = averaging.recompute_batch_stats(fwd, variables, xs)
        np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], m1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["bn_out"]["mean"], m2, rtol=1e-5, atol=1e-5)
