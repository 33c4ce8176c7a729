"""Where optax pieces go around a rule (issue #10 a, b, c, g): the clean_grads placement
check, apply_to_both, skip_nonfinite, accumulate, check_placement, and state field names.
Gradients are written by hand; numbers are checked against hand formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import assert_trees_close, tmap, tree_norm
from sam_optax import rules

P0 = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5])}
# three steps of (clean, perturbed) gradients, norms > 1 so that clipping to 1 acts
G = [
    {"w": jnp.array([0.9, -1.2, 0.4]), "b": jnp.array([0.8])},
    {"w": jnp.array([-0.5, 1.5, 1.0]), "b": jnp.array([-0.3])},
    {"w": jnp.array([2.0, 0.1, -0.7]), "b": jnp.array([0.6])},
]
GP = [
    {"w": jnp.array([1.3, -1.0, 0.9]), "b": jnp.array([1.1])},
    {"w": jnp.array([-0.9, 2.0, 1.2]), "b": jnp.array([-0.8])},
    {"w": jnp.array([2.4, -0.6, -1.0]), "b": jnp.array([0.2])},
]
LR, GAMMA = 0.1, 0.9
ALPHA = GAMMA / (1 - GAMMA)


def sam_sgd():
    return rules.sam(optax.sgd(LR))


def wsam_sgd():
    return rules.wsam(optax.sgd(LR), GAMMA, learning_rate=LR)


def step_fn(tx, *, clean=True):
    """The jitted step the library's helpers make: clean_grads is the very same g."""

    @jax.jit
    def step(p, s, g, gp):
        kw = {"clean_grads": g} if clean else {}
        u, s = tx.update(g, s, p, perturbed_grads=gp, **kw)
        return optax.apply_updates(p, u), s, u

    return step


def run(tx, grads=G, pgrads=GP, *, clean=True, p=P0):
    step, s, us = step_fn(tx, clean=clean), tx.init(p), []
    for g, gp in zip(grads, pgrads):
        p, s, u = step(p, s, g, gp)
        us.append(u)
    return p, s, us


def clip(t, c=1.0):
    return tmap(lambda x: x * jnp.minimum(1.0, c / tree_norm(t)), t)


def _update_clean(tx, jit):
    """One update with clean_grads=g, the same object as grads (as the library's steps pass it)."""
    f = lambda g, s, p, gp: tx.update(g, s, p, perturbed_grads=gp, clean_grads=g)  # noqa: E731
    return (jax.jit(f) if jit else f)(G[0], tx.init(P0), P0, GP[0])


# ---- 1. the clean_grads placement check --------------------------------------------------

MISPLACED = {
    "chain(clip, sam)": lambda: optax.chain(optax.clip_by_global_norm(1.0), sam_sgd()),
    "chain(decay, wsam)": lambda: optax.chain(optax.add_decayed_weights(0.01), wsam_sgd()),
    "MultiSteps(sam)": lambda: optax.MultiSteps(sam_sgd(), 2),
    "MultiSteps(wsam)": lambda: optax.MultiSteps(wsam_sgd(), 2),
    "chain(scale, apply_to_both)": lambda: optax.chain(
        optax.scale(2.0), rules.apply_to_both(optax.clip_by_global_norm(1.0), sam_sgd())
    ),
    "chain(scale, accumulate)": lambda: optax.chain(optax.scale(2.0), rules.accumulate(sam_sgd(), 2)),
    "chain(scale, skip_nonfinite)": lambda: optax.chain(optax.scale(2.0), rules.skip_nonfinite(sam_sgd(), 2)),
}

ALLOWED = {
    "chain(identity, sam)": lambda: optax.chain(optax.identity(), sam_sgd(), optax.scale(2.0)),
    "masked(sam)": lambda: optax.masked(sam_sgd(), {"w": True, "b": False}),
    "wsam(inject_hyperparams base)": lambda: rules.wsam(optax.inject_hyperparams(optax.sgd)(learning_rate=LR), GAMMA),
    "inject_hyperparams(wsam)": lambda: optax.inject_hyperparams(rules.wsam)(
        optax.sgd(LR), gamma=GAMMA, learning_rate=LR
    ),
    "multi_transform": lambda: optax.multi_transform(
        {"rule": wsam_sgd(), "frozen": optax.set_to_zero()}, {"w": "rule", "b": "frozen"}
    ),
    "sam(MultiSteps(sgd))": lambda: rules.sam(optax.MultiSteps(optax.sgd(LR), 2)),
    "nested wrappers": lambda: rules.skip_nonfinite(
        rules.accumulate(rules.apply_to_both(optax.add_decayed_weights(0.01), wsam_sgd()), 2), 1
    ),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(MISPLACED))
