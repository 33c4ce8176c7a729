"""One-pass perturbations: MSAM (SGD and AdamW) and ARWP at 1x cost, against hand-written rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, loss_fn
from sam_optax.one_pass import (
    msam_adamw,
    msam_perturbed,
    msam_sgd,
    msam_unperturbed,
    rwp_grad,
    rwp_init,
    rwp_noise,
    rwp_sigma_schedule,
    rwp_step,
)

# ---------------------------------------------------------------------------
# A least-squares model whose gradient is written in numpy float64.
# ---------------------------------------------------------------------------

_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(16, 3))
_Y = _RNG.normal(size=(16, 2))
_W0 = {"b": _RNG.normal(size=(2,)) * 0.3, "k": _RNG.normal(size=(3, 2))}


def _np_grad(w):
    r = _X @ w["k"] + w["b"] - _Y
    return {"b": r.sum(0) / len(_X), "k": _X.T @ r / len(_X)}


def _jax_loss(w):
    r = jnp.asarray(_X, jnp.float32) @ w["k"] + w["b"] - jnp.asarray(_Y, jnp.float32)
    return 0.5 * jnp.sum(r * r) / len(_X)


def _np_norm(t):
    return np.sqrt(sum(np.sum(x * x) for x in t.values()))


def _f32(t):
    return {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}


def _run(tx, steps, msam=True):
    """(stored params, unperturbed weights) after each step, float32."""
    params, state = _f32(_W0), tx.init(_f32(_W0))
    update = jax.jit(lambda p, s: tx.update(jax.grad(_jax_loss)(p), s, p))
    out = []
    for _ in range(steps):
        updates, state = update(params, state)
        params = optax.apply_updates(params, updates)
        out.append((params, msam_unperturbed(params, state) if msam else None))
    assert update._cache_size() == 1  # no recompile after step 1
    return out


def _close(a, b, tol=1e-6):
    for key in a:
        np.testing.assert_allclose(np.asarray(a[key], np.float64), b[key], rtol=tol, atol=tol)


LR = lambda t: 0.1 / (1.0 + t)  # noqa: E731
RHO = lambda t: 0.3 + 0.2 * t  # noqa: E731


@pytest.mark.parametrize("exact_undo", [False, True])
def test_msam_sgd_matches_the_official_rule_by_hand(exact_undo):
    mu, wd, steps = 0.9, 0.05, 5
    got = _run(msam_sgd(LR, mu, RHO, wd, exact_undo=exact_undo), steps)
    wt = {k: v.copy() for k, v in _W0.items()}  # stored (perturbed) point
    v = {k: np.zeros_like(x) for k, x in _W0.items()}
    s, rho_prev = 0.0, 0.0  # step 1: s = 0, no perturbation
    for t in range(steps):
        g = _np_grad(wt)
        d = {k: g[k] + wd * wt[k] for k in wt}
        undo = (rho_prev if exact_undo else RHO(t)) * s
        w = {k: wt[k] + undo * v[k] for k in wt}
        v = {k: mu * v[k] + d[k] for k in wt}
        w = {k: w[k] - LR(t) * v[k] for k in wt}
        s, rho_prev = 1.0 / (_np_norm(v) + 1e-12), RHO(t)
        wt = {k: w[k] - RHO(t) * s * v[k] for k in wt}
        _close(got[t][0], wt)
        _close(got[t][1], w)  # msam_unperturbed: the real weights


def test_msam_sgd_modes_differ_only_under_a_rho_schedule():
    a = _run(msam_sgd(0.1, 0.9, RHO, 0.0), 3)[-1][0]
    b = _run(msam_sgd(0.1, 0.9, RHO, 0.0, exact_undo=True), 3)[-1][0]
    c = _run(msam_sgd(0.1, 0.9, 0.4, 0.0), 3)[-1][0]
    d = _run(msam_sgd(0.1, 0.9, 0.4, 0.0, exact_undo=True), 3)[-1][0]
    assert np.max(np.abs(a["k"] - b["k"])) > 1e-3
    assert_trees_close(c, d, rtol=0, atol=0)


def test_msam_adamw_matches_the_official_rule_by_hand():
    b1, b2, eps, wd, steps = 0.8, 0.95, 1e-3, 0.1, 5
    got = _run(msam_adamw(LR, b1, b2, eps, wd, RHO), steps)
    wt = {k: v.copy() for k, v in _W0.items()}
    m = {k: np.zeros_like(x) for k, x in _W0.items()}
    nu = {k: np.zeros_like(x) for k, x in _W0.items()}
    n = 0.0  # stored rho / (|m| + 1e-12)
    for t in range(steps):
        g, step = _np_grad(wt), t + 1
        w = {k: wt[k] + n * m[k] for k in wt}
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in wt}
        nu = {k: b2 * nu[k] + (1 - b2) * g[k] ** 2 for k in wt}
        denom = {k: np.sqrt(nu[k]) / np.sqrt(1 - b2**step) + eps for k in wt}
        w = {k: w[k] - LR(t) / (1 - b1**step) * m[k] / denom[k] for k in wt}
        w = {k: w[k] * (1 - LR(t) * wd) for k in wt}
        n = RHO(t) / (_np_norm(m) + 1e-12)
        wt = {k: w[k] - n * m[k] for k in wt}
        _close(got[t][0], wt)
        _close(got[t][1], w)


def test_msam_sgd_rho_zero_is_sgd_momentum_with_coupled_l2():
    got = _run(msam_sgd(0.1, 0.9, rho=0.0, weight_decay=0.01), 4)
    ref = _run(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, 0.9)), 4, msam=False)
    for (p, w), (r, _) in zip(got, ref):
        assert_trees_close(p, r, rtol=1e-6, atol=1e-7)
        assert_trees_close(w, p, rtol=0, atol=0)  # no perturbation


def _adamw_decay_after(lr, b1, b2, eps, wd):
    """The sheet's AdamW: the Adam step, then w <- (1 - lr wd) w."""

    def update(grads, state, params):
        t, m, v = state
        t = t + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)

        def new(p, m, v):
            p = p - lr / (1 - b1**t) * m / (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps)
            return p * (1 - lr * wd)

        updates = jax.tree.map(lambda p, m, v: new(p, m, v) - p, params, m, v)
        return updates, (t, m, v)

    zeros = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    return optax.GradientTransformation(lambda p: (jnp.zeros([], jnp.int32), zeros(p), zeros(p)), update)


