"""Combination rules: hand-written update rules over several steps, identities,
and composition with standard optax pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_optax
from helpers import (
    assert_trees_close,
    batches,
    loss_fn,
    make_params,
    sam_grads_by_hand,
    tmap,
    train,
    tree_norm,
)
from sam_optax import geometry

RHO = 0.05
STEPS = 4
BATCHES = batches(STEPS)
P0 = make_params()


def vdot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- hand-written references -----------------------------------------------------------


def hand_momentum(direction, lr=0.1, beta=0.9, post=None):
    """SGD with momentum (optax convention m = d + beta m) on direction(g, gp, w, t)."""
    w, mom = P0, tmap(jnp.zeros_like, P0)
    for t, b in enumerate(BATCHES):
        g, gp = sam_grads_by_hand(w, b, RHO)
        d = direction(g, gp, w, t)
        mom = tmap(lambda mi, di: di + beta * mi, mom, d)
        new = tmap(lambda wi, mi: wi - lr * mi, w, mom)
        if post is not None:
            new = tmap(lambda ni, pi: ni + pi, new, post(g, gp, w, t))
        w = new
    return w


def hand_adam(direction, lr_fn, b1=0.9, b2=0.999, eps=1e-8, post=None):
    w = P0
    m, v = tmap(jnp.zeros_like, P0), tmap(jnp.zeros_like, P0)
    for t, b in enumerate(BATCHES):
        g, gp = sam_grads_by_hand(w, b, RHO)
        d = direction(g, gp, w, t)
        m = tmap(lambda mi, di: b1 * mi + (1 - b1) * di, m, d)
        v = tmap(lambda vi, di: b2 * vi + (1 - b2) * di * di, v, d)
        k = t + 1
        step = tmap(lambda mi, vi: (mi / (1 - b1**k)) / (jnp.sqrt(vi / (1 - b2**k)) + eps), m, v)
        new = tmap(lambda wi, si: wi - lr_fn(t) * si, w, step)
        if post is not None:
            new = tmap(lambda ni, pi: ni + pi, new, post(g, gp, w, t))
        w = new
    return w


LR_SCHED = optax.cosine_decay_schedule(1e-2, decay_steps=STEPS)


# ---- each rule against its formula ---------------------------------------------------


def test_sam_momentum_by_hand():
    got, _ = train(sam_optax.sam(optax.sgd(0.1, momentum=0.9)), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(got, hand_momentum(lambda g, gp, w, t: gp))


def test_sam_adam_schedule_by_hand():
    got, _ = train(sam_optax.sam(optax.adam(LR_SCHED)), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(got, hand_adam(lambda g, gp, w, t: gp, LR_SCHED), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.6, 0.9])
def test_wsam_decoupled_adam_by_hand(gamma):
    alpha = gamma / (1 - gamma)
    tx = sam_optax.wsam(optax.adam(LR_SCHED), gamma, learning_rate=LR_SCHED)
    got, _ = train(tx, geometry.l2(RHO), P0, BATCHES)
    want = hand_adam(
        lambda g, gp, w, t: g,
        LR_SCHED,
        post=lambda g, gp, w, t: tmap(lambda a, b: -LR_SCHED(t) * alpha * (b - a), g, gp),
    )
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_wsam_decoupled_momentum_by_hand():
    gamma, lr = 0.9, 0.1
    alpha = gamma / (1 - gamma)
    tx = sam_optax.wsam(optax.sgd(lr, momentum=0.9), gamma, learning_rate=lr)
    got, _ = train(tx, geometry.l2(RHO), P0, BATCHES)
    want = hand_momentum(
        lambda g, gp, w, t: g, lr=lr, post=lambda g, gp, w, t: tmap(lambda a, b: -lr * alpha * (b - a), g, gp)
    )
    assert_trees_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("gamma", [0.3, 0.8])
def test_wsam_coupled_adam_by_hand(gamma):
    tx = sam_optax.wsam(optax.adam(LR_SCHED), gamma, decouple=False)
    got, _ = train(tx, geometry.l2(RHO), P0, BATCHES)

    def coupled(g, gp, w, t):
        return tmap(lambda a, b: ((1 - 2 * gamma) * a + gamma * b) / (1 - gamma), g, gp)

    assert_trees_close(got, hand_adam(coupled, LR_SCHED), rtol=1e-5, atol=1e-6)


def test_gsam_momentum_by_hand():
    alpha = 0.3

    def direction(g, gp, w, t):
        coef = vdot(g, gp) / vdot(gp, gp)
        return tmap(lambda a, b: b - alpha * (a - coef * b), g, gp)

    got, _ = train(sam_optax.gsam(optax.sgd(0.1, momentum=0.9), alpha), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(got, hand_momentum(direction), rtol=1e-5, atol=1e-6)


def test_gsam_surrogate_step_is_orthogonal_to_perturbed_grad():
    g, gp = sam_grads_by_hand(P0, BATCHES[0], RHO)
    tx = sam_optax.gsam(optax.sgd(1.0), alpha=1.0)
    u, _ = tx.update(g, tx.init(P0), P0, perturbed_grads=gp)
    # u = -(gp - g_perp): its component beyond -gp is orthogonal to gp
    extra = tmap(lambda a, b: a + b, u, gp)
    np.testing.assert_allclose(vdot(extra, gp), 0.0, atol=1e-6)


def test_gsam_rho_schedule_formula():
    lr = optax.linear_schedule(1.0, 0.1, transition_steps=9)
    rho = sam_optax.gsam_rho_schedule(lr, rho_max=0.04, rho_min=0.02, lr_max=1.0, lr_min=0.1)
    for t in [0, 3, 9]:
        np.testing.assert_allclose(rho(t), 0.02 + 0.02 * (lr(t) - 0.1) / 0.9, rtol=1e-6)
    assert float(sam_optax.gsam_rho_schedule(0.1, 0.05, 0.01)(7)) == pytest.approx(0.05)


def test_max_norm_clips_both_gradients():
    max_norm = 0.05

    def clip(t):
        return tmap(lambda x: x * jnp.minimum(1.0, max_norm / tree_norm(t)), t)

    gamma, alpha = 0.8, 4.0
    g, gp = sam_grads_by_hand(P0, BATCHES[0], RHO)
    assert tree_norm(g) > max_norm and tree_norm(gp) > max_norm
    tx = sam_optax.wsam(optax.sgd(0.1), gamma, learning_rate=0.1, max_norm=max_norm)
    u, _ = tx.update(g, tx.init(P0), P0, perturbed_grads=gp)
    cg, cgp = clip(g), clip(gp)
    assert_trees_close(u, tmap(lambda a, b: -0.1 * a - 0.1 * alpha * (b - a), cg, cgp))


# ---- identities ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam_gamma0_is_base(decouple):
    base = optax.adam(1e-2)
    got, _ = train(sam_optax.wsam(base, 0.0, learning_rate=1e-2, decouple=decouple), geometry.l2(RHO), P0, BATCHES)
    want, state = P0, base.init(P0)
    for b in BATCHES:
        u, state = base.update(jax.grad(loss_fn)(want, b), state, want)
        want = optax.apply_updates(want, u)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_coupled_wsam_half_is_sam():
    base = optax.adam(1e-2)
    a, _ = train(sam_optax.wsam(base, 0.5, decouple=False), geometry.l2(RHO), P0, BATCHES)
    b, _ = train(sam_optax.sam(base), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_decoupled_equals_coupled_for_plain_sgd():
    lr = optax.exponential_decay(0.2, 1, 0.7)
    a, _ = train(sam_optax.wsam(optax.sgd(lr), 0.85, learning_rate=lr), geometry.l2(RHO), P0, BATCHES)
    b, _ = train(sam_optax.wsam(optax.sgd(lr), 0.85, decouple=False), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gsam_alpha0_constant_rho_is_sam():
    lr = optax.linear_schedule(0.1, 0.01, STEPS)
    rho = sam_optax.gsam_rho_schedule(lr, rho_max=RHO, rho_min=RHO, lr_max=0.1, lr_min=0.01)
    a, _ = train(sam_optax.gsam(optax.sgd(lr, momentum=0.9), alpha=0.0), geometry.l2(rho), P0, BATCHES)
    b, _ = train(sam_optax.sam(optax.sgd(lr, momentum=0.9)), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["sam", "wsam", "gsam"])
def test_fisher_eta0_equals_l2_for_every_rule(rule):
    make = {
        "sam": lambda: sam_optax.sam(optax.sgd(0.1, momentum=0.9)),
        "wsam": lambda: sam_optax.wsam(optax.sgd(0.1, momentum=0.9), 0.9, learning_rate=0.1),
        "gsam": lambda: sam_optax.gsam(optax.sgd(0.1, momentum=0.9), 0.2),
    }[rule]
    a, _ = train(make(), geometry.fisher(RHO, eta=0.0), P0, BATCHES)
    b, _ = train(make(), geometry.l2(RHO), P0, BATCHES)
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


# ---- composition with optax pieces -----------------------------------------------------


def test_pieces_inside_base_see_the_perturbed_gradient():
    wd, lr, c = 1e-2, 0.1, 0.05
    tx = sam_optax.sam(optax.chain(optax.clip_by_global_norm(c), optax.add_decayed_weights(wd), optax.sgd(lr)))
    got, _ = train(tx, geometry.l2(RHO), P0, BATCHES[:2])
    w = P0
    for b in BATCHES[:2]:
        _, gp = sam_grads_by_hand(w, b, RHO)
        gp = tmap(lambda x: x * jnp.minimum(1.0, c / tree_norm(gp)), gp)
        w = tmap(lambda wi, gi: wi - lr * (gi + wd * wi), w, gp)
    assert_trees_close(got, w)


def test_chain_forwards_perturbed_grads_and_pieces_before_see_clean_grads():
    # a piece before the rule only sees (and here zeroes) the clean gradient
    g, gp = sam_grads_by_hand(P0, BATCHES[0], RHO)
    tx = optax.chain(optax.scale(0.0), sam_optax.sam(optax.sgd(1.0)), optax.scale(2.0))
    u, _ = tx.update(g, tx.init(P0), P0, perturbed_grads=gp)
    assert_trees_close(u, tmap(lambda x: -2.0 * x, gp))
    tx = optax.chain(optax.scale(0.0), sam_optax.wsam(optax.sgd(1.0), 0.5, decouple=False))
    u, _ = tx.update(g, tx.init(P0), P0, perturbed_grads=gp)
    assert_trees_close(u, tmap(lambda x: -x, gp))  # coupled 1/2: only g_pert counts


def test_missing_perturbed_grads_is_a_clear_error():
    tx = sam_optax.sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="perturbed_grads"):
        tx.update(P0, tx.init(P0), P0)


def test_inject_hyperparams_gamma_and_learning_rate():
    g, gp = sam_grads_by_hand(P0, BATCHES[0], RHO)
    tx = optax.inject_hyperparams(sam_optax.wsam)(optax.sgd(0.1), gamma=0.5, learning_rate=0.1)
    state = tx.init(P0)
    update = jax.jit(lambda g, s, p, gp: tx.update(g, s, p, perturbed_grads=gp))
    u1, state = update(g, state, P0, gp)
    assert_trees_close(u1, tmap(lambda a, b: -0.1 * a - 0.1 * (b - a), g, gp))
    state.hyperparams["gamma"] = jnp.full_like(state.hyperparams["gamma"], 0.75)
    u2, state = update(g, state, P0, gp)
    assert_trees_close(u2, tmap(lambda a, b: -0.1 * a - 0.3 * (b - a), g, gp))
    assert update._cache_size() == 1


def test_decoupled_wsam_reads_lr_of_injected_base():
    sched = optax.exponential_decay(0.1, 1, 0.5)
    base = optax.inject_hyperparams(optax.sgd)(learning_rate=sched, momentum=0.9)
    a, _ = train(sam_optax.wsam(base, 0.9), geometry.l2(RHO), P0, BATCHES)
    b, _ = train(
        sam_optax.wsam(optax.sgd(sched, momentum=0.9), 0.9, learning_rate=sched), geometry.l2(RHO), P0, BATCHES
    )
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_multi_steps_base_accumulates_per_microbatch_sam():
    """sam(MultiSteps(base, k)) over k micro-batches == SAM with m = micro-batch on the whole batch."""
    k, micro = 4, 8
    big = BATCHES[0]
    micro_batches = [jax.tree.map(lambda a: a[i * micro : (i + 1) * micro], big) for i in range(k)]
    for rule in [lambda b: sam_optax.sam(b), lambda b: sam_optax.wsam(b, 0.7, decouple=False)]:
        accumulated, _ = train(
            rule(optax.MultiSteps(optax.sgd(0.1, momentum=0.9), k)), geometry.l2(RHO), P0, micro_batches
        )
        whole, _ = train(rule(optax.sgd(0.1, momentum=0.9)), geometry.l2(RHO), P0, [big], m=micro)
        assert_trees_close(accumulated, whole, rtol=1e-5, atol=1e-6)


def test_multi_transform_freezes_leaves():
    labels = {
        "dense1": {"kernel": "train", "bias": "frozen"},
        "dense2": {"kernel": "train", "bias": "train"},
        "scale": "frozen",
    }
    tx = optax.multi_transform({"train": sam_optax.sam(optax.sgd(0.1)), "frozen": optax.set_to_zero()}, labels)
    got, _ = train(tx, geometry.l2(RHO), P0, BATCHES[:2])
    w = P0
    for b in BATCHES[:2]:
        _, gp = sam_grads_by_hand(w, b, RHO)
        w = tmap(lambda wi, gi, lab: wi if lab == "frozen" else wi - 0.1 * gi, w, gp, labels)
    assert_trees_close(got, w)
    assert_trees_close(got["dense1"]["bias"], P0["dense1"]["bias"], rtol=0, atol=0)


def test_masked_rule_reads_full_perturbed_grads():
    mask = {"dense1": {"kernel": True, "bias": False}, "dense2": {"kernel": True, "bias": False}, "scale": False}
    g, gp = sam_grads_by_hand(P0, BATCHES[0], RHO)
    tx = optax.masked(sam_optax.sam(optax.sgd(1.0)), mask)
    u, _ = tx.update(g, tx.init(P0), P0, perturbed_grads=gp)
    want = tmap(lambda a, b, mk: -b if mk else a, g, gp, mask)
    assert_trees_close(u, want)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: sam_optax.wsam(optax.sgd(0.1), gamma=1.0, learning_rate=0.1), "gamma"),
        (lambda: sam_optax.wsam(optax.sgd(0.1), gamma=-0.1, learning_rate=0.1), "gamma"),
        (lambda: sam_optax.wsam(optax.sgd(0.1), 0.9, learning_rate=-1.0), "learning_rate"),
        (lambda: sam_optax.gsam(optax.sgd(0.1), alpha=-0.5), "alpha"),
        (lambda: sam_optax.sam(optax.sgd(0.1), max_norm=0.0), "max_norm"),
        (lambda: sam_optax.gsam_rho_schedule(0.1, rho_max=0.01, rho_min=0.02), "rho_max"),
        (lambda: sam_optax.gsam_rho_schedule(optax.constant_schedule(0.1), 0.04, 0.02), "lr_max"),
        (lambda: sam_optax.wsam(optax.sgd(0.1), 0.9).init(P0), "learning rate"),
    ],
)
def test_bad_hyperparameters_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_bf16_params_stay_bf16():
    params = make_params(dtype=jnp.bfloat16)
    tx = sam_optax.wsam(optax.adam(1e-2), 0.9, learning_rate=1e-2)
    new, state = train(tx, geometry.adaptive(0.5), params, BATCHES[:2])
    for x in jax.tree.leaves(new):
        assert x.dtype == jnp.bfloat16
    for x in jax.tree.leaves(state.inner_state[0].mu):
        assert x.dtype == jnp.bfloat16


# ---- property tests: rule identities over random pytrees -----------------------------

_shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)


def _trees(shape_list, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3 * len(shape_list))

    def mk(j):
        return {f"l{i}": jax.random.normal(keys[3 * i + j], tuple(s)) for i, s in enumerate(shape_list)}

    return mk(0), mk(1), mk(2)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(_shapes, st.integers(0, 10_000), st.floats(0.0, 0.95), st.floats(0.001, 1.0))
def test_property_rule_identities(shape_list, seed, gamma, lr):
    g, gp, w = _trees(shape_list, seed)

    def upd(tx):
        return tx.update(g, tx.init(w), w, perturbed_grads=gp)[0]

    sgd = optax.sgd(lr)
    # decoupled == coupled for plain SGD
    assert_trees_close(
        upd(sam_optax.wsam(sgd, gamma, learning_rate=lr)),
        upd(sam_optax.wsam(sgd, gamma, decouple=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    # coupled 1/2 == sam; gsam alpha=0 == sam; wsam gamma=0 == base on g
    assert_trees_close(upd(sam_optax.wsam(sgd, 0.5, decouple=False)), upd(sam_optax.sam(sgd)), rtol=1e-5, atol=1e-6)
    assert_trees_close(upd(sam_optax.gsam(sgd, 0.0)), upd(sam_optax.sam(sgd)), rtol=0, atol=0)
    assert_trees_close(
        upd(sam_optax.wsam(sgd, 0.0, learning_rate=lr)), tmap(lambda x: -lr * x, g), rtol=1e-5, atol=1e-6
    )