def test_piece_before_rule_raises_with_clean_grads(name, jit):
    tx = MISPLACED[name]()
    with pytest.raises(ValueError, match="changed the clean gradient") as e:
        _update_clean(tx, jit)
    for way in ["inside", "max_norm=", "apply_to_both", "accumulate", "skip_nonfinite"]:
        assert way in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", list(ALLOWED))
def test_transparent_wrappers_pass_the_check(name, jit):
    tx = ALLOWED[name]()
    with_check, _ = _update_clean(tx, jit)
    without, _ = tx.update(G[0], tx.init(P0), P0, perturbed_grads=GP[0])
    assert_trees_close(with_check, without)


def test_without_clean_grads_nothing_is_checked():
    # the old behaviour, kept for direct tx.update calls: the clip is silently lost on g_pert
    tx = optax.chain(optax.clip_by_global_norm(1.0), sam_sgd())
    u, _ = tx.update(G[0], tx.init(P0), P0, perturbed_grads=GP[0])
    assert_trees_close(u, tmap(lambda x: -LR * x, GP[0]))
    assert float(tree_norm(u)) > LR * 1.0


# ---- 2. apply_to_both ----------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["sam", "wsam"])
def test_apply_to_both_clips_both_gradients_by_hand(rule):
    tx = rules.apply_to_both(optax.clip_by_global_norm(1.0), {"sam": sam_sgd, "wsam": wsam_sgd}[rule]())
    got, _, us = run(tx)
    w = P0
    for t, (g, gp) in enumerate(zip(G, GP)):
        cg, cgp = clip(g), clip(gp)
        assert float(tree_norm(g)) > 1.0 and float(tree_norm(gp)) > 1.0
        if rule == "sam":
            want_u = tmap(lambda b: -LR * b, cgp)
            assert float(tree_norm(us[t])) <= LR * 1.0 + 1e-6
        else:
            want_u = tmap(lambda a, b: -LR * a - LR * ALPHA * (b - a), cg, cgp)
        assert_trees_close(us[t], want_u, rtol=1e-6, atol=1e-7)
        w = tmap(lambda x, u: x + u, w, want_u)
    assert_trees_close(got, w, rtol=1e-6, atol=1e-7)


def test_apply_to_both_equals_max_norm():
    a, _, _ = run(rules.apply_to_both(optax.clip_by_global_norm(1.0), wsam_sgd()))
    b, _, _ = run(rules.wsam(optax.sgd(LR), GAMMA, learning_rate=LR, max_norm=1.0))
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_apply_to_both_weight_decay_in_decoupled_wsam_by_hand():
    wd = 0.01
    tx = rules.apply_to_both(optax.add_decayed_weights(wd), wsam_sgd())
    got, _, _ = run(tx)
    w = P0
    for g, gp in zip(G, GP):
        d = tmap(lambda a, x: a + wd * x, g, w)  # decayed clean gradient
        dp = tmap(lambda b, x: b + wd * x, gp, w)  # decayed perturbed gradient
        # base(g + wd w) - lr alpha ((g_pert + wd w) - (g + wd w)) = -lr (g + wd w) - lr alpha (g_pert - g)
        w = tmap(lambda x, a, b: x - LR * a - LR * ALPHA * (b - a), w, d, dp)
    assert_trees_close(got, w, rtol=1e-6, atol=1e-7)


