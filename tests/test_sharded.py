"""Sharded parameters and batches on 8 simulated CPU devices (issue #10 e, f).

* ``shards(mesh=...)`` over a (data=4, model=2) mesh with tensor-parallel
  parameters: no all-gather in the compiled HLO, gradients sharded like the
  parameters, numbers equal to the per-device m-sharpness loop (Auto and
  Explicit meshes).
* chunks (``m``) over a batch that ``jit`` received sharded: no all-gather, no
  collective-permute, for every chunk mode.
* global SAM with FSDP parameters: gradients keep the parameters' sharding and
  SAM adds no all-gather to those of the two forward passes.
* with a mesh, every step compiles once (``sharpness_aware_step``, Linen, NNX),
  and an orbax checkpoint restores onto the mesh and resumes bit-identically.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from helpers import assert_trees_close, tmap, tree_norm
from sam_optax import distributed, geometry

pytestmark = pytest.mark.multidevice

RHO = 0.1
TP_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
FSDP_SPECS = {"w1": P("data"), "b1": P("data"), "w2": P("data"), "b2": P()}
EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sharded_params.py"


@pytest.fixture(scope="module", autouse=True)
def _need_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")


def make_mesh(explicit, shape=(4, 2), names=("data", "model")):
    kind = AxisType.Explicit if explicit else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))


def mlp_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "w1": jax.random.normal(k1, (16, 32)) * 0.3,
        "b1": jax.random.normal(k3, (32,)) * 0.1,
        "w2": jax.random.normal(k2, (32, 4)) * 0.3,
        "b2": jnp.zeros((4,)),
    }


def mlp_batch(seed=1, n=64):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"x": jax.random.normal(k1, (n, 16)), "y": jax.random.randint(k2, (n,), 0, 4)}


def _explicit_context():
    return AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types


def tp_loss(p, b):
    """Tensor-parallel MLP: on an Explicit mesh the row-parallel matmul names its output sharding."""
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    logits = jnp.matmul(h, p["w2"], out_sharding=P() if _explicit_context() else None) + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()


def fsdp_loss(p, b):
    """FSDP: on an Explicit mesh the weights are gathered explicitly for the forward pass."""
    if _explicit_context():
        p = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p)
    logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()


def by_hand(loss, params, batch, m):
    """(mean g, mean g_pert) over contiguous chunks of m examples, each with its own L2 perturbation."""
    n = batch["x"].shape[0]
    gs, gps = [], []
    for i in range(n // m):
        chunk = jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch)
        g = jax.grad(loss)(params, chunk)
        pert = tmap(lambda p, gi: p + RHO * gi / (tree_norm(g) + 1e-12), params, g)
        gps.append(jax.grad(loss)(pert, chunk))
        gs.append(g)
    mean = lambda ts: tmap(lambda *xs: sum(xs) / len(xs), *ts)  # noqa: E731
    return mean(gs), mean(gps)


def collectives(compiled_text):
    """Counts of the collective instructions in a compiled HLO text."""
    kinds = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
    return {k: len(re.findall(r"\b" + k + r"(-start)?\(", compiled_text)) for k in kinds}


def compile_and_run(f, *args):
    compiled = jax.jit(f).lower(*args).compile()
    return compiled(*args), collectives(compiled.as_text())


def assert_sharded_like(tree, like):
    for name in like:
        a, b = tree[name].sharding, like[name].sharding
        assert a.is_equivalent_to(b, like[name].ndim), (name, a, b)


def put(tree, mesh, specs):
    return {n: jax.device_put(v, NamedSharding(mesh, specs[n])) for n, v in tree.items()}


# --------------------------------------------------------------------------
# e. mesh= with tensor-parallel parameters
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("m,mode", [(None, "vmap"), (4, "vmap"), (4, "scan"), (4, "unroll")])
def test_mesh_keeps_tensor_parallel_params_sharded(explicit, m, mode):
    mesh = make_mesh(explicit)
    params, batch = mlp_params(), mlp_batch()
    ps = put(params, mesh, TP_SPECS)
    f = sam_optax.sharpness_aware_grad(
        tp_loss, geometry.l2(RHO), sam_optax.data.shards(m, mesh=mesh, axis_name="data", chunk_mode=mode)
    )
    with jax.set_mesh(mesh):
        out, counts = compile_and_run(f, ps, jax.device_put(batch, NamedSharding(mesh, P("data"))))
    assert counts["all-gather"] == 0, counts
    assert_sharded_like(out.grads, ps)
    assert_sharded_like(out.perturbed_grads, ps)
    g, gp = by_hand(tp_loss, params, batch, m or 64 // 4)  # per device: 16 examples, or chunks of m
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)
    np.testing.assert_allclose(out.loss, tp_loss(params, batch), rtol=1e-5)


def test_explicit_mesh_with_replicated_params_and_unsharded_batch():
    """The Explicit vmap layout also takes a batch that is not on the mesh yet (resharded)."""
    mesh = make_mesh(True)
    params, batch = mlp_params(), mlp_batch()
    f = sam_optax.sharpness_aware_grad(tp_loss, geometry.l2(RHO), sam_optax.data.shards(mesh=mesh, axis_name="data"))
    out = f(distributed.place(params, mesh), batch)
    assert_trees_close(out.perturbed_grads, by_hand(tp_loss, params, batch, 16)[1])


# --------------------------------------------------------------------------
# e. chunks over a batch that jit received sharded (no mesh=)
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True], ids=["auto-set_mesh", "explicit"])
@pytest.mark.parametrize("mode", ["vmap", "scan", "unroll"])
def test_chunks_over_a_jit_sharded_batch_stay_on_their_devices(explicit, mode):
    mesh = make_mesh(explicit)
    params, batch = mlp_params(), mlp_batch()
    ps = put(params, mesh, TP_SPECS)
    f = sam_optax.sharpness_aware_grad(tp_loss, geometry.l2(RHO), sam_optax.data.shards(2, chunk_mode=mode))
    with jax.set_mesh(mesh):
        out, counts = compile_and_run(f, ps, jax.device_put(batch, NamedSharding(mesh, P("data"))))
    assert counts["all-gather"] == 0 and counts["collective-permute"] == 0, counts
    assert_sharded_like(out.perturbed_grads, ps)
    g, gp = by_hand(tp_loss, params, batch, 2)  # chunk i: examples 2i, 2i+1, as on one device
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)


def test_chunks_that_would_straddle_devices_are_a_value_error():
    mesh = make_mesh(True, (8,), ("data",))
    batch = jax.device_put(mlp_batch(), NamedSharding(mesh, P("data")))  # 8 examples per device
    f = sam_optax.sharpness_aware_grad(tp_loss, geometry.l2(RHO), sam_optax.data.shards(16, chunk_mode="scan"))
    with pytest.raises(ValueError, match="m=16 chunks would straddle devices"):
        f(distributed.place(mlp_params(), mesh), batch)


# --------------------------------------------------------------------------
# e. global SAM with FSDP parameters under plain jit
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_global_sam_keeps_fsdp_params_sharded(explicit):
    mesh = make_mesh(explicit, (8,), ("data",))
    params, batch = mlp_params(), mlp_batch()
    ps = put(params, mesh, FSDP_SPECS)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    f = sam_optax.sharpness_aware_grad(fsdp_loss, geometry.l2(RHO))
    with jax.set_mesh(mesh):
        out, counts = compile_and_run(f, ps, sharded_batch)
        _, plain = compile_and_run(jax.grad(fsdp_loss), ps, sharded_batch)
    assert_sharded_like(out.grads, ps)
    assert_sharded_like(out.perturbed_grads, ps)
    # FSDP gathers each weight for a forward pass; SAM has two and adds no gather of its own
    assert plain["all-gather"] > 0 and counts["all-gather"] == 2 * plain["all-gather"], (counts, plain)
    g, gp = by_hand(fsdp_loss, params, batch, 64)
    assert_trees_close(out.perturbed_grads, gp)


# --------------------------------------------------------------------------
# f. one compilation with a mesh; orbax restore onto the mesh
# --------------------------------------------------------------------------

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: (
        _COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def compilations_during(fn):
    start = len(_COMPILES)
    out = fn()
    return out, len(_COMPILES) - start


def tp_setup(explicit):
    mesh = make_mesh(explicit)
    tx = sam_optax.wsam(optax.adam(1e-2), 0.9, learning_rate=1e-2)
    data = sam_optax.data.shards(8, mesh=mesh, axis_name="data", chunk_mode="scan")
    init, step = sam_optax.sharpness_aware_step(tp_loss, tx, geometry.l2(optax.linear_schedule(0.05, 0.1, 8)), data)
    batches = [mlp_batch(10 + i) for i in range(6)]
    return mesh, init, jax.jit(step), batches


def run_steps(step, params, state, batches):
    for b in batches:
        params, state, _ = step(params, state, b)
    return params, state


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_sharpness_aware_step_compiles_once_on_a_mesh(explicit):
    mesh, init, step, batches = tp_setup(explicit)
    params = distributed.place(put(mlp_params(), mesh, TP_SPECS), mesh)
    state = init(params)
    with jax.set_mesh(mesh):
        params, state = run_steps(step, params, state, batches[:1])
        (params, state), n = compilations_during(lambda: run_steps(step, params, state, batches[1:4]))
    assert n == 0 and step._cache_size() == 1
    assert_sharded_like(params, put(mlp_params(), mesh, TP_SPECS))
    assert_sharded_like(optax.tree.get(state.opt_state, "mu"), params)  # Adam's moments sharded like the params


@pytest.mark.slow
def test_orbax_restore_onto_the_mesh_resumes_bit_identically(tmp_path):
    mesh, init, step, batches = tp_setup(False)
    params0 = distributed.place(put(mlp_params(), mesh, TP_SPECS), mesh)
    with jax.set_mesh(mesh):
        params, state = run_steps(step, params0, init(params0), batches[:2])
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp_path / "ckpt", {"params": params, "state": state})
        ckpt.wait_until_finished()
        full = run_steps(step, params, state, batches[2:4])

        fresh_params = distributed.place(put(mlp_params(seed=5), mesh, TP_SPECS), mesh)
        target = distributed.abstract_like({"params": fresh_params, "state": init(fresh_params)})
        restored = ckpt.restore(tmp_path / "ckpt", target)
        assert int(restored["state"].ascent_state.count) == 2
        assert_sharded_like(restored["params"], params)
        resumed, n = compilations_during(lambda: run_steps(step, restored["params"], restored["state"], batches[2:4]))
    assert n == 0 and step._cache_size() == 1
    assert jax.tree.structure(resumed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_linen_and_nnx_steps_compile_once_on_a_mesh_and_restore_onto_it(tmp_path):
    import flax.linen as nn
    from flax import nnx

    from sam_optax.flax import SharpnessAwareOptimizer, TrainState, linen_train_step, nnx_train_step

    mesh = make_mesh(False, (8,), ("data",))
    data = sam_optax.data.shards(mesh=mesh)
    batches = [mlp_batch(20 + i) for i in range(4)]
    rng = jax.random.PRNGKey(3)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(8)(x))
            return nn.Dense(4)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))

    def linen_loss(apply, b):
        return optax.softmax_cross_entropy_with_integer_labels(apply(b["x"], train=True), b["y"]).mean()

    model = Net()
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)), train=False)
    tx = sam_optax.sam(optax.adam(1e-2))
    state = TrainState.create(
        apply_fn=model.apply, params=v["params"], tx=tx, geometry=geometry.l2(RHO), batch_stats=v["batch_stats"]
    )
    step = linen_train_step(linen_loss, data=data)
    state, _ = step(state, batches[0], rng)
    (state, _), n = compilations_during(lambda: [step(state, b, rng) for b in batches[1:3]][-1])
    assert n == 0 and step._cache_size() == 1
    # a checkpoint restored onto one device (the pre-mesh recipe) is moved onto the mesh by the step
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "linen", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "linen", jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    (a, _), n = compilations_during(lambda: step(restored, batches[3], rng))
    b, _ = step(state, batches[3], rng)
    assert n == 0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    class NNet(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.bn = nnx.Linear(16, 8, rngs=rngs), nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
            self.do, self.l2 = nnx.Dropout(0.5, rngs=rngs), nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.do(nnx.relu(self.bn(self.l1(x)))))

    def nnx_loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(m(b["x"]), b["y"]).mean()

    net = NNet(nnx.Rngs(0, dropout=1))
    opt = SharpnessAwareOptimizer(net, sam_optax.sam(optax.adam(1e-2)), geometry.l2(RHO))
    nstep = nnx_train_step(nnx_loss, data=data)
    nstep(net, opt, batches[0])
    _, n = compilations_during(lambda: [nstep(net, opt, b) for b in batches[1:3]])
    assert n == 0
    assert all(x.sharding.mesh == mesh for x in jax.tree.leaves(nnx.state((net, opt))))


def test_place_and_abstract_like():
    mesh = make_mesh(False)
    params = put(mlp_params(), mesh, {**TP_SPECS, "w2": P("model", None)})
    placed = distributed.place(params, mesh)
    assert placed["w2"].sharding.spec == P("model")  # spelled as a jitted step returns it
    assert placed["w1"] is params["w1"]  # already in place: not copied
    state = distributed.place(optax.adam(1e-3).init(mlp_params()), mesh, like=placed)
    assert_sharded_like(state[0].mu, placed)  # param-shaped subtrees follow the params
    assert state[0].count.sharding == NamedSharding(mesh, P())
    assert distributed.is_placed(state, mesh) and not distributed.is_placed(mlp_params(), mesh)
    abstract = distributed.abstract_like(state)
    assert abstract[0].mu["w1"].sharding == state[0].mu["w1"].sharding
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
        distributed.place(params, "data")


@pytest.mark.slow
def test_sharded_params_example_runs():
    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parent.parent))
    res = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLE.parent.parent,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "all-gathers in the compiled step: 0 | compilations: 1" in res.stdout
