"""Sharpness metrics: Hessian-vector products, power iteration, Lanczos (top-k,
spectral density), Hutchinson, lambda_max / lambda_k, m-sharpness value.

Checked against a quadratic with a known Hessian (exact eigenvalues and trace)
and against ``jax.hessian`` of a small network."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import sam_optax
from helpers import assert_trees_close, loss_fn, make_batch, make_params, tmap, tree_norm
from sam_optax import geometry, metrics

# --------------------------------------------------------------------------
# A quadratic 0.5 s x^T A x over a pytree of several leaves (n = 8 entries),
# with known eigenvalues; ``s`` is a per-example weight read from the batch, so
# the Hessian of the mean loss is mean(s) * A.
# --------------------------------------------------------------------------

EIGS = np.array([10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, -0.25])
_Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))
A = (_Q * EIGS) @ _Q.T
QPARAMS = {"a": jnp.array([0.3, -1.0, 2.0]), "b": {"c": jnp.array([[1.0, 0.5], [-0.5, 0.2]])}, "d": jnp.array(0.7)}


def flat(tree):
    return ravel_pytree(tree)[0]


def quad_loss(params, batch):
    x = flat(params)
    return jnp.mean(batch["s"]) * 0.5 * x @ jnp.asarray(A, jnp.float32) @ x


ONES = {"s": jnp.ones((4,))}
KEY = jax.random.PRNGKey(0)


def test_hvp_of_quadratic_is_A_v_on_a_pytree():
    v = tmap(lambda x: jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape) - 1.0, QPARAMS)
    hv = metrics.hessian_vector_product(quad_loss, QPARAMS, v, ONES)
    assert jax.tree.structure(hv) == jax.tree.structure(QPARAMS)
    np.testing.assert_allclose(flat(hv), A @ np.asarray(flat(v)), rtol=1e-5, atol=1e-5)


def test_power_iteration_exact_top_eigenvalue_and_eigenvector():
    res = metrics.power_iteration(quad_loss, QPARAMS, ONES, key=KEY, tol=1e-7, max_iterations=500)
    np.testing.assert_allclose(res.eigenvalue, 10.0, rtol=1e-5)
    assert bool(res.converged)
    assert 1 < int(res.iterations) < 500
    # the eigenvector is the first column of Q up to sign, and the residual is small
    v = np.asarray(flat(res.eigenvector))
    np.testing.assert_allclose(abs(v @ _Q[:, 0]), 1.0, atol=1e-3)
    assert float(res.residual) < 0.05
    np.testing.assert_allclose(res.residual, np.linalg.norm(A @ v - float(res.eigenvalue) * v), rtol=0.05, atol=1e-5)


def test_power_iteration_stops_at_max_iterations_when_not_converged():
    res = metrics.power_iteration(quad_loss, QPARAMS, ONES, key=KEY, tol=1e-9, max_iterations=3)
    assert int(res.iterations) == 3
    assert not bool(res.converged)
    assert 0.0 < float(res.eigenvalue) < 10.0 + 1e-4  # a Rayleigh quotient never exceeds lambda_max


def test_power_iteration_init_vector_and_loose_tolerance():
    # an exact eigenvector converges at once: lambda_1 == lambda_0 after 2 products
    ev = ravel_pytree(QPARAMS)[1](jnp.asarray(_Q[:, 1], jnp.float32))
    res = metrics.power_iteration(quad_loss, QPARAMS, ONES, key=None, init_vector=ev, tol=1e-5)
    np.testing.assert_allclose(res.eigenvalue, 7.0, rtol=1e-5)
    assert int(res.iterations) == 2 and bool(res.converged)


def test_lanczos_top_k_exact_with_full_steps():
    top = metrics.top_k_eigenvalues(quad_loss, QPARAMS, ONES, 4, key=KEY, num_steps=8)
    np.testing.assert_allclose(top, EIGS[:4], rtol=1e-4, atol=1e-4)
    res = metrics.lanczos(quad_loss, QPARAMS, ONES, key=KEY, num_steps=8)
    np.testing.assert_allclose(res.ritz_values, np.sort(EIGS), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jnp.sum(res.weights), 1.0, rtol=1e-5)


def test_lanczos_quadrature_weights_are_squared_projections_of_the_start_vector():
    v0 = np.arange(1.0, 9.0)
    v0 /= np.linalg.norm(v0)
    init = ravel_pytree(QPARAMS)[1](jnp.asarray(v0, jnp.float32))
    res = metrics.lanczos(quad_loss, QPARAMS, ONES, key=KEY, num_steps=8, init_vector=init)
    order = np.argsort(EIGS)
    np.testing.assert_allclose(res.weights, (_Q.T @ v0)[order] ** 2, atol=2e-4)
    np.testing.assert_allclose(res.alphas[0], v0 @ A @ v0, rtol=1e-5)


def test_lanczos_restarts_after_an_invariant_subspace():
    # A = 2 I on a 6-dim space: the Krylov space of any start vector has dimension 1
    def iso(params, batch):
        return jnp.sum(jnp.square(flat(params))) * jnp.mean(batch["s"])

    p = {"u": jnp.ones((2, 3))}
    res = metrics.lanczos(iso, p, ONES, key=KEY, num_steps=6)
    np.testing.assert_allclose(res.ritz_values, np.full(6, 2.0), rtol=1e-5)
    np.testing.assert_allclose(res.betas[:-1], 0.0, atol=1e-6)
    np.testing.assert_allclose(res.weights[np.argmax(np.asarray(res.weights))], 1.0, atol=1e-5)


def test_eigenvalue_ratio_lambda_max_over_lambda_5():
    r = metrics.eigenvalue_ratio(quad_loss, QPARAMS, ONES, key=KEY, k=5, num_steps=8)
    np.testing.assert_allclose(r.lambda_max, 10.0, rtol=1e-4)
    np.testing.assert_allclose(r.lambda_k, 2.0, rtol=1e-4)
    np.testing.assert_allclose(r.ratio, 5.0, rtol=1e-4)


@pytest.mark.slow
def test_spectral_density_is_the_smoothed_exact_spectrum():
    sigma = 0.2
    grid = jnp.linspace(-2.0, 12.0, 1401)
    d = metrics.spectral_density(quad_loss, QPARAMS, ONES, key=KEY, num_steps=8, num_runs=3, grid=grid, sigma=sigma)
    assert d.ritz_values.shape == (3, 8)
    for r in range(3):
        np.testing.assert_allclose(d.ritz_values[r], np.sort(EIGS), rtol=1e-4, atol=1e-4)
    g = np.asarray(grid, np.float64)[:, None, None]
    kernel = np.exp(-0.5 * ((g - np.sort(EIGS)[None, None]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    want = (kernel * np.asarray(d.weights)[None]).sum((1, 2)) / 3
    np.testing.assert_allclose(d.density, want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.trapezoid(np.asarray(d.density), np.asarray(grid)), 1.0, atol=1e-3)
    # default grid and kernel width
    d2 = metrics.spectral_density(quad_loss, QPARAMS, ONES, key=KEY, num_steps=8, num_points=50)
    assert d2.grid.shape == (50,) and float(d2.grid[0]) < -0.25 and float(d2.grid[-1]) > 10.0
    np.testing.assert_allclose(d2.sigma, 0.01 * 10.25, rtol=1e-4)


def test_hutchinson_trace_exact_for_diagonal_and_unbiased_for_dense():
    diag = np.array([3.0, -1.0, 0.5, 2.0, 4.0, 1.0, 0.25, 6.0])

    def diag_loss(params, batch):
        x = flat(params)
        return jnp.mean(batch["s"]) * 0.5 * jnp.sum(jnp.asarray(diag, jnp.float32) * x * x)

    est = metrics.hutchinson_trace(diag_loss, QPARAMS, ONES, key=KEY, num_probes=5)
    np.testing.assert_allclose(est.trace, diag.sum(), rtol=1e-6)  # z^T D z = tr(D) for every probe
    np.testing.assert_allclose(est.stderr, 0.0, atol=1e-5)

    n = 2000
    est = metrics.hutchinson_trace(quad_loss, QPARAMS, ONES, key=KEY, num_probes=n)
    off = A - np.diag(np.diag(A))
    theory = np.sqrt(2 * np.sum(off**2) / n)  # Var(z^T A z) = 2 sum_{j != l} A_jl^2 for Rademacher z
    np.testing.assert_allclose(est.stderr, theory, rtol=0.1)
    assert abs(float(est.trace) - EIGS.sum()) < 4 * theory
    assert est.num_probes == n


def test_batches_average_the_hessian():
    bs = [{"s": jnp.full((4,), s)} for s in (1.0, 2.0, 6.0)]  # mean Hessian = 3 A
    stacked = metrics.stack_batches(iter(bs))
    res = metrics.power_iteration(quad_loss, QPARAMS, stacked, key=KEY, tol=1e-7, max_iterations=500)
    np.testing.assert_allclose(res.eigenvalue, 30.0, rtol=1e-5)
    top = metrics.top_k_eigenvalues(quad_loss, QPARAMS, stacked, 2, key=KEY, num_steps=8)
    np.testing.assert_allclose(top, 3 * EIGS[:2], rtol=1e-4)
    diag_est = metrics.hutchinson_trace(quad_loss, QPARAMS, stacked, key=KEY, num_probes=2000)
    assert abs(float(diag_est.trace) - 3 * EIGS.sum()) < 4 * float(diag_est.stderr)


def test_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match="tol"):
        metrics.power_iteration(quad_loss, QPARAMS, ONES, key=KEY, tol=0.0)
    with pytest.raises(ValueError, match="max_iterations"):
        metrics.power_iteration(quad_loss, QPARAMS, ONES, key=KEY, max_iterations=0)
    with pytest.raises(ValueError, match="key"):
        metrics.power_iteration(quad_loss, QPARAMS, ONES, key=None)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 8\]"):
        metrics.lanczos(quad_loss, QPARAMS, ONES, key=KEY, num_steps=9)
    with pytest.raises(ValueError, match="k must be in"):
        metrics.top_k_eigenvalues(quad_loss, QPARAMS, ONES, 5, key=KEY, num_steps=4)
    with pytest.raises(ValueError, match="num_probes"):
        metrics.hutchinson_trace(quad_loss, QPARAMS, ONES, key=KEY, num_probes=1)
    with pytest.raises(ValueError, match="sigma"):
        metrics.spectral_density(quad_loss, QPARAMS, ONES, key=KEY, sigma=-1.0)
    with pytest.raises(ValueError, match="batch 1"):
        metrics.stack_batches([{"s": jnp.ones(4)}, {"s": jnp.ones(3)}])


def test_no_recompilation_after_the_first_call():
    f = jax.jit(lambda p, b, k: metrics.power_iteration(quad_loss, p, b, key=k).eigenvalue)
    f(QPARAMS, ONES, KEY)
    n0 = f._cache_size()
    for i in range(3):
        f(tmap(lambda x: x + i, QPARAMS), {"s": jnp.ones((4,)) * (1.0 + i)}, jax.random.PRNGKey(i))
    assert f._cache_size() == n0
    # the public function itself compiles once per loss_fn / static configuration
    from sam_optax.metrics import _hessian

    before = _hessian._power_jit._cache_size()
    for tol in (1e-3, 1e-4):
        metrics.power_iteration(quad_loss, QPARAMS, {"s": 2.0 * jnp.ones((4,))}, key=KEY, tol=tol, max_iterations=50)
    assert _hessian._power_jit._cache_size() <= before + 1


# --------------------------------------------------------------------------
# A small network against jax.hessian.
# --------------------------------------------------------------------------

MLP = make_params()
MBATCH = make_batch(n=32)


@functools.cache
def _mlp_hessian(n):
    batch = MBATCH if n == 32 else make_batch(n=n)
    x0, unravel = ravel_pytree(MLP)
    h = jax.jit(jax.hessian(lambda x, b: loss_fn(unravel(x), b)))(x0, batch)
    return np.asarray(h, np.float64)


def mlp_hessian(n=32):
    """The full 67 x 67 Hessian of the MLP loss on the batch make_batch(n=n)."""
    return _mlp_hessian(n)


def test_hvp_equals_jax_hessian_on_mlp():
    h = mlp_hessian()
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(3), x.shape), MLP)
    hv = metrics.hessian_vector_product(loss_fn, MLP, v, MBATCH)
    np.testing.assert_allclose(flat(hv), h @ np.asarray(flat(v)), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_spectrum_of_mlp_matches_eigvalsh():
    eig = np.linalg.eigvalsh(mlp_hessian())
    n = eig.size
    top_mag = eig[np.argmax(np.abs(eig))]
    res = metrics.power_iteration(loss_fn, MLP, MBATCH, key=KEY, tol=1e-6, max_iterations=1000)
    np.testing.assert_allclose(res.eigenvalue, top_mag, rtol=1e-3)
    top = metrics.top_k_eigenvalues(loss_fn, MLP, MBATCH, 5, key=KEY, num_steps=n)
    np.testing.assert_allclose(top, eig[::-1][:5], rtol=1e-3, atol=1e-5)
    # a few tens of steps already give the extreme eigenvalue
    top20 = metrics.top_k_eigenvalues(loss_fn, MLP, MBATCH, 1, key=KEY, num_steps=30)
    np.testing.assert_allclose(top20[0], eig[-1], rtol=1e-3)
    r = metrics.eigenvalue_ratio(loss_fn, MLP, MBATCH, key=KEY, num_steps=n)
    np.testing.assert_allclose(r.ratio, eig[-1] / eig[-5], rtol=1e-3)
    est = metrics.hutchinson_trace(loss_fn, MLP, MBATCH, key=KEY, num_probes=300)
    assert abs(float(est.trace) - np.trace(mlp_hessian())) < 4 * float(est.stderr)


# --------------------------------------------------------------------------
# Under shard_map: the batch sharded over 8 simulated devices.
# --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.multidevice
def test_hessian_metrics_under_shard_map_equal_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    batch = make_batch(n=64)
    v = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(5), x.shape), MLP)

    def body(params, batch, v, key, axis_name="data"):
        kw = dict(key=key, axis_name=axis_name)
        hv = metrics.hessian_vector_product(loss_fn, params, v, batch, axis_name=axis_name)
        pi = metrics.power_iteration(loss_fn, params, batch, tol=1e-6, max_iterations=40, **kw)
        top = metrics.top_k_eigenvalues(loss_fn, params, batch, 3, num_steps=20, **kw)
        tr = metrics.hutchinson_trace(loss_fn, params, batch, num_probes=16, **kw)
        dens = metrics.spectral_density(loss_fn, params, batch, num_steps=12, num_runs=2, **kw)
        return hv, pi.eigenvalue, pi.iterations, top, tr.trace, dens.density

    sharded = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P(), P()), out_specs=P(), check_vma=True)
    )(MLP, batch, v, KEY)
    single = jax.jit(functools.partial(body, axis_name=None))(MLP, batch, v, KEY)
    h = mlp_hessian(64)
    np.testing.assert_allclose(flat(sharded[0]), h @ np.asarray(flat(v)), rtol=1e-4, atol=1e-5)
    assert_trees_close(sharded[0], single[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sharded[1], single[1], rtol=1e-4)
    np.testing.assert_allclose(sharded[3], single[3], rtol=1e-4)
    np.testing.assert_allclose(sharded[3][0], np.linalg.eigvalsh(h)[-1], rtol=1e-3)
    np.testing.assert_allclose(sharded[4], single[4], rtol=1e-4)  # the same probes, the full-batch Hessian
    np.testing.assert_allclose(sharded[5], single[5], rtol=1e-3, atol=1e-6)
    # m-sharpness inside the user's shard_map: each device's 8 examples are one shard
    f = metrics.m_sharpness(loss_fn, sam_optax.geometry.l2(0.1), data=sam_optax.data.shards(axis_name="data"))
    value = jax.jit(
        jax.shard_map(
            lambda p, b: f(p, b).sharpness, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=True
        )
    )(MLP, batch)
    np.testing.assert_allclose(value, sharpness_by_hand(MLP, batch, 0.1, 8), rtol=1e-4)


# --------------------------------------------------------------------------
# The m-sharpness value.
# --------------------------------------------------------------------------


@jax.jit
def _chunk_sharpness(params, chunk, rho):
    g = jax.grad(loss_fn)(params, chunk)
    pert = tmap(lambda p, gi: p + rho * gi / (tree_norm(g) + 1e-12), params, g)
    return loss_fn(pert, chunk) - loss_fn(params, chunk)


def sharpness_by_hand(params, batch, rho, m):
    """Mean over contiguous chunks of L_c(w + rho g_c / ||g_c||) - L_c(w)."""
    n = batch["x"].shape[0]
    chunks = [jax.tree.map(lambda a: a[i * m : (i + 1) * m], batch) for i in range(n // m)]
    return float(np.mean([_chunk_sharpness(params, c, rho) for c in chunks]))


@pytest.mark.slow
def test_m_sharpness_first_order_equals_hand_computation_per_shard():
    rho = 0.1
    vals = {}
    for m in (8, 32):
        out = metrics.m_sharpness(loss_fn, geometry.l2(rho), data=sam_optax.data.shards(m=m))(MLP, MBATCH)
        np.testing.assert_allclose(out.sharpness, sharpness_by_hand(MLP, MBATCH, rho, m), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(out.loss, loss_fn(MLP, MBATCH), rtol=1e-6)
        vals[m] = float(out.sharpness)
    # smaller shards have a larger sharpness (each follows its own gradient)
    assert vals[8] > vals[32] > 0


def test_m_sharpness_over_batches_is_the_mean():
    f = metrics.m_sharpness(loss_fn, geometry.l2(0.1), data=sam_optax.data.shards(m=16))
    bs = [make_batch(seed=s, n=32) for s in (11, 12, 13)]
    out = f(MLP, metrics.stack_batches(bs))
    each = [f(MLP, b) for b in bs]
    np.testing.assert_allclose(out.sharpness, np.mean([e.sharpness for e in each]), rtol=1e-5)
    np.testing.assert_allclose(out.loss, np.mean([e.loss for e in each]), rtol=1e-6)


def test_m_sharpness_multi_step_ascent_approaches_the_exact_maximum():
    """On a quadratic, max_{||e||<=rho} L(w+e) - L(w) is a trust-region problem with
    a closed form: e = (mu I - A)^{-1} g with ||e|| = rho, mu > lambda_max."""
    rho = 0.5

    def qloss(params, batch):
        x = flat(params)
        return jnp.mean(batch["s"]) * 0.5 * x @ jnp.asarray(A, jnp.float32) @ x

    w = np.asarray(flat(QPARAMS), np.float64)
    g = A @ w
    lo, hi = EIGS.max() + 1e-9, EIGS.max() + 1e6
    for _ in range(200):  # bisection on mu: ||(mu I - A)^{-1} g|| decreases in mu
        mu = 0.5 * (lo + hi)
        e = np.linalg.solve(mu * np.eye(8) - A, g)
        lo, hi = (mu, hi) if np.linalg.norm(e) > rho else (lo, mu)
    exact = g @ e + 0.5 * e @ A @ e
    first = float(metrics.m_sharpness(qloss, geometry.l2(rho))(QPARAMS, ONES).sharpness)
    e1 = rho * g / np.linalg.norm(g)
    np.testing.assert_allclose(first, g @ e1 + 0.5 * e1 @ A @ e1, rtol=1e-4)
    multi = float(
        metrics.m_sharpness(qloss, geometry.l2(rho), ascent_steps=20, ascent_step_size=0.5)(QPARAMS, ONES).sharpness
    )
    assert first < multi <= exact * (1 + 1e-5)
    np.testing.assert_allclose(multi, exact, rtol=1e-3)


@pytest.mark.multidevice
def test_m_sharpness_over_a_mesh_equals_per_device_chunks():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS set in conftest.py)")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    batch = make_batch(n=64)
    out = metrics.m_sharpness(loss_fn, geometry.l2(0.1), data=sam_optax.data.shards(mesh=mesh, m=4))(MLP, batch)
    np.testing.assert_allclose(out.sharpness, sharpness_by_hand(MLP, batch, 0.1, 4), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_m_sharpness_reuses_sharpness_aware_grad():
    """The value is the training machinery's perturbed_loss - loss, scheduled rho included."""
    geo = geometry.l2(lambda count: 0.05 + 0.01 * count)
    state = geo.init(MLP)
    for _ in range(3):
        _, state = geo.update(MLP, state, MLP)  # advance the schedule to count 3: rho = 0.08
    out = sam_optax.sharpness_aware_grad(loss_fn, geo, data=sam_optax.data.shards(m=8))(MLP, MBATCH, ascent_state=state)
    val = metrics.m_sharpness(loss_fn, geo, data=sam_optax.data.shards(m=8))(MLP, MBATCH, ascent_state=state)
    np.testing.assert_allclose(val.sharpness, out.perturbed_loss - out.loss, rtol=1e-6)
    np.testing.assert_allclose(val.sharpness, sharpness_by_hand(MLP, MBATCH, 0.08, 8), rtol=1e-4)