def test_apply_to_both_decay_shrinks_weights_where_chain_before_grew_them():
    wd, n = 0.01, 5
    zeros = [tmap(jnp.zeros_like, P0)] * n
    tx = rules.apply_to_both(optax.add_decayed_weights(wd), wsam_sgd())
    got, _, _ = run(tx, zeros, zeros)
    assert_trees_close(got, tmap(lambda x: (1 - LR * wd) ** n * x, P0), rtol=1e-6, atol=0)  # 0.999 ** 5
    # the issue: chained before decoupled wsam, decay became (alpha - 1) lr wd w = +0.008 w growth per step
    bad = optax.chain(optax.add_decayed_weights(wd), wsam_sgd())
    grown, _, _ = run(bad, zeros, zeros, clean=False)
    assert_trees_close(grown, tmap(lambda x: (1 + (ALPHA - 1) * LR * wd) ** n * x, P0), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="apply_to_both"):
        run(bad, zeros, zeros)


def test_apply_to_both_keeps_separate_pre_states():
    # a stateful pre (momentum) sees each gradient stream in its own state
    tx = rules.apply_to_both(optax.trace(0.5), rules.wsam(optax.sgd(1.0), 0.5, decouple=False))
    _, s, us = run(tx)
    assert s._fields == ("pre_clean_state", "pre_perturbed_state", "rule_state")
    tr = lambda gs: gs[0] if len(gs) == 1 else tmap(lambda a, b: a + 0.5 * b, gs[-1], tr(gs[:-1]))  # noqa: E731
    assert_trees_close(s.pre_clean_state.trace, tr(G), rtol=1e-6)
    assert_trees_close(s.pre_perturbed_state.trace, tr(GP), rtol=1e-6)
    assert_trees_close(us[-1], tmap(lambda b: -b, tr(GP)), rtol=1e-6)  # coupled gamma 1/2 is SAM


def test_apply_to_both_inside_masked():
    tx = optax.masked(rules.apply_to_both(optax.clip_by_global_norm(1.0), sam_sgd()), {"w": True, "b": False})
    u, _ = _update_clean(tx, jit=True)
    cw = GP[0]["w"] * jnp.minimum(1.0, 1.0 / jnp.linalg.norm(GP[0]["w"]))
    np.testing.assert_allclose(u["w"], -LR * cw, rtol=1e-6)
    np.testing.assert_allclose(u["b"], G[0]["b"])  # masked out: passed through


# ---- 3. skip_nonfinite -----------------------------------------------------------------------

NAN_GP = [GP[0], tmap(lambda x: x.at[0].set(jnp.nan), GP[1]), GP[2]]


def test_skip_nonfinite_nan_in_perturbed_only_leaves_params_unchanged():
    tx = rules.skip_nonfinite(rules.sam(optax.sgd(LR, momentum=0.9)), 3)
    step, s = step_fn(tx), tx.init(P0)
    p1, s1, _ = step(P0, s, G[0], NAN_GP[0])
    p2, s2, u2 = step(p1, s1, G[1], NAN_GP[1])
    assert np.all(np.isfinite(p2["w"])) and all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u2))
    assert_trees_close(p2, p1, rtol=0, atol=0)
    assert (int(s2.nonfinite_streak), bool(s2.last_step_finite), int(s2.nonfinite_total)) == (1, False, 1)
    assert_trees_close(s2.rule_state, s1.rule_state, rtol=0, atol=0)  # momentum and rule_count kept
    assert int(s2.rule_state.rule_count) == 1
    # optax.apply_if_finite checks only the clean gradient: the NaN reaches the params
    bad = optax.apply_if_finite(rules.sam(optax.sgd(LR, momentum=0.9)), 3)
    pb, _, _ = run(bad, G[:2], NAN_GP[:2], clean=False)
    assert np.isnan(np.asarray(pb["w"][0]))


def test_skip_nonfinite_finite_steps_equal_the_bare_rule():
    mk = lambda: rules.wsam(optax.sgd(LR, momentum=0.9), GAMMA, learning_rate=LR)  # noqa: E731
    got, s, _ = run(rules.skip_nonfinite(mk(), 3), G, NAN_GP)
    want, ws, _ = run(mk(), [G[0], G[2]], [GP[0], GP[2]])  # the NaN step skipped
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert (int(s.nonfinite_streak), bool(s.last_step_finite), int(s.nonfinite_total)) == (0, True, 1)
    assert int(s.rule_state.rule_count) == int(ws.rule_count) == 2