def test_msam_adamw_rho_zero_is_adamw_with_decay_after_the_step():
    got = _run(msam_adamw(0.01, 0.9, 0.99, 1e-8, 0.1, rho=0.0), 4)
    ref = _run(_adamw_decay_after(0.01, 0.9, 0.99, 1e-8, 0.1), 4, msam=False)
    for (p, _), (r, _) in zip(got, ref):
        assert_trees_close(p, r, rtol=1e-6, atol=1e-7)


def test_msam_unperturbed_inside_a_chain_and_its_inverse():
    tx = optax.chain(optax.clip_by_global_norm(1e6), msam_sgd(0.1, rho=0.5))
    init, step = sam_optax.plain_step(lambda p, _: _jax_loss(p), tx)
    step = jax.jit(step)
    params, state = _f32(_W0), init(_f32(_W0))
    for _ in range(3):
        params, state, _ = step(params, state, None)
    w = msam_unperturbed(params, state)
    inner = state[1]
    v_norm = float(sam_optax._utils.tree_norm(inner.momentum))
    dist = float(sam_optax._utils.tree_norm(jax.tree.map(jnp.subtract, w, params)))
    np.testing.assert_allclose(dist, 0.5 * v_norm / (v_norm + 1e-12), rtol=1e-5)  # |w - w~| = rho
    assert_trees_close(msam_perturbed(w, state), params, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="exactly one"):
        msam_unperturbed(params, optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match="exactly one"):
        msam_unperturbed(params, (state, state))
    with pytest.raises(ValueError, match="params must have"):
        msam_unperturbed({"w": params["b"]}, state)


def test_one_gradient_pass_per_step():
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return _jax_loss(params)

    for tx in (msam_sgd(0.1), msam_adamw()):
        init, step = sam_optax.plain_step(counted, tx)
        step = jax.jit(step)
        params, state = _f32(_W0), init(_f32(_W0))
        for _ in range(2):
            params, state, _ = step(params, state, None)
    init, step = rwp_step(counted, optax.sgd(0.1), sigma=0.01)
    step = jax.jit(step)
    params, state = _f32(_W0), init(_f32(_W0), jax.random.PRNGKey(0))
    for _ in range(2):
        params, state, _ = step(params, state, None)
    jax.effects_barrier()
    assert len(calls) == 6


# ---------------------------------------------------------------------------
# RWP
# ---------------------------------------------------------------------------


