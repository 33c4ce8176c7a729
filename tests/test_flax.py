"""Flax integration: the Linen TrainState and train step, the NNX optimizer and
train step (BatchNorm, dropout, m-sharpness shards), orbax checkpoint resume."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType

import sam_optax
from helpers import assert_trees_close, tmap, tree_norm
from sam_optax import geometry
from sam_optax.flax import (
    SharpnessAwareOptimizer,
    TrainState,
    linen_train_step,
    nnx_sharpness_aware_grad,
    nnx_train_step,
)

RHO, LR = 0.1, 0.1


def make_data(seed, n=32):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (n, 5))
    return {"x": x, "y": (jnp.argmax(x[:, :3], axis=1) + (x[:, 3] > 1.0)) % 3}


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# --------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------


class Net(nn.Module):
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


def linen_loss(apply, batch):
    return ce(apply(batch["x"], train=True), batch["y"])


_NETS = {}


def linen_state(tx, geo, dropout=0.5, seed=0):
    model = _NETS.setdefault(dropout, Net(dropout))  # one model: one static apply_fn
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 5)), train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, geometry=geo, batch_stats=variables["batch_stats"]
    )


@jax.jit
def _chunk_sam_by_hand(params, batch_stats, chunk, key):
    model = Net(0.5)

    def loss(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": batch_stats},
            chunk["x"],
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        return ce(logits, chunk["y"]), upd["batch_stats"]

    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    pert = tmap(lambda p, gi: p + RHO * gi / (tree_norm(g) + 1e-12), params, g)
    return jax.grad(lambda p: loss(p)[0])(pert), stats


def linen_by_hand(state, batch, keys):
    """One SAM-SGD step written out: per contiguous chunk with its own key, both
    passes with that key, BatchNorm statistics of the clean passes averaged."""
    m = batch["x"].shape[0] // len(keys)
    chunks = [jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch) for i in range(len(keys))]
    out = [_chunk_sam_by_hand(state.params, state.batch_stats, c, k) for c, k in zip(chunks, keys)]

    def mean(ts):
        return tmap(lambda *xs: sum(xs) / len(xs), *ts)

    return tmap(lambda p, g: p - LR * g, state.params, mean([o[0] for o in out])), mean([o[1] for o in out])


def shard_key(rng, first_example):
    # documented: fold_in(rng, index of the shard's first example), then collection number 0
    return jax.random.fold_in(jax.random.fold_in(rng, first_example), 0)


@pytest.mark.slow
def test_linen_step_is_sam_with_clean_pass_batch_stats_and_shared_dropout_key():
    state = linen_state(sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    batch, rng = make_data(0), jax.random.PRNGKey(42)
    new, metrics = linen_train_step(linen_loss)(state, batch, rng)
    want_params, want_stats = linen_by_hand(state, batch, [shard_key(rng, 0)])
    assert_trees_close(new.params, want_params, rtol=1e-5, atol=1e-6)
    assert_trees_close(new.batch_stats, want_stats, rtol=1e-5, atol=1e-6)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["sharpness"], metrics["perturbed_loss"] - metrics["loss"], rtol=1e-6)
    assert float(metrics["sharpness"]) > 0
    # another key (another dropout mask) gives another step: the key choice is what is tested
    other, _ = linen_by_hand(state, batch, [jax.random.fold_in(rng, 1)])
    assert tree_norm(tmap(jnp.subtract, other, want_params)) > 1e-3


@pytest.mark.slow
def test_linen_m_sharpness_ghost_batchnorm_and_per_shard_keys():
    state = linen_state(sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    batch, rng = make_data(1), jax.random.PRNGKey(7)
    new, _ = linen_train_step(linen_loss, data=sam_optax.data.shards(m=8))(state, batch, rng)
    want_params, want_stats = linen_by_hand(state, batch, [shard_key(rng, 8 * i) for i in range(4)])
    assert_trees_close(new.params, want_params, rtol=1e-5, atol=1e-6)
    # the stored statistics are the mean of the per-shard (ghost) updates, not the full-batch update
    assert_trees_close(new.batch_stats, want_stats, rtol=1e-5, atol=1e-6)
    _, full_stats = linen_by_hand(state, batch, [shard_key(rng, 0)])

    def var(s):
        return s["BatchNorm_0"]["var"]

    assert np.abs(np.asarray(var(full_stats) - var(want_stats))).max() > 1e-4


@pytest.mark.slow
@pytest.mark.multidevice
def test_linen_step_over_a_mesh_equals_chunks_on_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    state = linen_state(sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    batch, rng = make_data(2), jax.random.PRNGKey(3)
    on_mesh, _ = linen_train_step(linen_loss, data=sam_optax.data.shards(mesh=mesh))(state, batch, rng)
    chunks, _ = linen_train_step(linen_loss, data=sam_optax.data.shards(m=4))(state, batch, rng)
    assert_trees_close(on_mesh.params, chunks.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(on_mesh.batch_stats, chunks.batch_stats, rtol=1e-5, atol=1e-6)


def test_linen_apply_gradients_requires_perturbed_grads():
    state = linen_state(sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    with pytest.raises(TypeError, match="perturbed_grads"):
        state.apply_gradients(grads=state.params)
    with pytest.raises(ValueError, match="geometry"):
        TrainState.create(apply_fn=None, params={}, tx=optax.sgd(0.1), geometry=None)


def run_linen(state, step, data, rngs):
    for b, r in zip(data, rngs):
        state, metrics = step(state, b, r)
    return state, metrics


@pytest.mark.slow
def test_linen_orbax_resume_is_bit_identical(tmp_path):
    sched = optax.cosine_decay_schedule(1e-2, 8)
    tx = sam_optax.wsam(optax.adam(sched), 0.9, learning_rate=sched)
    geo = geometry.l2(optax.linear_schedule(0.02, 0.1, 8))

    def make(seed):
        return linen_state(tx, geo, seed=seed)  # same static tx / geometry: no recompilation

    data = [make_data(10 + i) for i in range(6)]
    rngs = [jax.random.PRNGKey(100 + i) for i in range(6)]
    step = linen_train_step(linen_loss)
    first_loss = float(step(make(0), data[0], rngs[0])[1]["loss"])
    full, metrics = run_linen(make(0), step, data, rngs)
    assert float(metrics["loss"]) < first_loss  # it trains
    assert step._cache_size() == 1  # one compilation for all the steps

    half, _ = run_linen(make(0), step, data[:3], rngs[:3])
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "linen", half)
    ckpt.wait_until_finished()
    fresh = make(1)  # other weights: everything must come from the checkpoint
    restored = ckpt.restore(tmp_path / "linen", jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh))
    assert type(restored) is TrainState and type(restored.opt_state) is type(half.opt_state)
    assert int(restored.ascent_state.count) == 3
    resumed, _ = run_linen(restored, step, data[3:], rngs[3:])
    assert_trees_close(jax.tree.leaves(resumed), jax.tree.leaves(full), rtol=0, atol=0)


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------


class NNet(nnx.Module):
    def __init__(self, rngs, dropout=0.5):
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.do = nnx.Dropout(dropout, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.do(nnx.relu(self.bn(self.l1(x)))))


def nnx_loss(model, batch):
    return ce(model(batch["x"]), batch["y"])


def nnx_from_linen(state):
    """An NNX model with the weights and statistics of a (dropout-free) Linen state."""
    model = NNet(nnx.Rngs(0), dropout=0.0)
    p, s = state.params, state.batch_stats
    for dst, src in ((model.l1, p["Dense_0"]), (model.l2, p["Dense_1"])):
        dst.kernel[...], dst.bias[...] = src["kernel"], src["bias"]
    model.bn.scale[...], model.bn.bias[...] = p["BatchNorm_0"]["scale"], p["BatchNorm_0"]["bias"]
    model.bn.mean[...], model.bn.var[...] = s["BatchNorm_0"]["mean"], s["BatchNorm_0"]["var"]
    return model


@pytest.mark.slow
def test_nnx_step_equals_the_linen_step_and_updates_batchnorm_once():
    def tx():
        return sam_optax.sam(optax.sgd(LR, momentum=0.9))

    state = linen_state(tx(), geometry.l2(RHO), dropout=0.0)
    model = nnx_from_linen(state)
    optimizer = SharpnessAwareOptimizer(model, tx(), geometry.l2(RHO), wrt=nnx.Param)
    lstep, nstep = linen_train_step(linen_loss), nnx_train_step(nnx_loss)
    for i in range(2):
        batch = make_data(20 + i)
        h = batch["x"] @ model.l1.kernel[...] + model.l1.bias[...]
        want_mean = 0.9 * model.bn.mean[...] + 0.1 * h.mean(0)  # one momentum step, clean pass
        state, lm = lstep(state, batch)
        nm = nstep(model, optimizer, batch)
        np.testing.assert_allclose(model.bn.mean[...], want_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(nm["loss"], lm["loss"], rtol=1e-5)
    p = state.params
    np.testing.assert_allclose(model.l1.kernel[...], p["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.l2.bias[...], p["Dense_1"]["bias"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.scale[...], p["BatchNorm_0"]["scale"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], state.batch_stats["BatchNorm_0"]["var"], rtol=1e-5, atol=1e-6)
    assert int(optimizer.step[...]) == 2


@pytest.mark.slow
def test_nnx_dropout_mask_shared_by_both_passes_and_rng_counts_advance_once():
    model = NNet(nnx.Rngs(0, dropout=1))
    batch = make_data(3)
    out = nnx_sharpness_aware_grad(nnx_loss, geometry.l2(RHO))(model, batch)

    # by hand: one copy of the rng state, keys folded with the first example index 0
    graphdef, params, keys, rest = nnx.split(model, nnx.Param, nnx.RngKey, ...)
    keys0 = jax.tree.map(lambda k: jax.random.fold_in(k, 0), keys)

    @jax.jit
    @jax.grad
    def grad_at(p, rest_state):
        return nnx_loss(nnx.merge(graphdef, p, keys0, rest_state, copy=True), batch)

    g = grad_at(params, rest)
    pert = tmap(lambda p, gi: p + RHO * gi / (tree_norm(g) + 1e-12), params, g)
    assert_trees_close(out.grads, g, rtol=1e-5, atol=1e-6)
    assert_trees_close(out.perturbed_grads, grad_at(pert, rest), rtol=1e-5, atol=1e-6)
    # a perturbed pass with the *next* dropout mask would differ
    advanced = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.uint32 else x, rest)
    assert tree_norm(tmap(jnp.subtract, grad_at(pert, advanced), out.perturbed_grads)) > 1e-3

    optimizer = SharpnessAwareOptimizer(model, sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    step = nnx_train_step(nnx_loss, data=sam_optax.data.shards(m=8))
    before = int(model.do.rngs.count[...])
    step(model, optimizer, batch)
    step(model, optimizer, make_data(4))
    assert int(model.do.rngs.count[...]) == before + 2  # one dropout draw per step, not per pass or shard


_SCHED = optax.cosine_decay_schedule(1e-2, 8)
_NNX_TX = sam_optax.wsam(optax.adam(_SCHED), 0.9, learning_rate=_SCHED)
_NNX_GEO = geometry.l2(optax.linear_schedule(0.02, 0.1, 8))


def nnx_make(seed):
    model = NNet(nnx.Rngs(seed, dropout=seed + 1))
    return model, SharpnessAwareOptimizer(model, _NNX_TX, _NNX_GEO)


@pytest.mark.slow
def test_nnx_trains_and_orbax_resume_is_bit_identical(tmp_path):
    data = [make_data(30 + i) for i in range(6)]
    step = nnx_train_step(nnx_loss)
    model, opt = nnx_make(0)
    losses = [float(step(model, opt, b)["loss"]) for b in data]
    assert losses[-1] < losses[0]
    full = nnx.state((model, opt))

    model, opt = nnx_make(0)
    for b in data[:3]:
        step(model, opt, b)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "nnx", nnx.state((model, opt)))
    ckpt.wait_until_finished()
    model2, opt2 = nnx_make(5)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state((model2, opt2)))
    nnx.update((model2, opt2), ckpt.restore(tmp_path / "nnx", abstract))
    assert int(opt2.ascent_state.count[...]) == 3 and int(opt2.step[...]) == 3
    for b in data[3:]:
        step(model2, opt2, b)
    resumed = nnx.state((model2, opt2))
    assert jax.tree.structure(resumed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_linen_step_forwards_every_two_pass_option_esam_sds():
    """Options of sharpness_aware_grad reach the Linen helper (here ESAM's data selection)."""
    import flax.linen as nn
    import optax

    import sam_optax
    from sam_optax.data import sharpness_sensitive
    from sam_optax.flax import TrainState, linen_train_step

    model = nn.Dense(3)
    x = jax.random.normal(jax.random.PRNGKey(0), (32, 5))
    batch = {"x": x, "y": jnp.argmax(x[:, :3], axis=1)}
    params = model.init(jax.random.PRNGKey(1), x[:1])["params"]
    tx, geo = sam_optax.sam(optax.sgd(0.1)), sam_optax.geometry.l2(0.1)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, geometry=geo)

    def per_example(apply, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(b["x"]), b["y"])

    step = linen_train_step(per_example, data=sam_optax.data.shards(selection=sharpness_sensitive(0.5), m=16))
    state, _ = step(state, batch)

    def pure(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, b["x"]), b["y"])

    init, pure_step = sam_optax.sharpness_aware_step(
        pure, tx, geo, data=sam_optax.data.shards(selection=sharpness_sensitive(0.5), m=16)
    )
    want, _, _ = pure_step(params, init(params), batch)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _counting(loss, calls):
    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return loss(*args)

    return counted