@pytest.mark.slow
@pytest.mark.parametrize("max_errors", [0, 1, 2])
def test_skip_nonfinite_counters_mirror_optax_apply_if_finite(max_errors):
    # sam(sgd) on g_pert == sgd on g_pert: NaNs in g_pert only must give optax's trajectory on g_pert
    pattern = [False, True, True, True, False, True]
    gps = [tmap(lambda x: x.at[0].set(jnp.nan), GP[t % 3]) if bad else GP[t % 3] for t, bad in enumerate(pattern)]
    gs = [G[t % 3] for t in range(len(pattern))]
    tx = rules.skip_nonfinite(sam_sgd(), max_errors)
    ref = optax.apply_if_finite(optax.sgd(LR), max_errors)
    step, s, rs, p, q = step_fn(tx), tx.init(P0), ref.init(P0), P0, P0
    for g, gp in zip(gs, gps):
        p, s, _ = step(p, s, g, gp)
        u, rs = ref.update(gp, rs, q)
        q = optax.apply_updates(q, u)
        assert (int(s.nonfinite_streak), bool(s.last_step_finite), int(s.nonfinite_total)) == (
            int(rs.notfinite_count),
            bool(rs.last_finite),
            int(rs.total_notfinite),
        )
        np.testing.assert_array_equal(np.isnan(p["w"]), np.isnan(q["w"]))
    assert set(s._fields).isdisjoint(optax.ApplyIfFiniteState._fields)


# ---- 4. accumulate ---------------------------------------------------------------------------