def test_rwp_noise_is_filterwise_along_the_last_axis():
    col_scale = jnp.logspace(-2, 2, 256)  # filters of very different norms
    kernel = jax.random.normal(jax.random.PRNGKey(1), (64, 256)) * col_scale
    bias = jax.random.normal(jax.random.PRNGKey(2), (4096,))
    sigma = 0.02
    eps = jax.jit(rwp_noise)({"bias": bias, "kernel": kernel}, jax.random.PRNGKey(3), sigma)
    z = np.asarray(eps["kernel"]) / (sigma * np.linalg.norm(np.asarray(kernel), axis=0))
    per_filter = z.std(axis=0, ddof=1)
    assert abs(per_filter.mean() - 1) < 0.03 and np.all(np.abs(per_filter - 1) < 0.4)
    assert abs(z.mean()) < 0.02
    zb = np.asarray(eps["bias"]) / (sigma * np.linalg.norm(np.asarray(bias)))
    assert abs(zb.std() - 1) < 0.05


def test_rwp_adaptive_scaling_and_eta_zero():
    params = {"b": jnp.arange(1.0, 4.0), "k": jnp.ones((2, 3))}
    fisher = {"b": jnp.array([0.0, 1.0, 3.0]), "k": jnp.array([[1.0, 0.0, 2.0], [1.0, 4.0, 0.0]])}
    key = jax.random.PRNGKey(0)
    noise = jax.jit(rwp_noise)
    plain = noise(params, key, 0.1)
    adaptive = noise(params, key, 0.1, fisher, eta=0.5)
    f_bar = {"b": fisher["b"], "k": jnp.array([[2.0, 4.0, 2.0]])}  # filter sums, broadcast
    for name in params:
        np.testing.assert_allclose(adaptive[name] * jnp.sqrt(1 + 0.5 * f_bar[name]), plain[name], rtol=1e-6)
    assert_trees_close(noise(params, key, 0.1, fisher, eta=0.0), plain, rtol=0, atol=0)


def test_rwp_step_is_the_base_step_with_the_gradient_at_w_plus_eps():
    sigma, eta, beta, lr = rwp_sigma_schedule(0.05, 1.0, 10), 0.3, 0.7, 0.1
    init, step = rwp_step(_jax_loss, optax.sgd(lr), sigma, eta, beta)
    step = jax.jit(step)
    params, state = _f32(_W0), init(_f32(_W0), jax.random.PRNGKey(5))
    fisher, key = jax.tree.map(jnp.zeros_like, params), jax.random.PRNGKey(5)

    @jax.jit
    def by_hand(params, key, sigma_t, fisher):
        key, sub = jax.random.split(key)
        eps = rwp_noise(params, sub, sigma_t, fisher, eta)
        g = jax.grad(_jax_loss)(jax.tree.map(jnp.add, params, eps))
        expected = jax.tree.map(lambda p, g: p - lr * g, params, g)
        return expected, key, jax.tree.map(lambda f, g: beta * f + g * g, fisher, g)

    for t in range(3):
        sigma_t = np.float32(0.05 * (1 + (1 - np.cos(np.pi * t / 10)) / 2))
        expected, key, fisher = by_hand(params, key, sigma_t, fisher)
        params, state, _ = step(params, state)
        assert_trees_close(params, expected, rtol=1e-5, atol=1e-6)  # the noise is removed
        assert_trees_close(state.rwp.fisher, fisher, rtol=1e-5, atol=1e-7)
    assert step._cache_size() == 1


