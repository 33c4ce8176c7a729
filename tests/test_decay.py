"""Decoupled weight decay: Algorithms 1 and 2 of Loshchilov & Hutter written out by hand,
the optax.adamw conversion, Propositions 1 and 2, and the App. B schedules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_params, sam_grads_by_hand, tmap, train
from sam_optax import decay, geometry

P0 = make_params()
STEPS = 8
BATCHES = batches(STEPS, seed=11)
ETA = decay.cosine_warm_restarts(3, t_mult=2.0, eta_min=0.1)  # restarts at steps 3 and 9
GRAD = jax.jit(jax.grad(loss_fn))


def run(tx, steps=STEPS, params=P0):
    """Plain (non-SAM) training with clean gradients."""
    state = tx.init(params)

    @jax.jit
    def step(p, s, b):
        u, s = tx.update(jax.grad(loss_fn)(p, b), s, p)
        return optax.apply_updates(p, u), s

    for b in BATCHES[:steps]:
        params, state = step(params, state, b)
    return params


def dist(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- Algorithms 1 and 2, line by line -----------------------------------------------------
# SetScheduleMultiplier(t) for the paper's 1-based t is the optax schedule at count t - 1.


def algorithm_1(alpha, beta1, lam, eta_fn, steps=STEPS):
    theta, m = P0, tmap(jnp.zeros_like, P0)
    for t in range(1, steps + 1):
        g = GRAD(theta, BATCHES[t - 1])  # line 5-6
        eta = float(eta_fn(t - 1))  # line 7
        m = tmap(lambda mi, gi: beta1 * mi + eta * alpha * gi, m, g)  # line 8
        theta = tmap(lambda th, mi: th - mi - eta * lam * th, theta, m)  # line 9 (SGDW)
    return theta


def algorithm_2(alpha, lam, eta_fn, b1=0.9, b2=0.999, eps=1e-8, steps=STEPS):
    theta = P0
    m, v = tmap(jnp.zeros_like, P0), tmap(jnp.zeros_like, P0)
    for t in range(1, steps + 1):
        g = GRAD(theta, BATCHES[t - 1])
        m = tmap(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = tmap(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        m_hat = tmap(lambda mi: mi / (1 - b1**t), m)
        v_hat = tmap(lambda vi: vi / (1 - b2**t), v)
        eta = float(eta_fn(t - 1))
        theta = tmap(
            lambda th, mh, vh: th - eta * (alpha * mh / (jnp.sqrt(vh) + eps) + lam * th), theta, m_hat, v_hat
        )  # line 12 (AdamW)
    return theta


@pytest.mark.slow
def test_sgdw_is_algorithm_1():
    got = run(decay.sgdw(0.1, 0.9, weight_decay=0.02, schedule_multiplier=ETA))
    assert_trees_close(got, algorithm_1(0.1, 0.9, 0.02, ETA), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("eps", [1e-8, 1e-2])
def test_adamw_is_algorithm_2(eps):
    # eps = 1e-2 is of the size of sqrt(v_hat) here, so its place (outside the square root,
    # line 12) matters far beyond the tolerance
    got = run(decay.adamw(0.01, eps=eps, weight_decay=0.03, schedule_multiplier=ETA))
    assert_trees_close(got, algorithm_2(0.01, 0.03, ETA, eps=eps), rtol=1e-5, atol=1e-6)
    if eps > 1e-3:
        inside = run(decay.adamw(0.01, eps=0.0, eps_root=eps**2, weight_decay=0.03, schedule_multiplier=ETA))
        assert dist(got, inside) > 1e-3


@pytest.mark.slow
def test_adamw_equals_optax_adamw_with_converted_weight_decay():
    alpha, lam = 0.01, 0.03
    ours = run(decay.adamw(alpha, weight_decay=lam, schedule_multiplier=ETA))
    theirs = run(optax.adamw(lambda c: alpha * ETA(c), weight_decay=lam / alpha))
    assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # without the conversion optax decays alpha times less
    unconverted = run(optax.adamw(lambda c: alpha * ETA(c), weight_decay=lam))
    assert dist(ours, unconverted) > 1e-3


def test_sgdw_momentum_traces_lr_scaled_gradients_unlike_optax_sgd():
    # Algorithm 1 traces eta_t * alpha * g; optax.sgd traces g and scales by the current rate,
    # so with a changing schedule the two differ even without decay.
    ours = run(decay.sgdw(0.1, 0.9, weight_decay=0.0, schedule_multiplier=ETA))
    optax_sgd = run(optax.sgd(lambda c: 0.1 * ETA(c), momentum=0.9))
    assert dist(ours, optax_sgd) > 1e-4
    assert_trees_close(ours, algorithm_1(0.1, 0.9, 0.0, ETA), rtol=1e-5, atol=1e-6)


# ---- Propositions 1 and 2 ---------------------------------------------------------------


def test_proposition_1_sgd_decoupled_decay_is_l2_with_lambda_over_alpha():
    alpha, lam = 0.1, 0.02
    sgdw = run(decay.sgdw(alpha, momentum=0.0, weight_decay=lam, schedule_multiplier=ETA))
    l2 = run(optax.chain(optax.add_decayed_weights(lam / alpha), optax.sgd(lambda c: alpha * ETA(c))))
    assert_trees_close(sgdw, l2, rtol=1e-5, atol=1e-6)
    # with momentum the L2 term enters the trace: no longer equal
    sgdw_m = run(decay.sgdw(alpha, momentum=0.9, weight_decay=lam))
    l2_m = run(optax.chain(optax.add_decayed_weights(lam / alpha), optax.sgd(alpha, momentum=0.9)))
    assert dist(sgdw_m, l2_m) > 1e-4


@pytest.mark.slow
def test_proposition_2_adam_decoupled_decay_is_no_l2():
    alpha, lam = 0.01, 0.05
    adamw = run(decay.adamw(alpha, weight_decay=lam))
    no_decay = run(optax.adam(alpha))
    assert dist(adamw, no_decay) > 1e-2  # the decay matters
    # no L2 coefficient reproduces it: the closest one is still far (SGD: 1e-6, above)
    grid = (lam / alpha) * jnp.array([0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0])

    def adam_l2(l2):  # Algorithm 2 with the L2 variant of line 6
        tx, theta = optax.adam(alpha), P0
        state = tx.init(theta)
        for b in BATCHES:
            g = tmap(lambda gi, th: gi + l2 * th, jax.grad(loss_fn)(theta, b), theta)
            u, state = tx.update(g, state, theta)
            theta = optax.apply_updates(theta, u)
        return theta

    finals = jax.jit(jax.vmap(adam_l2))(grid)
    gaps = [dist(adamw, tmap(lambda x: x[i], finals)) for i in range(len(grid))]
    assert min(gaps) > 2e-3, gaps


# ---- composition with the SAM family, masks ---------------------------------------------


@pytest.mark.slow
def test_decay_chained_after_sam_rule_with_mask():
    alpha, lam, rho = 0.1, 0.05, 0.05
    tx = optax.chain(
        sam_optax.sam(optax.sgd(alpha)), decay.decoupled_weight_decay(lam, ETA, mask=decay.weight_decay_mask)
    )
    got, _ = train(tx, geometry.l2(rho), P0, BATCHES[:4])
    w = P0
    for t, b in enumerate(BATCHES[:4]):
        _, gp = sam_grads_by_hand(w, b, rho)
        eta = float(ETA(t))
        w = tmap(lambda wi, gi: wi - alpha * gi - (eta * lam * wi if wi.ndim >= 2 else 0.0), w, gp)
    assert_trees_close(got, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decay.weight_decay_mask(P0)["dense1"]["bias"], False)


def test_sgdw_as_base_of_wsam():
    # the trace sees wsam's base gradient (decoupled: the clean g); the decay the unperturbed weights
    alpha, beta, lam, gamma, rho = 0.1, 0.9, 0.01, 0.8, 0.05
    tx = sam_optax.wsam(decay.sgdw(alpha, beta, weight_decay=lam), gamma, learning_rate=alpha)
    got, _ = train(tx, geometry.l2(rho), P0, BATCHES[:4])
    w, m = P0, tmap(jnp.zeros_like, P0)
    for b in BATCHES[:4]:
        g, gp = sam_grads_by_hand(w, b, rho)
        m = tmap(lambda mi, gi: beta * mi + alpha * gi, m, g)
        w = tmap(lambda wi, mi, a, c: wi - mi - lam * wi - alpha * gamma / (1 - gamma) * (c - a), w, m, g, gp)
    assert_trees_close(got, w, rtol=1e-5, atol=1e-6)


# ---- App. B schedules ------------------------------------------------------------------


def restarts_by_hand(period, t_mult, steps):
    """(T_cur, T_i) for each step: T_cur advances by one batch; when it reaches T_i a new
    cycle T_{i+1} = T_mult T_i starts (a fractional overshoot is carried, as time is continuous)."""
    out, t_cur, t_i = [], 0.0, float(period)
    for _ in range(steps):
        out.append((t_cur, t_i))
        t_cur += 1
        if t_cur >= t_i:
            t_cur, t_i = t_cur - t_i, t_i * t_mult
    return out


@pytest.mark.parametrize("period, t_mult", [(4, 1.0), (3, 2.0), (5, 3.0), (10, 1.5)])
def test_cosine_warm_restarts_eq_14_15(period, t_mult):
    eta_min, eta_max = 0.05, 0.9
    sched = jax.jit(decay.cosine_warm_restarts(period, t_mult, eta_min, eta_max))
    norm = jax.jit(decay.normalized_weight_decay_restarts(0.025, period, t_mult))
    for count, (t_cur, t_i) in enumerate(restarts_by_hand(period, t_mult, 300)):
        want = eta_min + 0.5 * (eta_max - eta_min) * (1 + np.cos(np.pi * t_cur / t_i))
        np.testing.assert_allclose(sched(count), want, rtol=2e-5, atol=2e-6, err_msg=str(count))
        np.testing.assert_allclose(norm(count), 0.025 / np.sqrt(t_i), rtol=1e-5, err_msg=str(count))


def test_normalized_weight_decay_app_b1():
    lam = decay.normalized_weight_decay(0.025, batch_size=128, dataset_size=50_000, epochs=100)
    assert lam == pytest.approx(0.025 * np.sqrt(128 / (50_000 * 100)), rel=1e-12)
    # = lambda_norm / sqrt(total steps) when the epoch is a whole number of batches
    assert decay.normalized_weight_decay(0.05, 100, 1000, 8) == pytest.approx(0.05 / np.sqrt(10 * 8))


# ---- jit, dtypes, injection, validation ---------------------------------------------------


@pytest.mark.slow
def test_compiles_once_across_restarts_and_keeps_bf16():
    params = make_params(dtype=jnp.bfloat16)
    tx = decay.adamw(1e-2, weight_decay=1e-2, schedule_multiplier=ETA, mask=decay.weight_decay_mask)
    state = tx.init(params)
    step = jax.jit(lambda p, s, b: tx.update(jax.grad(loss_fn)(p, b), s, p))
    for b in BATCHES:
        u, state = step(params, state, b)
        params = optax.apply_updates(params, u)
    assert step._cache_size() == 1
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


def test_inject_hyperparams_weight_decay():
    tx = optax.inject_hyperparams(decay.sgdw)(learning_rate=0.1, momentum=0.0, weight_decay=0.5)
    state = tx.init(P0)
    zero = tmap(jnp.zeros_like, P0)
    update = jax.jit(lambda s: tx.update(zero, s, P0))
    u, state = update(state)
    assert_trees_close(u, tmap(lambda p: -0.5 * p, P0))
    state.hyperparams["weight_decay"] = jnp.full_like(state.hyperparams["weight_decay"], 0.25)
    u, state = update(state)
    assert_trees_close(u, tmap(lambda p: -0.25 * p, P0))
    assert update._cache_size() == 1


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: decay.adamw(1e-3, weight_decay=-1.0), "weight_decay"),
        (lambda: decay.adamw(optax.constant_schedule(1e-3), weight_decay=0.1), "schedule_multiplier"),
        (lambda: decay.adamw(1e-3, b1=1.0, weight_decay=0.1), "b1"),
        (lambda: decay.sgdw(0.1, momentum=1.5, weight_decay=0.1), "momentum"),
        (lambda: decay.sgdw(-0.1, weight_decay=0.1), "learning_rate"),
        (lambda: decay.decoupled_weight_decay(0.1, schedule_multiplier=-1.0), "schedule_multiplier"),
        (lambda: decay.cosine_warm_restarts(0), "period"),
        (lambda: decay.cosine_warm_restarts(10, t_mult=0.5), "t_mult"),
        (lambda: decay.cosine_warm_restarts(10, eta_min=0.5, eta_max=0.1), "eta_max"),
        (lambda: decay.normalized_weight_decay(0.025, 0, 100, 10), "batch_size"),
        (lambda: decay.normalized_weight_decay(0.025, 10, 100, 0), "epochs"),
    ],
)
def test_bad_hyperparameters_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_decay_needs_params():
    tx = decay.decoupled_weight_decay(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(P0, tx.init(P0))


def test_partial_mask():
    mask = functools.partial(decay.weight_decay_mask, min_ndim=1)
    tx = decay.decoupled_weight_decay(0.5, mask=mask)
    u, _ = tx.update(tmap(jnp.zeros_like, P0), tx.init(P0), P0)
    assert_trees_close(u, tmap(lambda p: -0.5 * p if p.ndim >= 1 else jnp.zeros_like(p), P0))
