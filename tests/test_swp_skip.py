"""ESAM's SWP skipping the masked tensors' weight gradients (sam_optax.swp)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import geometry, swp
from sam_optax.geometry._stochastic import keep_bits, sample_mask


def _mlp_params(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "l1": {"kernel": jax.random.normal(k1, (6, 8)) * 0.5, "bias": jnp.zeros(8)},
        "l2": {"kernel": jax.random.normal(k2, (8, 8)) * 0.5, "bias": jnp.full(8, 0.1)},
        "l3": {"kernel": jax.random.normal(k3, (8, 3)) * 0.5},
    }


def _per_example(p, batch):
    h = jnp.tanh(batch["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jnp.tanh(jnp.dot(h, p["l2"]["kernel"]) + p["l2"]["bias"])  # jnp.dot: a jit-wrapped dot_general
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["l3"]["kernel"], batch["y"])


def _batch(n=16):
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 6))
    return {"x": x, "y": jnp.arange(n) % 3}


def _geo(normalize="masked", granularity="tensor"):
    return geometry.stochastic(geometry.l2(0.1), 0.5, normalize=normalize, granularity=granularity, seed=3)


@pytest.mark.slow
def test_skip_weight_grads_is_masked_gradient():
    params, batch = _mlp_params(jax.random.PRNGKey(0)), _batch()

    def loss(p, b):
        return _per_example(p, b).mean()

    g = jax.grad(loss)(params, batch)
    keep = {"l1": {"kernel": False, "bias": True}, "l2": {"kernel": True, "bias": False}, "l3": {"kernel": False}}
    gs = jax.jit(jax.grad(swp.skip_weight_grads(loss, keep)))(params, batch)
    for (path, a), b, k in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(gs), jax.tree.leaves(keep)):
        want = a if k else jnp.zeros_like(a)
        np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    # the value is unchanged
    np.testing.assert_allclose(swp.skip_weight_grads(loss, keep)(params, batch), loss(params, batch), rtol=1e-6)


def test_skipped_kernel_gradient_is_not_computed():
    # x^T ct overflows float32 (two rows of 3e38): the kernel gradient, when computed, is inf and
    # its masking (g * 0) NaN, as in today's SWP; skipped, it is never computed: exactly 0.
    x = jnp.zeros((4, 2)).at[:2, 0].set(3e38)
    p = {"k": jnp.full((2, 1), 1e-38), "b": jnp.zeros(1)}

    def loss(p, x):
        return jnp.sum(x @ p["k"] + p["b"])

    assert np.isfinite(loss(p, x))
    off = {"k": jnp.array(False), "b": jnp.array(True)}
    g_skip = jax.jit(jax.grad(swp.skip_weight_grads(loss, off)))(p, x)
    assert np.all(np.asarray(g_skip["k"]) == 0.0) and float(g_skip["b"][0]) == 4.0
    g_dot_only_conv = jax.grad(swp.skip_weight_grads(loss, off, ("conv_general_dilated",)))(p, x)
    assert np.isnan(np.asarray(g_dot_only_conv["k"])).any()  # not skipped: computed, then masked
    on = {"k": jnp.array(True), "b": jnp.array(True)}
    assert np.isinf(np.asarray(jax.grad(swp.skip_weight_grads(loss, on))(p, x)["k"])).any()


@pytest.mark.slow
def test_conv_kernel_skipped_and_exact():
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    p = {"c": jax.random.normal(k1, (3, 3, 2, 4)), "d": jax.random.normal(k2, (4, 2))}

    def loss(p, x):
        y = jax.lax.conv_general_dilated(x, p["c"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y).mean((1, 2)) @ p["d"])

    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 2))
    g = jax.grad(loss)(p, x)
    keep = {"c": jnp.array(False), "d": jnp.array(True)}
    gs = jax.grad(swp.skip_weight_grads(loss, keep, ("conv_general_dilated", "dot_general")))(p, x)
    assert np.all(np.asarray(gs["c"]) == 0.0)
    np.testing.assert_allclose(gs["d"], g["d"], rtol=1e-5)
    hlo = jax.jit(jax.grad(swp.skip_weight_grads(loss, keep))).lower(p, x).as_text()
    assert "conditional" in hlo or "case" in hlo


def test_keep_bits_are_the_geometry_masks():
    params = _mlp_params(jax.random.PRNGKey(0))
    geo = _geo()
    state = geo.init(params)

    @jax.jit
    def bits_and_mask(state):
        _, sub = jax.random.split(state.key)
        return (
            keep_bits(state, params, 0.5),
            sample_mask(sub, params, 0.5, "tensor"),
            geo.update(params, state, params)[1],
        )

    seen = set()
    for _ in range(3):
        bits, mask, state = bits_and_mask(state)
        for b, m in zip(jax.tree.leaves(bits), jax.tree.leaves(mask)):
            assert np.all(np.asarray(m) == float(b))
        seen.add(tuple(bool(b) for b in jax.tree.leaves(bits)))
    assert len(seen) > 1  # the masks change from step to step


@pytest.mark.slow
def test_same_update_as_todays_swp():
    params, batch = _mlp_params(jax.random.PRNGKey(0)), _batch()
    data = sam_optax.data.shards(selection=sam_optax.data.sharpness_sensitive(0.5))
    tx = sam_optax.sam(optax.sgd(0.1, momentum=0.9))
    ref_init, ref_step = sam_optax.sharpness_aware_step(_per_example, tx, _geo(), data)
    init, step = swp.swp_step(_per_example, tx, _geo(), data, skip=True)
    ref_step, step = jax.jit(ref_step), jax.jit(step)
    p_ref, s_ref, p, s = params, ref_init(params), params, init(params)
    skipped = 0
    for _ in range(4):
        bits = jax.tree.leaves(keep_bits(s.ascent_state, params, 0.5))
        p_ref, s_ref, o_ref = ref_step(p_ref, s_ref, batch)
        p, s, o = step(p, s, batch)
        skipped += sum(not bool(b) for b in bits)
        masked_ref = [g * b for g, b in zip(jax.tree.leaves(o_ref.grads), bits)]  # out.grads is m * g
        for a, b in zip(
            jax.tree.leaves((p, o.grads, o.perturbed_grads, o.perturbed_loss)),
            jax.tree.leaves((p_ref, masked_ref, o_ref.perturbed_grads, o_ref.perturbed_loss)),
        ):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(s.ascent_state.key, s_ref.ascent_state.key)
    assert 0 < skipped < 4 * 5  # some tensors were masked out, not all


@pytest.mark.slow
def test_rules_reading_the_clean_gradient_are_rejected():
    params, batch = _mlp_params(jax.random.PRNGKey(0)), _batch()
    base = optax.sgd(0.1)
    for tx in (sam_optax.wsam(base, 0.9, learning_rate=0.1), sam_optax.gsam(base, 0.3), sam_optax.looksam(base, 3)):
        init, step = swp.swp_step(_per_example, tx, _geo())
        with pytest.raises(ValueError, match="reads the clean gradient"):
            jax.jit(step)(params, init(params), batch)
    # without skipping, the same rule is fine (exactly sharpness_aware_step)
    init, step = swp.swp_step(_per_example, sam_optax.gsam(base, 0.3), _geo(), skip=False)
    jax.jit(step)(params, init(params), batch)


def test_bad_geometry_and_skip_rejected():
    tx = sam_optax.sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="normalize"):
        swp.swp_step(_per_example, tx, _geo(normalize="full"))
    with pytest.raises(ValueError, match="granularity"):
        swp.swp_step(_per_example, tx, _geo(granularity="coordinate"))
    with pytest.raises(ValueError, match="geometry"):
        swp.swp_step(_per_example, tx, geometry.l2(0.1))
    with pytest.raises(ValueError, match="skip"):
        swp.swp_step(_per_example, tx, _geo(), skip="yes")
    with pytest.raises(ValueError, match="primitives"):
        swp.skip_weight_grads(_per_example, {}, ("add",))
    assert swp.default_skipped_primitives("cpu") == ("dot_general",)
    assert "conv_general_dilated" in swp.default_skipped_primitives("gpu")


def test_skipping_needs_every_second_pass():
    """With skipped clean-pass gradients, a step without its second pass would update SAM with
    the masked clean gradient (silently wrong): a literal False and a scheduler's flag raise."""
    params, batch = _mlp_params(jax.random.PRNGKey(0)), _batch()
    init, step = swp.swp_step(_per_example, sam_optax.sam(optax.sgd(0.1)), _geo(), skip=True)
    with pytest.raises(ValueError, match="second_pass must be True"):
        jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))(params, init(params), batch)
    # a scheduler around sam: its skipped steps read the clean gradient, rejected as such
    init, step = swp.swp_step(_per_example, sam_optax.periodic(sam_optax.sam(optax.sgd(0.1)), 2), _geo(), skip=True)
    with pytest.raises(ValueError, match="reads the clean gradient"):
        jax.jit(step)(params, init(params), batch)
