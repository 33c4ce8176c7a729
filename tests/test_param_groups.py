"""Per-group radii (PyTorch param groups), subsets (SAM-ON) and the norm-layer mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_batch, make_params, tmap, train, tree_norm
from sam_optax import geometry

PARAMS = make_params()
GRADS = jax.grad(loss_fn)(PARAMS, make_batch())
# Two groups as in PyTorch: the first layer (rho 0.05), the rest (rho 0.1).
LABELS = {"dense1": {"kernel": "a", "bias": "a"}, "dense2": {"kernel": "b", "bias": "b"}, "scale": "b"}
RHOS = {"a": 0.05, "b": 0.1}


def perturb(geo, grads=GRADS, params=PARAMS):
    return geo.update(grads, geo.init(params), params)[0]


def pytorch_grouped_sam(params, batch_list, labels, rhos, lr):
    """davda54/sam's first_step/second_step with param groups and plain SGD, written out."""
    for batch in batch_list:
        g = jax.grad(loss_fn)(params, batch)
        grad_norm = tree_norm(g)
        e = tmap(lambda lab, gi: gi * (rhos[lab] / (grad_norm + 1e-12)), labels, g)
        gp = jax.grad(loss_fn)(tmap(jnp.add, params, e), batch)
        params = tmap(lambda w, x: w - lr * x, params, gp)
    return params


# ---- grouped_l2 ----------------------------------------------------------------------------


def test_grouped_l2_is_the_pytorch_formula():
    norm = tree_norm(GRADS)
    expected = tmap(lambda lab, g: g * (RHOS[lab] / (norm + 1e-12)), LABELS, GRADS)
    assert_trees_close(perturb(geometry.grouped_l2(LABELS, RHOS)), expected)


def test_grouped_l2_trains_like_pytorch_param_groups_over_two_steps():
    data = batches(2, seed=11)
    ours, _ = train(sam_optax.sam(optax.sgd(0.1)), geometry.grouped_l2(LABELS, RHOS), PARAMS, data)
    assert_trees_close(ours, pytorch_grouped_sam(PARAMS, data, LABELS, RHOS, 0.1), rtol=1e-5, atol=1e-6)


def test_group_with_rho_zero_is_unperturbed_but_counts_in_the_norm():
    eps = perturb(geometry.grouped_l2(LABELS, {"a": 0.0, "b": 0.1}))
    for leaf in jax.tree.leaves(eps["dense1"]):
        np.testing.assert_array_equal(leaf, 0.0)
    norm = tree_norm(GRADS)  # the global norm, dense1 included
    assert_trees_close(eps["dense2"], tmap(lambda g: g * (0.1 / (norm + 1e-12)), GRADS["dense2"]))
    # a zero radius for the whole tree: nothing moves
    for leaf in jax.tree.leaves(perturb(geometry.grouped_l2(lambda p: tmap(lambda _: "x", p), {"x": 0.0}))):
        np.testing.assert_array_equal(leaf, 0.0)


def test_grouped_l2_one_group_is_l2_and_callable_labels_work():
    one = geometry.grouped_l2(lambda p: tmap(lambda _: "all", p), {"all": 0.07})
    assert_trees_close(perturb(one), perturb(geometry.l2(0.07)))
    prefix = geometry.grouped_l2({"dense1": "a", "dense2": "b", "scale": "b"}, RHOS)  # a prefix tree
    assert_trees_close(perturb(prefix), perturb(geometry.grouped_l2(LABELS, RHOS)))


def test_grouped_l2_norm_is_one_on_the_ellipsoid():
    geo = geometry.grouped_l2(LABELS, RHOS)
    eps = perturb(geo)
    np.testing.assert_allclose(geo.norm(eps, GRADS, PARAMS), 1.0, rtol=1e-5)
    pairs = zip(jax.tree.leaves(LABELS), jax.tree.leaves(eps))
    by_hand = jnp.sqrt(sum(jnp.sum(e**2) / RHOS[lab] ** 2 for lab, e in pairs))
    np.testing.assert_allclose(geo.norm(eps, GRADS, PARAMS), by_hand, rtol=1e-6)
    # a group of radius 0 leaves the ball's sphere: N = ||g_(rho>0)|| / ||g||
    geo0 = geometry.grouped_l2(LABELS, {"a": 0.0, "b": 0.1})
    eps0 = perturb(geo0)
    np.testing.assert_allclose(
        geo0.norm(eps0, GRADS, PARAMS), tree_norm([GRADS["dense2"], GRADS["scale"]]) / tree_norm(GRADS), rtol=1e-5
    )