@pytest.mark.slow
def test_linen_and_nnx_steps_skip_the_second_pass_of_a_scheduler():
    """periodic(sam, every=2): steps 1 and 3 run one pass and are base steps, 2 and 4 are SAM
    steps; "auto" equals literal flags step by step, NNX equals Linen, and passes are counted."""

    def tx():
        return sam_optax.periodic(sam_optax.sam(optax.sgd(LR, momentum=0.9)), every=2)

    data = [make_data(40 + i) for i in range(4)]
    flags = [False, True, False, True]
    calls = []
    auto = linen_state(tx(), geometry.l2(RHO), dropout=0.0)
    model = nnx_from_linen(auto)
    optimizer = SharpnessAwareOptimizer(model, tx(), geometry.l2(RHO))
    literal = linen_state(sam_optax.sam(optax.sgd(LR, momentum=0.9)), geometry.l2(RHO), dropout=0.0)
    lstep, nstep = linen_train_step(_counting(linen_loss, calls)), nnx_train_step(_counting(nnx_loss, calls))
    ref_step = linen_train_step(linen_loss)
    for batch, flag in zip(data, flags):
        before = len(calls)
        auto, metrics = lstep(auto, batch)
        jax.effects_barrier()
        assert len(calls) - before == 1 + flag
        assert (float(metrics["sharpness"]) == 0.0) == (not flag)
        before = len(calls)
        nstep(model, optimizer, batch)
        jax.effects_barrier()
        assert len(calls) - before == 1 + flag
        literal, _ = ref_step(literal, batch, second_pass=flag)
        assert_trees_close(auto.params, literal.params, rtol=1e-6, atol=1e-7)
    p = auto.params
    np.testing.assert_allclose(model.l1.kernel[...], p["Dense_0"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.bn.mean[...], auto.batch_stats["BatchNorm_0"]["mean"], rtol=1e-5, atol=1e-6)
    # the base steps really were base steps: SAM on every step ends elsewhere
    always = linen_state(sam_optax.sam(optax.sgd(LR, momentum=0.9)), geometry.l2(RHO), dropout=0.0)
    for batch in data:
        always, _ = ref_step(always, batch)
    assert tree_norm(tmap(jnp.subtract, always.params, auto.params)) > 1e-4
    # a boolean array decides at run time, in one more program
    arr_state, _ = ref_step(
        linen_state(sam_optax.sam(optax.sgd(LR, momentum=0.9)), geometry.l2(RHO), dropout=0.0),
        data[0],
        second_pass=jnp.asarray(False),
    )
    first, _ = ref_step(
        linen_state(sam_optax.sam(optax.sgd(LR, momentum=0.9)), geometry.l2(RHO), dropout=0.0),
        data[0],
        second_pass=False,
    )
    assert_trees_close(arr_state.params, first.params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wrap", [lambda r: optax.MultiSteps(r, 2), lambda r: optax.apply_if_finite(r, 3)])
def test_linen_and_nnx_states_refuse_an_optax_wrapper_around_a_rule(wrap):
    # optax.MultiSteps / apply_if_finite around a rule see only the clean gradient: both
    # constructors find them (check_placement) instead of training something else silently.
    tx = wrap(sam_optax.sam(optax.sgd(LR)))
    with pytest.raises(ValueError, match="accumulate|skip_nonfinite"):
        linen_state(tx, geometry.l2(RHO))
    with pytest.raises(ValueError, match="accumulate|skip_nonfinite"):
        SharpnessAwareOptimizer(NNet(nnx.Rngs(0, dropout=1)), tx, geometry.l2(RHO))
    # the wrappers that act on both gradients are accepted by both
    ok = sam_optax.accumulate(sam_optax.sam(optax.sgd(LR)), 2)
    assert int(linen_state(ok, geometry.l2(RHO)).step) == 0
    SharpnessAwareOptimizer(NNet(nnx.Rngs(0, dropout=1)), ok, geometry.l2(RHO))
