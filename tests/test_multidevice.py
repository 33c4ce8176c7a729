"""m-sharpness across 8 simulated CPU devices: shard_map (Auto and Explicit
meshes, the helper's own or the user's), pmap, chunks inside devices; all equal
the explicit per-chunk loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from helpers import assert_trees_close, loss_fn, make_batch, make_params, sam_grads_by_hand, tmap, train, tree_norm
from sam_optax import geometry

pytestmark = pytest.mark.multidevice

RHO = 0.1
P0 = make_params()
BATCH = make_batch(n=64)
NDEV = 8


@pytest.fixture(scope="module", autouse=True)
def _need_devices():
    if jax.device_count() < NDEV:
        pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")


def auto_mesh():
    return jax.make_mesh((NDEV,), ("data",), axis_types=(AxisType.Auto,))


@pytest.mark.slow
def test_naive_shard_map_body_is_the_trap_and_ours_is_not():
    """Documents the check_vma trap our helper avoids: the naive body gives 8x global SAM."""
    mesh = auto_mesh()

    def naive(params, batch):
        g = jax.grad(loss_fn)(params, batch)
        n = tree_norm(g)
        gp = jax.grad(loss_fn)(tmap(lambda p, gi: p + RHO * gi / n, params, g), batch)
        return jax.lax.pmean(gp, "data")

    naive_out = jax.jit(jax.shard_map(naive, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(P0, BATCH)
    _, gp_loop = sam_grads_by_hand(P0, BATCH, RHO, m=64 // NDEV)
    assert tree_norm(tmap(jnp.subtract, naive_out, gp_loop)) > 1e-2
    ours = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(mesh=mesh))(P0, BATCH)
    assert_trees_close(ours.perturbed_grads, gp_loop)


@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True])
def test_helper_mesh_equals_per_chunk_loop(explicit):
    mesh = jax.make_mesh((NDEV,), ("data",)) if explicit else auto_mesh()
    out = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(mesh=mesh))(P0, BATCH)
    g, gp = sam_grads_by_hand(P0, BATCH, RHO, m=64 // NDEV)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)
    np.testing.assert_allclose(out.loss, loss_fn(P0, BATCH), rtol=1e-6)


def test_users_own_shard_map_with_axis_name():
    mesh = Mesh(np.array(jax.devices()[:NDEV]), ("data",))
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(axis_name="data"))
    body = jax.shard_map(lambda p, b: f(p, b), mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
    batch = jax.device_put(BATCH, NamedSharding(mesh, P("data")))
    out = jax.jit(body)(P0, batch)
    _, gp = sam_grads_by_hand(P0, BATCH, RHO, m=64 // NDEV)
    assert_trees_close(out.perturbed_grads, gp)


@pytest.mark.slow
@pytest.mark.parametrize("check_vma", [True, False])
def test_check_vma_either_way(check_vma):
    mesh = auto_mesh()
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.fisher(RHO, 1.0), data=sam_optax.data.shards(axis_name="data"))
    body = jax.shard_map(lambda p, b: f(p, b), mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=check_vma)
    out = jax.jit(body)(P0, BATCH)
    ref = sam_optax.sharpness_aware_grad(loss_fn, geometry.fisher(RHO, 1.0), data=sam_optax.data.shards(m=64 // NDEV))(
        P0, BATCH
    )
    assert_trees_close(out.perturbed_grads, ref.perturbed_grads)


@pytest.mark.slow
def test_pmap_path():
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(axis_name="data"))
    per_device = jax.tree.map(lambda x: x.reshape((NDEV, -1) + x.shape[1:]), BATCH)
    out = jax.pmap(f, axis_name="data", in_axes=(None, 0))(P0, per_device)
    _, gp = sam_grads_by_hand(P0, BATCH, RHO, m=64 // NDEV)
    assert_trees_close(tmap(lambda x: x[0], out.perturbed_grads), gp)
    assert_trees_close(tmap(lambda x: x[7], out.perturbed_grads), gp)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["vmap", "scan", "unroll"])
def test_chunks_inside_devices(mode):
    out = sam_optax.sharpness_aware_grad(
        loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(mesh=auto_mesh(), m=2, chunk_mode=mode)
    )(P0, BATCH)
    g, gp = sam_grads_by_hand(P0, BATCH, RHO, m=2)
    assert_trees_close(out.grads, g)
    assert_trees_close(out.perturbed_grads, gp)


@pytest.mark.slow
def test_chunked_vmap_on_one_device_equals_shard_map():
    a = sam_optax.sharpness_aware_grad(loss_fn, geometry.adaptive(0.5), data=sam_optax.data.shards(m=8))(P0, BATCH)
    b = sam_optax.sharpness_aware_grad(loss_fn, geometry.adaptive(0.5), data=sam_optax.data.shards(mesh=auto_mesh()))(
        P0, BATCH
    )
    assert_trees_close(a.perturbed_grads, b.perturbed_grads)
    assert_trees_close(a.grads, b.grads)


def test_indivisible_by_device_count_is_a_value_error():
    f = sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(mesh=auto_mesh()))
    with pytest.raises(ValueError, match="batch size 60 must be divisible by the number of devices 8"):
        f(P0, make_batch(n=60))
    g = sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(mesh=auto_mesh(), m=3))
    with pytest.raises(ValueError, match="m=3 must divide the per-device batch size 8"):
        g(P0, BATCH)


def test_mesh_axis_validation():
    mesh2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="axis_name is required"):
        sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(mesh=mesh2))
    with pytest.raises(ValueError, match="not in the mesh axes"):
        sam_optax.sharpness_aware_grad(loss_fn, data=sam_optax.data.shards(mesh=mesh2, axis_name="batch"))
    out = sam_optax.sharpness_aware_grad(
        loss_fn, geometry.l2(RHO), data=sam_optax.data.shards(mesh=mesh2, axis_name=("data", "model"))
    )(P0, BATCH)
    _, gp = sam_grads_by_hand(P0, BATCH, RHO, m=8)
    assert_trees_close(out.perturbed_grads, gp)


@pytest.mark.slow
def test_training_under_mesh_equals_single_device_chunks():
    batches = [make_batch(seed=s, n=64) for s in range(3)]

    def tx():
        return sam_optax.wsam(optax.sgd(0.1, momentum=0.9), 0.9, learning_rate=0.1)

    a, _ = train(tx(), geometry.l2(RHO), P0, batches, mesh=auto_mesh())
    b, _ = train(tx(), geometry.l2(RHO), P0, batches, m=8)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


def esam_looksam_by_hand(batches, beta, gamma, k, alpha=0.7, lr=0.1, momentum=0.9, seed=0, m=8):
    """ESAM (SWP per coordinate, paper normalization; SDS) + LookSAM(SGD momentum), per-chunk loop."""
    from helpers import looksam_direction_by_hand, per_example_loss
    from sam_optax.geometry._stochastic import sample_mask

    w, mom, g_v = P0, tmap(jnp.zeros_like, P0), None
    key = jax.random.PRNGKey(seed)
    for t, batch in enumerate(batches):
        key, sub = jax.random.split(key)
        mask = sample_mask(sub, P0, beta, "coordinate")  # one mask per step, shared by the shards
        gs, gps = [], []
        for i in range(batch["x"].shape[0] // m):
            chunk = jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch)
            g = jax.grad(loss_fn)(w, chunk)
            pert = tmap(lambda p, gi, mk: p + RHO / beta * mk * gi / tree_norm(g), w, g, mask)
            rise = np.asarray(per_example_loss(pert, chunk) - per_example_loss(w, chunk))
            idx = np.argsort(-rise, kind="stable")[: int(gamma * m)]  # the top gamma fraction
            gps.append(jax.grad(loss_fn)(pert, jax.tree.map(lambda a: a[idx], chunk)))
            gs.append(g)
        mean = lambda ts: tmap(lambda *xs: sum(xs) / len(xs), *ts)  # noqa: E731
        d, g_v = looksam_direction_by_hand(mean(gs), mean(gps), t, k, alpha, g_v)
        mom = tmap(lambda mi, di: di + momentum * mi, mom, d)
        w = tmap(lambda wi, mi: wi - lr * mi, w, mom)
    return w


@pytest.mark.slow
def test_esam_and_looksam_under_shard_map_equal_per_chunk_reference():
    """SWP (same mask on every shard), SDS per device, and LookSAM's lax.cond inside shard_map,
    against the per-chunk loop written out by hand; chunks on one device give the same."""
    from helpers import per_example_loss
    from sam_optax.data import sharpness_sensitive

    batches = [make_batch(seed=s, n=64) for s in range(4)]
    geo = geometry.stochastic(geometry.l2(RHO), 0.5, granularity="coordinate")
    tx = lambda: sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=2)  # noqa: E731
    want = esam_looksam_by_hand(batches, beta=0.5, gamma=0.5, k=2)
    for kwargs in [dict(mesh=auto_mesh()), dict(m=8)]:
        init, step = sam_optax.sharpness_aware_step(
            per_example_loss, tx(), geo, sam_optax.data.shards(selection=sharpness_sensitive(0.5), **kwargs)
        )
        p, s = P0, init(P0)
        step = jax.jit(step)
        for b in batches:
            p, s, _ = step(p, s, b)
        assert_trees_close(p, want, rtol=1e-5, atol=1e-6)