@pytest.mark.slow
def test_grouped_l2_multistep_with_equal_radii_is_l2_multistep():
    data = batches(2, seed=5)
    tx = sam_optax.sam(optax.sgd(0.1))
    same = geometry.grouped_l2(lambda p: tmap(lambda _: 0, p), {0: 0.05})
    a, _ = train(tx, same, PARAMS, data, ascent_steps=3)
    b, _ = train(tx, geometry.l2(0.05), PARAMS, data, ascent_steps=3)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_l2_schedules_follow_the_step_and_have_no_norm():
    geo = geometry.grouped_l2(LABELS, {"a": optax.linear_schedule(0.0, 0.2, 2), "b": 0.1})
    assert geo.norm is None
    state = geo.init(PARAMS)
    norm = tree_norm(GRADS)
    for rho_a in [0.0, 0.1, 0.2]:
        eps, state = jax.jit(geo.update)(GRADS, state, PARAMS)
        assert_trees_close(eps["dense1"], tmap(lambda g: g * (rho_a / (norm + 1e-12)), GRADS["dense1"]))
        assert_trees_close(eps["dense2"], tmap(lambda g: g * (0.1 / (norm + 1e-12)), GRADS["dense2"]))


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: geometry.grouped_l2(LABELS, {}), "rho"),
        (lambda: geometry.grouped_l2(LABELS, 0.1), "rho"),
        (lambda: geometry.grouped_l2(LABELS, {"a": -0.1, "b": 0.1}), "rho"),
        (lambda: geometry.grouped_l2(LABELS, RHOS, eps=-1.0), "eps"),
        (lambda: geometry.grouped_l2(LABELS, {"a": 0.1}).init(PARAMS), "rho"),  # no radius for 'b'
    ],
)
def test_grouped_l2_bad_input_raises(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


# ---- only / SAM-ON -----------------------------------------------------------------------


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Dense(8)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(x)


def _norm_net():
    variables = NormNet().init(jax.random.PRNGKey(0), jnp.ones((4, 5)))
    params = variables["params"]
    batch = make_batch(seed=3)

    def loss(p):
        logits, _ = NormNet().apply(
            {"params": p, "batch_stats": variables["batch_stats"]}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return params, jax.grad(loss)(params)


@pytest.mark.slow
def test_norm_layer_mask_marks_scale_and_bias_of_norm_layers_only():
    params, _ = _norm_net()
    mask = geometry.norm_layer_mask(params)
    selected = {jax.tree_util.keystr(k) for k, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    assert selected == {
        "['BatchNorm_0']['bias']",
        "['BatchNorm_0']['scale']",
        "['LayerNorm_0']['bias']",
        "['LayerNorm_0']['scale']",
    }
    names = {
        "bn1": {"scale": 0, "bias": 0},
        "subnet": {"bias": 0},
        "ln_f": {"scale": 0},
        "norms": [{"scale": 0}],
        "PreNormBlock": {"Dense_0": {"bias": 0}},
        "gn": {"kernel": 0},
    }
    got = geometry.norm_layer_mask(names)
    assert got == {
        "bn1": {"scale": True, "bias": True},
        "subnet": {"bias": False},
        "ln_f": {"scale": True},
        "norms": [{"scale": True}],
        "PreNormBlock": {"Dense_0": {"bias": False}},
        "gn": {"kernel": False},
    }


def test_norm_layer_mask_on_an_nnx_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    mask = geometry.norm_layer_mask(state)
    flags = {jax.tree_util.keystr(k): m for k, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {k for k, m in flags.items() if m} == {
        "['bn']['bias'].value",
        "['bn']['scale'].value",
        "['norm']['bias'].value",
        "['norm']['scale'].value",
    }
    geo = geometry.only(geometry.l2(0.1), geometry.norm_layer_mask)
    grads = jax.tree.map(jnp.ones_like, state)
    eps, _ = geo.update(grads, geo.init(state), state)
    np.testing.assert_allclose(tree_norm(eps), 0.1, rtol=1e-6)
    np.testing.assert_array_equal(eps["lin"]["kernel"][...], 0.0)


def test_sam_on_perturbs_only_norm_layers_with_the_subset_norm():
    params, grads = _norm_net()
    rho = 0.3
    geo = geometry.only(geometry.l2(rho), geometry.norm_layer_mask)
    eps, _ = geo.update(grads, geo.init(params), params)
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        for leaf in jax.tree.leaves(eps[name]):
            np.testing.assert_array_equal(leaf, 0.0)
    subset = {k: grads[k] for k in ("BatchNorm_0", "LayerNorm_0")}
    np.testing.assert_allclose(tree_norm({k: eps[k] for k in subset}), rho, rtol=1e-6)
    by_hand = tmap(lambda g: rho * g / (tree_norm(subset) + 1e-12), subset)  # l2 on the subset tree
    assert_trees_close({k: eps[k] for k in subset}, by_hand)
    np.testing.assert_allclose(geo.norm(eps, grads, params), rho, rtol=1e-6)


def test_only_with_adaptive_and_a_bool_tree_and_jit():
    mask = {"dense1": {"kernel": False, "bias": True}, "dense2": {"kernel": True, "bias": False}, "scale": False}
    geo = geometry.only(geometry.adaptive(0.5, eta=0.1), mask)
    eps, _ = jax.jit(geo.update)(GRADS, geo.init(PARAMS), PARAMS)
    sub_g = [GRADS["dense1"]["bias"], GRADS["dense2"]["kernel"]]
    sub_t = [jnp.abs(PARAMS["dense1"]["bias"]) + 0.1, jnp.abs(PARAMS["dense2"]["kernel"]) + 0.1]
    denom = tree_norm([t * g for t, g in zip(sub_t, sub_g)]) + 1e-12
    np.testing.assert_allclose(eps["dense1"]["bias"], 0.5 * sub_t[0] ** 2 * sub_g[0] / denom, rtol=1e-5)
    np.testing.assert_allclose(eps["dense2"]["kernel"], 0.5 * sub_t[1] ** 2 * sub_g[1] / denom, rtol=1e-5)
    for leaf in (eps["dense1"]["kernel"], eps["dense2"]["bias"], eps["scale"]):
        np.testing.assert_array_equal(leaf, 0.0)
        assert leaf.dtype == jnp.float32


def test_only_keeps_the_inner_schedule_state_and_all_true_is_the_inner_geometry():
    geo = geometry.only(geometry.l2(optax.linear_schedule(0.1, 0.3, 2)), lambda p: tmap(lambda _: True, p))
    state = geo.init(PARAMS)
    for rho in (0.1, 0.2):
        eps, state = geo.update(GRADS, state, PARAMS)
        np.testing.assert_allclose(tree_norm(eps), rho, rtol=1e-6)
    assert int(state.count) == 2


def test_only_rejects_a_non_geometry():
    with pytest.raises(ValueError, match="geometry"):
        geometry.only(0.05, {"w": True})