def test_rwp_sigma_zero_is_the_clean_gradient():
    grad_fn = jax.jit(rwp_grad(_jax_loss, sigma=0.0, eta=0.0))
    params = _f32(_W0)
    value, grads, state = grad_fn(params, rwp_init(params, jax.random.PRNGKey(0), adaptive=False))
    assert state.fisher is None
    assert_trees_close(grads, _np_grad(_W0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, _jax_loss(params), rtol=1e-6)
    with pytest.raises(ValueError, match="eta"):
        rwp_grad(_jax_loss, eta=1.0)(params, rwp_init(params, jax.random.PRNGKey(0), adaptive=False))


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: msam_sgd(0.1, rho=-0.1), "rho"),
        (lambda: msam_sgd(0.1, momentum=1.0), "momentum"),
        (lambda: msam_sgd(0.1, momentum=-0.1), "momentum"),
        (lambda: msam_sgd(-0.1), "learning_rate"),
        (lambda: msam_sgd(0.1, weight_decay=-1e-4), "weight_decay"),
        (lambda: msam_sgd(0.1, exact_undo=1), "exact_undo"),
        (lambda: msam_adamw(-1e-3), "learning_rate"),
        (lambda: msam_adamw(rho=-1.0), "rho"),
        (lambda: msam_adamw(b1=1.0), "b1"),
        (lambda: msam_adamw(b2=1.5), "b2"),
        (lambda: msam_adamw(weight_decay=-0.1), "weight_decay"),
        (lambda: msam_adamw(eps="1e-8"), "eps"),
        (lambda: rwp_grad(loss_fn, sigma=-0.01), "sigma"),
        (lambda: rwp_grad(loss_fn, beta=1.5), "beta"),
        (lambda: rwp_grad(loss_fn, beta=-0.1), "beta"),
        (lambda: rwp_grad(loss_fn, eta=-1.0), "eta"),
        (lambda: rwp_grad(None), "loss_fn"),
        (lambda: rwp_step(loss_fn, "sgd"), "tx"),
        (lambda: rwp_sigma_schedule(0.01, 10.0, 0), "total_steps"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_update_without_params_raises():
    for tx in (msam_sgd(0.1), msam_adamw()):
        params = _f32(_W0)
        with pytest.raises(ValueError, match="params"):
            tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------
# m-RWP: lam g_{B1}(w + eps) + (1 - lam) g_{B0}(w)
# ---------------------------------------------------------------------------


def _batch(seed, n=8):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=(n, 2))


def _np_grad_on(w, batch):
    x, y = batch
    r = x @ w["k"] + w["b"] - y
    return {"b": r.sum(0) / len(x), "k": x.T @ r / len(x)}


def _loss_on(w, batch):
    x, y = batch
    r = jnp.asarray(x, w["k"].dtype) @ w["k"] + w["b"] - jnp.asarray(y, w["k"].dtype)
    return 0.5 * jnp.sum(r * r) / len(x)


_PAIRS = [(_batch(10 + t), _batch(20 + t)) for t in range(3)]
_KEY7 = jax.random.PRNGKey(7)


def _run_mrwp(init, step, pairs=_PAIRS, dtype=jnp.float32, key=_KEY7):
    params = jax.tree.map(lambda v: jnp.asarray(v, dtype), _W0)
    state, losses = init(params, key), []
    step = jax.jit(step)
    for b0, b1 in pairs:
        b0, b1 = jax.tree.map(lambda v: jnp.asarray(v, dtype), (b0, b1))
        params, state, (loss, _) = step(params, state, b0, b1)
        losses.append(float(loss))
    assert step._cache_size() == 1
    return params, state, losses


def test_mrwp_step_equals_a_float64_hand_loop_with_a_fixed_key():
    """Adaptive m-RWP + heavy-ball SGD over 3 steps, every quantity in numpy float64; the
    noise is drawn as rwp_noise documents it: per step key, sub = split(key), one key per
    leaf (split(sub, 2), leaves b then k), std sigma (||w_col|| or ||b||), / sqrt(1 + eta F)."""
    lam, sigma, eta, beta, lr = 0.3, 0.05, 0.5, 0.8, 0.1
    with jax.enable_x64(True):
        init, step = sam_optax.mrwp_step(_loss_on, optax.sgd(lr, momentum=0.9), lam, sigma, eta, beta)
        params, state, losses = _run_mrwp(init, step, dtype=jnp.float64)
        key, w = jax.random.PRNGKey(7), {k: v.copy() for k, v in _W0.items()}
        fisher = {k: np.zeros_like(v) for k, v in w.items()}
        mom = {k: np.zeros_like(v) for k, v in w.items()}
        for t, (b0, b1) in enumerate(_PAIRS):
            key, sub = jax.random.split(key)
            kb, kk = jax.random.split(sub, 2)
            zb = np.asarray(jax.random.normal(kb, (2,), jnp.float64))
            zk = np.asarray(jax.random.normal(kk, (3, 2), jnp.float64))
            eps = {
                "b": zb * sigma * (np.linalg.norm(w["b"]) + 1e-16) / np.sqrt(1 + eta * fisher["b"]),
                "k": zk * (sigma + 1e-16) * np.linalg.norm(w["k"], axis=0) / np.sqrt(1 + eta * fisher["k"].sum(0)),
            }
            g0 = _np_grad_on(w, b0)
            g1 = _np_grad_on({k: w[k] + eps[k] for k in w}, b1)
            fisher = {k: beta * fisher[k] + g1[k] ** 2 for k in w}
            mom = {k: 0.9 * mom[k] + lam * g1[k] + (1 - lam) * g0[k] for k in w}
            r = b0[0] @ w["k"] + w["b"] - b0[1]
            np.testing.assert_allclose(losses[t], 0.5 * np.sum(r * r) / len(r), rtol=1e-12)  # clean, on B0
            w = {k: w[k] - lr * mom[k] for k in w}
        for k in w:
            np.testing.assert_allclose(np.asarray(params[k]), w[k], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(state.rwp.fisher[k]), fisher[k], rtol=1e-12, atol=1e-14)
        assert int(state.rwp.count) == 3


