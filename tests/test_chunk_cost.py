"""m-sharpness chunks at SAM's cost: the layout ``chunk_mode='auto'`` picks, and
the temporaries of vmapped chunks (no second copy of the per-chunk gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax import geometry
from sam_optax.data import _layout

RNG = np.random.default_rng(0)
SIZES = [(20, 64), (64, 64), (64, 10)]
MLP_PARAMS = [{"w": jnp.asarray(RNG.normal(size=s) * 0.1, jnp.float32), "b": jnp.zeros(s[1])} for s in SIZES]
MLP_BATCH = {
    "x": jnp.asarray(RNG.normal(size=(32, 20)), jnp.float32),
    "y": jnp.asarray(RNG.normal(size=(32, 10)), jnp.float32),
}
CONV_PARAMS = {
    "k": jnp.asarray(RNG.normal(size=(3, 1, 4)) * 0.3, jnp.float32),
    "w": jnp.asarray(RNG.normal(size=(4 * 16, 2)) * 0.1, jnp.float32),
}
CONV_BATCH = {
    "x": jnp.asarray(RNG.normal(size=(16, 16, 1)), jnp.float32),
    "y": jnp.asarray(RNG.normal(size=(16, 2)), jnp.float32),
}


def mlp_loss(p, b):
    h = b["x"]
    for i, layer in enumerate(p):
        h = h @ layer["w"] + layer["b"]
        h = jax.nn.relu(h) if i < len(p) - 1 else h
    return jnp.mean((h - b["y"]) ** 2)


@jax.jit  # a convolution nested in a pjit: found in the nested jaxpr
def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


def conv_loss(p, b):
    h = jnp.tanh(conv(b["x"], p["k"]))
    return jnp.mean((h.reshape((h.shape[0], -1)) @ p["w"] - b["y"]) ** 2)


def test_auto_mode_per_model_on_cpu():
    assert jax.default_backend() == "cpu"

    def chunks(batch, n):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), batch)

    assert _layout.auto_mode(lambda b: conv_loss(CONV_PARAMS, b), chunks(CONV_BATCH, 4)) == "unroll"
    assert _layout.auto_mode(lambda b: mlp_loss(MLP_PARAMS, b), chunks(MLP_BATCH, 4)) == "vmap"
    # too many chunks to unroll: vmap
    assert _layout.auto_mode(lambda b: conv_loss(CONV_PARAMS, b), chunks(CONV_BATCH, _layout.MAX_UNROLL + 1)) == "vmap"


def test_auto_is_the_default_and_validated():
    assert sam_optax.data.shards(4).chunk_mode == "auto"
    with pytest.raises(ValueError, match="chunk_mode must be 'auto', 'vmap', 'unroll' or 'scan'"):
        sam_optax.data.shards(4, chunk_mode="fast")


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss, params, batch, picked",
    [(conv_loss, CONV_PARAMS, CONV_BATCH, "unroll"), (mlp_loss, MLP_PARAMS, MLP_BATCH, "vmap")],
)
def test_auto_gives_the_layout_it_picks(loss, params, batch, picked):
    """'auto' traces the program of the layout it picks (the same jaxpr) and the same numbers as vmap."""

    def grads(mode):
        return sam_optax.sharpness_aware_grad(loss, geometry.l2(0.1), sam_optax.data.shards(4, chunk_mode=mode))

    def op_counts(mode):  # {primitive: count} over the jaxpr and its nested jaxprs
        counts = {}

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jax.make_jaxpr(grads(mode))(params, batch).jaxpr)
        return counts

    other = "vmap" if picked == "unroll" else "unroll"
    assert op_counts("auto") == op_counts(picked) != op_counts(other)
    a, v = jax.jit(grads("auto"))(params, batch), jax.jit(grads("vmap"))(params, batch)
    for x, y in zip(jax.tree.leaves(a.perturbed_grads), jax.tree.leaves(v.perturbed_grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_vmapped_chunks_keep_one_copy_of_the_per_chunk_gradients():
    """XLA's temporaries of 8 vmapped chunks stay under 10 params' worth (8 per-chunk
    gradients + slack). The overflow-safe L2 direction written as ``(x / d) / den``
    made XLA keep ``x / d`` alongside the gradients: 15.8 params' worth (issue 12)."""
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(MLP_PARAMS))
    fn = sam_optax.sharpness_aware_grad(mlp_loss, geometry.l2(0.05), sam_optax.data.shards(4, chunk_mode="vmap"))
    temp = jax.jit(fn).lower(MLP_PARAMS, MLP_BATCH).compile().memory_analysis().temp_size_in_bytes
    assert temp <= 10 * param_bytes, temp / param_bytes