def test_accumulate_equals_rule_on_means_jitted_without_recompiles():
    k, lr, beta = 3, 0.1, 0.9
    micro_g = [G[0], G[1], G[2], GP[1], G[0], GP[2]]
    micro_gp = [GP[0], GP[1], GP[2], G[2], GP[0], G[1]]
    tx = rules.accumulate(rules.wsam(optax.sgd(lr, momentum=beta), GAMMA, learning_rate=lr), k)
    traces = []

    @jax.jit
    def step(p, s, g, gp):
        traces.append(1)
        u, s = tx.update(g, s, p, perturbed_grads=gp, clean_grads=g)
        return optax.apply_updates(p, u), s, u

    p, s, mom = P0, tx.init(P0), tmap(jnp.zeros_like, P0)
    w = P0
    mean = lambda ts: tmap(lambda *x: sum(x) / len(x), *ts)  # noqa: E731
    for t, (g, gp) in enumerate(zip(micro_g, micro_gp)):
        p, s, u = step(p, s, g, gp)
        if (t + 1) % k:
            assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
            assert int(s.micro_step) == (t + 1) % k
            continue
        mg, mgp = mean(micro_g[t + 1 - k : t + 1]), mean(micro_gp[t + 1 - k : t + 1])
        # decoupled wsam by hand on the means: momentum on mean g, sharpness step on the means
        mom = tmap(lambda m, a: a + beta * m, mom, mg)
        want_u = tmap(lambda m, a, b: -lr * m - lr * GAMMA / (1 - GAMMA) * (b - a), mom, mg, mgp)
        assert_trees_close(u, want_u, rtol=1e-6, atol=1e-7)
        w = tmap(lambda x, d: x + d, w, want_u)
        assert int(s.micro_step) == 0 and int(s.rule_state.rule_count) == (t + 1) // k
    assert_trees_close(p, w, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1 and step._cache_size() == 1
    assert set(s._fields).isdisjoint(optax.MultiStepsState._fields)


def test_accumulate_sam_equals_sam_of_multisteps():
    a, _, _ = run(rules.accumulate(rules.sam(optax.sgd(LR, momentum=0.9)), 2), G + G[:1], GP + GP[:1])
    b, _, _ = run(rules.sam(optax.MultiSteps(optax.sgd(LR, momentum=0.9), 2)), G + G[:1], GP + GP[:1])
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


def test_accumulate_every_1_is_the_rule():
    a, _, _ = run(rules.accumulate(wsam_sgd(), 1))
    b, _, _ = run(wsam_sgd())
    assert_trees_close(a, b, rtol=1e-6, atol=1e-7)


# ---- 5. decoupled wsam refuses MultiSteps in its base -----------------------------------------


def test_decoupled_wsam_of_multisteps_raises_at_init():
    tx = rules.wsam(optax.MultiSteps(optax.sgd(LR), 2), GAMMA, learning_rate=LR)
    with pytest.raises(ValueError, match="accumulate"):
        tx.init(P0)
    nested = rules.wsam(optax.chain(optax.clip(1.0), optax.MultiSteps(optax.sgd(LR), 2)), GAMMA, learning_rate=LR)
    with pytest.raises(ValueError, match="MultiSteps"):
        nested.init(P0)
    rules.wsam(optax.MultiSteps(optax.sgd(LR), 2), GAMMA, decouple=False).init(P0)  # coupled: fine
    rules.sam(optax.MultiSteps(optax.sgd(LR), 2)).init(P0)


def test_post_hook_needs_has_post():
    def combine(g, gp, state, params):
        return g, (lambda u, inner: u), state.extra

    tx = rules.sharpness_rule(optax.sgd(LR), combine, name="mine")
    with pytest.raises(ValueError, match="has_post"):
        tx.update(G[0], tx.init(P0), P0, perturbed_grads=GP[0])


# ---- 6. state field names ---------------------------------------------------------------------


def test_tree_get_count_finds_adams_count():
    tx = rules.sam(optax.adam(1e-3))
    s = tx.init(P0)
    assert int(optax.tree_utils.tree_get(s, "count")) == 0
    for g, gp in zip(G[:2], GP[:2]):
        _, s = tx.update(g, s, P0, perturbed_grads=gp)
    assert int(optax.tree_utils.tree_get(s, "count")) == 2
    assert optax.tree_utils.tree_get(s, "count") is s.inner_state[0].count
    assert int(s.rule_count) == 2


# ---- 7. check_placement -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, fix",
    [
        (lambda: optax.apply_if_finite(sam_sgd(), 3), "skip_nonfinite"),
        (lambda: optax.MultiSteps(sam_sgd(), 2), "accumulate"),
        (
            lambda: optax.MultiSteps(optax.chain(optax.identity(), wsam_sgd()), 2).gradient_transformation(),
            "accumulate",
        ),
        (
            lambda: optax.chain(
                optax.scale(1.0), optax.apply_if_finite(optax.masked(sam_sgd(), {"w": True, "b": False}), 1)
            ),
            "skip_nonfinite",
        ),
    ],
)
def test_check_placement_finds_rule_inside_optax_wrappers(make, fix):
    with pytest.raises(ValueError, match=fix):
        rules.check_placement(make().init(P0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.chain(sam_sgd(), optax.scale(2.0)),
        lambda: optax.masked(wsam_sgd(), {"w": True, "b": False}),
        lambda: rules.sam(optax.MultiSteps(optax.sgd(LR), 2)),
        lambda: rules.sam(optax.apply_if_finite(optax.sgd(LR), 2)),
        lambda: optax.apply_if_finite(optax.sgd(LR), 2),
        lambda: rules.skip_nonfinite(rules.accumulate(rules.apply_to_both(optax.clip(1.0), sam_sgd()), 2), 1),
    ],
)
def test_check_placement_passes_correct_placements(make):
    rules.check_placement(make().init(P0))
    rules.check_placement(jax.eval_shape(make().init, P0))


# ---- 8. bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: rules.accumulate(sam_sgd(), 0), "every_k"),
        (lambda: rules.accumulate(sam_sgd(), 2.0), "every_k"),
        (lambda: rules.skip_nonfinite(sam_sgd(), -1), "max_consecutive_errors"),
        (lambda: rules.skip_nonfinite(sam_sgd(), True), "max_consecutive_errors"),
        (lambda: rules.sharpness_rule(optax.sgd(LR), lambda *a: None, name="x", has_post=1), "has_post"),
    ],
)
def test_bad_wrapper_arguments_raise(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: rules.apply_to_both(optax.identity(), sam_sgd()),
        lambda: rules.accumulate(sam_sgd(), 2),
        lambda: rules.skip_nonfinite(sam_sgd(), 2),
    ],
)
def test_wrappers_need_perturbed_grads(make):
    tx = make()
    with pytest.raises(ValueError, match="perturbed_grads"):
        tx.update(G[0], tx.init(P0), P0)