def test_mrwp_lam_zero_is_the_base_optimizer_on_batch0():
    """lam = 0 (sigma > 0): exactly heavy-ball SGD on batch 0; batch 1 and the noise do not enter."""
    init, step = sam_optax.mrwp_step(_loss_on, optax.sgd(0.1, momentum=0.9), lam=0.0, sigma=0.5)
    params, _, _ = _run_mrwp(init, step)
    opt, w = optax.sgd(0.1, momentum=0.9), _f32(_W0)
    o = opt.init(w)
    for b0, _ in _PAIRS:
        u, o = opt.update(jax.grad(_loss_on)(w, jax.tree.map(jnp.float32, b0)), o, w)
        w = optax.apply_updates(w, u)
    assert_trees_close(params, w, rtol=1e-6, atol=1e-7)  # jit vs op by op: rounding only


def test_mrwp_sigma_zero_half_is_the_base_optimizer_on_the_mean_gradient():
    init, step = sam_optax.mrwp_step(_loss_on, optax.sgd(0.1, momentum=0.9), lam=0.5, sigma=0.0)
    params, _, _ = _run_mrwp(init, step)
    w, m = {k: v.copy() for k, v in _W0.items()}, {k: np.zeros_like(v) for k, v in _W0.items()}
    for b0, b1 in _PAIRS:
        g0, g1 = _np_grad_on(w, b0), _np_grad_on(w, b1)
        m = {k: 0.9 * m[k] + (g0[k] + g1[k]) / 2 for k in w}
        w = {k: w[k] - 0.1 * m[k] for k in w}
    _close(params, w, tol=1e-5)


def test_mrwp_lam_one_is_arwp_on_batch1():
    """lam = 1: the (adaptive) RWP step of rwp_step on batch 1, same key: same noise and F."""
    args = dict(sigma=0.05, eta=0.5, beta=0.8)
    init, step = sam_optax.mrwp_step(_loss_on, optax.sgd(0.1), lam=1.0, **args)
    params, state, _ = _run_mrwp(init, step)
    rinit, rstep = rwp_step(_loss_on, optax.sgd(0.1), **args)
    rstep = jax.jit(rstep)
    p, s = _f32(_W0), rinit(_f32(_W0), jax.random.PRNGKey(7))
    for _, b1 in _PAIRS:
        p, s, _ = rstep(p, s, jax.tree.map(jnp.float32, b1))
    assert_trees_close(params, p, rtol=0, atol=0)
    assert_trees_close(state.rwp.fisher, s.rwp.fisher, rtol=0, atol=0)


def test_mrwp_runs_two_gradient_passes_per_step():
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return _loss_on(params, batch)

    init, step = sam_optax.mrwp_step(counted, optax.sgd(0.1))
    _run_mrwp(init, step)
    jax.effects_barrier()
    assert len(calls) == 2 * len(_PAIRS)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: sam_optax.mrwp_grad(loss_fn, lam=-0.1), "lam"),
        (lambda: sam_optax.mrwp_grad(loss_fn, lam=1.5), "lam"),
        (lambda: sam_optax.mrwp_grad(loss_fn, lam=float("nan")), "lam"),
        (lambda: sam_optax.mrwp_grad(loss_fn, lam="0.5"), "lam"),
        (lambda: sam_optax.mrwp_grad(loss_fn, sigma=-0.01), "sigma"),
        (lambda: sam_optax.mrwp_grad(loss_fn, eta=-1.0), "eta"),
        (lambda: sam_optax.mrwp_grad(loss_fn, beta=1.5), "beta"),
        (lambda: sam_optax.mrwp_grad(None), "loss_fn"),
        (lambda: sam_optax.mrwp_step(loss_fn, "sgd"), "tx"),
        (lambda: sam_optax.mrwp_step(loss_fn, optax.sgd(0.1), lam=2.0), "lam"),
    ],
)
def test_mrwp_bad_arguments_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()
