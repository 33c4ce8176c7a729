"""Weight averaging (SWA, EMA, Lookahead) around SAM-family rules: trajectories against
hand-written references, identities, optax agreement, checkpoints, jit hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_params, sam_grads_by_hand, tmap, train
from sam_optax import averaging, geometry

RHO = 0.05
P0 = make_params()
BATCHES = batches(8, seed=21)
GRAD = jax.jit(jax.grad(loss_fn))


def mean_of(trees):
    return tmap(lambda *xs: sum(xs) / len(xs), *trees)


def hand_momentum_sgd(direction, lr=0.1, beta=0.9, steps=8, post=None):
    """Weights after each step of SGD-momentum (optax: m = d + beta m) on direction(g, gp)."""
    w, m, out = P0, tmap(jnp.zeros_like, P0), [P0]
    for b in BATCHES[:steps]:
        g, gp = sam_grads_by_hand(w, b, RHO)
        m = tmap(lambda mi, di: di + beta * mi, m, direction(g, gp))
        w = tmap(lambda wi, mi: wi - lr * mi, w, m)
        if post is not None:
            w = tmap(lambda wi, pi: wi + pi, w, post(g, gp))
        out.append(w)
    return out


# ---- SWA ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("start, period", [(2, 3), (0, 4)])
def test_wsam_swa_average_is_mean_of_snapshots(start, period):
    gamma, lr = 0.9, 0.1
    tx = averaging.swa(sam_optax.wsam(optax.sgd(lr, momentum=0.9), gamma, learning_rate=lr), start, period)
    got, state = train(tx, geometry.l2(RHO), P0, BATCHES)
    a = gamma / (1 - gamma)
    traj = hand_momentum_sgd(lambda g, gp: g, post=lambda g, gp: tmap(lambda x, y: -lr * a * (y - x), g, gp))
    snapshots = [i for i in range(len(traj)) if i >= start and (i - start) % period == 0]
    assert snapshots == ([2, 5, 8] if start == 2 else [0, 4, 8])
    assert int(state.n_averaged) == 3
    assert_trees_close(got, traj[-1], rtol=1e-5, atol=1e-6)  # SWA leaves the trajectory alone
    assert_trees_close(averaging.swa_params(state), mean_of([traj[i] for i in snapshots]), rtol=1e-5, atol=1e-6)


def test_swa_before_first_snapshot_holds_initial_weights_and_first_snapshot_copies():
    tx = averaging.swa(optax.sgd(0.1), start_step=2)
    state = tx.init(P0)
    params = P0
    for i, b in enumerate(BATCHES[:2]):
        u, state = tx.update(GRAD(params, b), state, params)
        params = optax.apply_updates(params, u)
        if i == 0:
            assert int(state.n_averaged) == 0
            assert_trees_close(averaging.swa_params(state), P0, rtol=0, atol=0)
    assert int(state.n_averaged) == 1
    assert_trees_close(averaging.swa_params(state), params, rtol=0, atol=0)


def test_swa_schedules():
    cyc = averaging.swa_cyclic_schedule(0.05, 0.01, 4)
    for count in range(12):
        i = count + 1
        t = ((i - 1) % 4 + 1) / 4
        np.testing.assert_allclose(cyc(count), (1 - t) * 0.05 + t * 0.01, rtol=1e-6)
    assert float(cyc(3)) == pytest.approx(0.01) and float(cyc(7)) == pytest.approx(0.01)

    def official(epoch, lr_init=0.1, swa_lr=0.05, swa_start=161):  # train.py::schedule
        t = epoch / swa_start
        r = swa_lr / lr_init
        factor = 1.0 if t <= 0.5 else (1.0 - (1.0 - r) * (t - 0.5) / 0.4 if t <= 0.9 else r)
        return lr_init * factor

    sched = averaging.swa_official_schedule(0.1, 0.05, 161, steps_per_epoch=3)
    for epoch in [0, 80, 81, 100, 144, 145, 161, 199]:
        for k in range(3):
            np.testing.assert_allclose(sched(3 * epoch + k), official(epoch), rtol=1e-6)


# ---- EMA ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("debias", [False, True])
def test_sam_ema_by_hand(debias):
    d = 0.7
    tx = averaging.weight_ema(sam_optax.sam(optax.sgd(0.1, momentum=0.9)), d, debias=debias)
    got, state = train(tx, geometry.l2(RHO), P0, BATCHES)
    traj = hand_momentum_sgd(lambda g, gp: gp)
    t = len(traj) - 1
    if debias:  # sum_s d^(t-s) (1-d) w_s / (1 - d^t), s = 1..t, written out (no recursion)
        want = tmap(lambda *ws: sum(d ** (t - s) * (1 - d) * ws[s] for s in range(1, t + 1)) / (1 - d**t), *traj)
        # = optax.ema (of updates) fed with the weights
        ema = optax.ema(d, debias=True)
        es = ema.init(P0)
        for w in traj[1:]:
            from_optax, es = ema.update(w, es)
        assert_trees_close(want, from_optax, rtol=1e-5, atol=1e-6)
    else:
        want = traj[0]
        for w in traj[1:]:
            want = tmap(lambda e, wi: d * e + (1 - d) * wi, want, w)
    assert_trees_close(got, traj[-1], rtol=1e-5, atol=1e-6)
    assert_trees_close(averaging.ema_params(state), want, rtol=1e-5, atol=1e-6)


# ---- Lookahead -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("momentum", ["none", "reset", "pullback"])
def test_sam_inside_lookahead_by_hand(momentum):
    k, alpha, lr, beta = 3, 0.5, 0.1, 0.9
    tx = averaging.lookahead(sam_optax.sam(optax.sgd(lr, momentum=beta)), k, alpha, momentum=momentum)
    got, state = train(tx, geometry.l2(RHO), P0, BATCHES[:7])

    fast, slow = P0, P0
    buf, cached = tmap(jnp.zeros_like, P0), tmap(jnp.zeros_like, P0)
    for t, b in enumerate(BATCHES[:7], start=1):
        _, gp = sam_grads_by_hand(fast, b, RHO)
        buf = tmap(lambda mi, gi: gi + beta * mi, buf, gp)
        fast = tmap(lambda wi, mi: wi - lr * mi, fast, buf)
        if t % k == 0:  # official step(): interpolate, cache, then the momentum option
            slow = tmap(lambda f, s: alpha * f + (1 - alpha) * s, fast, slow)
            fast = slow
            if momentum == "reset":
                buf = tmap(jnp.zeros_like, buf)
            elif momentum == "pullback":
                buf = tmap(lambda mi, ci: alpha * mi + (1 - alpha) * ci, buf, cached)
                cached = buf
    assert_trees_close(got, fast, rtol=1e-5, atol=1e-6)
    assert_trees_close(averaging.lookahead_slow_params(state), slow, rtol=1e-5, atol=1e-6)
    trace = state.inner_state.inner_state[0].trace
    assert_trees_close(trace, buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", ["none", "pullback"])
def test_lookahead_k1_alpha1_is_inner_optimizer(momentum):
    inner = optax.adam(1e-2)
    la = averaging.lookahead(inner, sync_period=1, slow_step_size=1.0, momentum=momentum)
    p1 = p2 = P0
    s1, s2 = la.init(P0), inner.init(P0)
    for b in BATCHES:
        u1, s1 = la.update(GRAD(p1, b), s1, p1)
        u2, s2 = inner.update(GRAD(p2, b), s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    assert_trees_close(p1, p2, rtol=1e-6, atol=1e-7)
    assert_trees_close(averaging.lookahead_slow_params(s1), p2, rtol=1e-6, atol=1e-7)


def test_lookahead_agrees_with_optax_lookahead():
    k, alpha = 3, 0.6
    ours_tx = averaging.lookahead(optax.sgd(0.1, momentum=0.9), k, alpha)
    theirs_tx = optax.lookahead(optax.sgd(0.1, momentum=0.9), k, alpha)
    p, s = P0, ours_tx.init(P0)
    lp = optax.LookaheadParams.init_synced(P0)
    ls = theirs_tx.init(lp)
    for b in BATCHES[:7]:
        u, s = ours_tx.update(GRAD(p, b), s, p)
        p = optax.apply_updates(p, u)
        lu, ls = theirs_tx.update(GRAD(lp.fast, b), ls, lp)
        lp = optax.apply_updates(lp, lu)
    assert_trees_close(p, lp.fast, rtol=1e-6, atol=1e-7)
    assert_trees_close(averaging.lookahead_slow_params(s), lp.slow, rtol=1e-6, atol=1e-7)


def test_lookahead_reset_zeroes_adams_first_moment_only():
    k = 2
    la = averaging.lookahead(optax.adam(1e-2), sync_period=k, slow_step_size=0.5, momentum="reset")
    inner = optax.adam(1e-2)
    p, s = P0, la.init(P0)
    q, si = P0, inner.init(P0)
    for b in BATCHES[:k]:
        u, s = la.update(GRAD(p, b), s, p)
        p = optax.apply_updates(p, u)
        ui, si = inner.update(GRAD(q, b), si, q)  # same fast trajectory up to the first sync
        q = optax.apply_updates(q, ui)
    adam = s.inner_state[0]
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(adam.mu))
    assert_trees_close(adam.nu, si[0].nu, rtol=1e-6, atol=1e-12)  # second moments untouched
    assert int(adam.count) == k  # and the bias-correction count too
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(si[0].mu))


def test_lookahead_momentum_options_need_buffers():
    with pytest.raises(ValueError, match="momentum_fields"):
        averaging.lookahead(optax.sgd(0.1), momentum="reset").init(P0)
    # Adam's first moment is found by default, its second moment never touched
    st = averaging.lookahead(optax.adam(0.1), momentum="reset").init(P0)
    names = {jax.tree_util.keystr(p) for p, _ in averaging.momentum_leaves(st.inner_state)}
    assert names and all(".mu" in n and ".nu" not in n for n in names)


# ---- composition: nesting, accessors, checkpoints, jit ------------------------------------


def nested(dtype=None):
    """EMA of SWA of Lookahead of WSAM: every wrapper sees final updates from the next."""
    rule = sam_optax.wsam(optax.sgd(0.05, momentum=0.9), 0.8, learning_rate=0.05)
    la = averaging.lookahead(rule, 2, 0.5, momentum="pullback")
    return averaging.weight_ema(
        averaging.swa(la, 1, 2, accumulator_dtype=dtype), 0.9, debias=True, accumulator_dtype=dtype
    )


def make_step(tx, donate=False):
    f = sam_optax.sharpness_aware_grad(loss_fn, geometry.l2(RHO))

    def step(params, state, batch):
        out = f(params, batch)
        u, state = tx.update(out.grads, state, params, perturbed_grads=out.perturbed_grads)
        return optax.apply_updates(params, u), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


@pytest.mark.slow
def test_nested_wrappers_accessors_and_checkpoint_resume(tmp_path):
    tx = nested()
    step = make_step(tx)
    p, s = P0, tx.init(P0)
    for b in BATCHES:
        p, s = step(p, s, b)
    assert step._cache_size() == 1  # no recompilation across syncs and snapshots
    uninterrupted = (p, averaging.ema_params(s), averaging.swa_params(s), averaging.lookahead_slow_params(s))
    chained = optax.chain(optax.identity(), tx).init(P0)
    assert_trees_close(averaging.swa_params(chained), P0, rtol=0, atol=0)

    p, s = P0, tx.init(P0)
    for b in BATCHES[:3]:
        p, s = step(p, s, b)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    ckpt.wait_until_finished()
    tx2 = nested()
    target = {"params": P0, "opt_state": jax.eval_shape(tx2.init, P0)}
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
    assert type(restored["opt_state"]) is type(s)
    p, s = restored["params"], restored["opt_state"]
    for b in BATCHES[3:]:
        p, s = step(p, s, b)
    resumed = (p, averaging.ema_params(s), averaging.swa_params(s), averaging.lookahead_slow_params(s))
    assert_trees_close(resumed, uninterrupted, rtol=0, atol=0)


@pytest.mark.slow
def test_buffer_donation_and_bf16():
    params = make_params(dtype=jnp.bfloat16)
    tx = nested(dtype=jnp.float32)
    state = tx.init(params)
    step = make_step(tx, donate=True)
    for b in BATCHES[:3]:
        params, state = step(params, state, b)  # state never aliases params
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(averaging.swa_params(state)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(averaging.lookahead_slow_params(state)))


def test_accessor_without_its_state_is_a_clear_error():
    with pytest.raises(ValueError, match="SWAState"):
        averaging.swa_params(optax.sgd(0.1).init(P0))


def test_inject_hyperparams_slow_step_size():
    tx = optax.inject_hyperparams(averaging.lookahead)(optax.sgd(1.0), sync_period=1, slow_step_size=1.0)
    state = tx.init(P0)
    g = tmap(jnp.ones_like, P0)
    update = jax.jit(lambda s, p: tx.update(g, s, p))
    u, state = update(state, P0)  # alpha = 1: fast = slow = P0 - 1
    assert_trees_close(u, tmap(lambda x: -x, g))
    state.hyperparams["slow_step_size"] = jnp.full_like(state.hyperparams["slow_step_size"], 0.25)
    u, state = update(state, tmap(lambda p: p - 1.0, P0))  # fast step to P0 - 2, slow to P0 - 1.25
    assert_trees_close(u, tmap(lambda x: -0.25 * x, g))
    assert_trees_close(averaging.lookahead_slow_params(state), tmap(lambda p: p - 1.25, P0))
    assert update._cache_size() == 1


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: averaging.swa(optax.sgd(0.1), start_step=-1), "start_step"),
        (lambda: averaging.swa(optax.sgd(0.1), 0, period=0), "period"),
        (lambda: averaging.swa_cyclic_schedule(0.1, 0.01, 0), "cycle_length"),
        (lambda: averaging.swa_official_schedule(0.1, 0.05, 0), "swa_start"),
        (lambda: averaging.weight_ema(optax.sgd(0.1), 1.0), "decay"),
        (lambda: averaging.lookahead(optax.sgd(0.1), 0), "sync_period"),
        (lambda: averaging.lookahead(optax.sgd(0.1), 5, 1.5), "slow_step_size"),
        (lambda: averaging.lookahead(optax.sgd(0.1), momentum="pull"), "momentum"),
        (lambda: averaging.replicate(P0, 0), "num_replicas"),
    ],
)
def test_bad_hyperparameters_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_wrappers_need_params():
    for tx in [
        averaging.swa(optax.sgd(0.1), 0),
        averaging.weight_ema(optax.sgd(0.1)),
        averaging.lookahead(optax.sgd(0.1)),
    ]:
        with pytest.raises(ValueError, match="params"):
            tx.update(P0, tx.init(P0))


def test_swap_replicate_and_average():
    stacked = averaging.replicate(P0, 3)
    stacked = tmap(lambda x: x * jnp.arange(1.0, 4.0).reshape((3,) + (1,) * (x.ndim - 1)), stacked)
    assert_trees_close(averaging.average_replicas(stacked), tmap(lambda x: 2.0 * x, P0))
