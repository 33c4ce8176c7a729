"""Second-pass schedulers: periodic SAM (Composer), RST (randomized), AE-SAM, late-phase SAM and
AE-LookSAM, by hand, by identity and by counting gradient passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import (
    assert_trees_close,
    batches,
    looksam_direction_by_hand,
    loss_fn,
    make_params,
    sam_grads_by_hand,
    tmap,
)
from sam_optax import geometry, rules
from sam_optax.train import resolve_second_pass

RHO, LR = 0.1, 0.1
DATA = batches(4)
HAND = jax.jit(sam_grads_by_hand, static_argnums=(2,))  # (g, g(w + rho g / |g|)) by hand


def run(tx, n, loss=loss_fn, data=None):
    """n jitted steps of sharpness_aware_step with second_pass='auto': (params, state, flags)."""
    init, step = sam_optax.sharpness_aware_step(loss, tx, geometry.l2(RHO))
    step = jax.jit(step)
    p, s = make_params(), init(make_params())
    flags = []
    for b in data if data is not None else batches(n):
        flags.append(bool(rules.scheduled_second_pass(s.opt_state)))
        p, s, _ = step(p, s, b)
    return p, s, flags


def test_periodic_every_3_equals_a_hand_rolled_loop_over_7_steps():
    """SAM on updates 3 and 6 (counting from 1: Composer's (step + 1) % 3 == 0), SGD on g elsewhere."""
    data = batches(7)
    p, s, flags = run(sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), every=3), 7, data=data)
    assert flags == [False, False, True, False, False, True, False]
    w = make_params()
    for t, b in enumerate(data):
        g, gp = HAND(w, b, RHO)
        w = tmap(lambda x, d: x - LR * d, w, gp if (t + 1) % 3 == 0 else g)
    assert_trees_close(p, w, rtol=2e-5, atol=1e-6)
    assert int(s.opt_state.schedule_count) == 7


@functools.cache
def reference(kind):
    """Params after DATA with SAM or the base optimizer (heavy-ball SGD, momentum 0.9) by hand."""
    w = make_params()
    m = tmap(jnp.zeros_like, w)
    for b in DATA:
        g, gp = HAND(w, b, RHO)
        m = tmap(lambda mi, d: 0.9 * mi + d, m, gp if kind == "sam" else g)
        w = tmap(lambda x, mi: x - LR * mi, w, m)
    return w


@pytest.mark.slow
def test_periodic_1_and_randomized_p1_equal_sam():
    base = lambda: sam_optax.sam(optax.sgd(LR, momentum=0.9))  # noqa: E731
    for tx in (sam_optax.periodic(base(), every=1), sam_optax.randomized(base(), p=1.0, seed=3)):
        p, _, flags = run(tx, 4, data=DATA)
        assert flags == [True] * 4
        assert_trees_close(p, reference("sam"), rtol=1e-6, atol=1e-7)


def test_randomized_p0_and_periodic_large_equal_the_base_optimizer():
    base = lambda: sam_optax.sam(optax.sgd(LR, momentum=0.9))  # noqa: E731
    for tx in (sam_optax.randomized(base(), p=0.0), sam_optax.periodic(base(), every=100)):
        p, _, flags = run(tx, 4, data=DATA)
        assert flags == [False] * 4
        assert_trees_close(p, reference("base"), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", ["wsam", "gsam"])
def test_skipped_steps_of_wsam_and_gsam_are_the_base_step(rule):
    """rule(g, g) is the base step: WSAM (1 - a) g + a g = g, GSAM g - a * 0 = g; the
    perturbed gradient given on skipped steps (as the Flax steps give it) is ignored."""
    make = {
        "wsam": lambda: sam_optax.wsam(optax.sgd(LR, momentum=0.9), gamma=0.9, learning_rate=LR),
        "gsam": lambda: sam_optax.gsam(optax.sgd(LR, momentum=0.9), alpha=0.5),
    }[rule]
    tx, opt = sam_optax.periodic(make(), every=100), optax.sgd(LR, momentum=0.9)
    w = make_params()

    def both(s, o, g):
        u, s = tx.update(g, s, w, perturbed_grads=jax.tree.map(lambda x: 3.0 * x, g), clean_grads=g)
        v, o = opt.update(g, o, w)
        return s, o, u, v

    both = jax.jit(both)
    s, o = tx.init(w), opt.init(w)
    for i in range(3):
        s, o, u, v = both(s, o, jax.tree.map(lambda x: jnp.cos(x + i), w))
        assert_trees_close(u, v, rtol=1e-6, atol=1e-7)


def test_second_pass_really_skipped_at_run_time():
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    _, _, flags = run(sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), every=3), 7, loss=counted)
    jax.effects_barrier()
    assert len(calls) == 7 + sum(flags) == 9
    calls.clear()
    _, _, flags = run(sam_optax.randomized(sam_optax.sam(optax.sgd(LR)), p=0.5, seed=1), 8, loss=counted)
    jax.effects_barrier()
    assert 0 < sum(flags) < 8 and len(calls) == 8 + sum(flags)


def test_one_object_form_skips_the_second_pass_on_base_steps():
    """A NaN grad_fn poisons SAM steps only (periodic every=2: updates 2 and 4)."""
    w = jnp.ones(3)
    tx = sam_optax.sharpness_aware(sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), every=2), geometry.l2(RHO))
    update = jax.jit(tx.update, static_argnames=("grad_fn",))
    nan_fn = lambda p: jnp.full_like(p, jnp.nan)  # noqa: E731
    state = tx.init(w)
    finite = []
    for _ in range(4):
        u, state = update(jnp.ones(3), state, w, grad_fn=nan_fn)
        finite.append(bool(jnp.all(jnp.isfinite(u))))
    assert finite == [True, False, True, False]


def test_literal_false_on_a_sam_step_gives_nan_and_flax_style_both_passes_match():
    """second_pass=False on a SAM step: NaN, never a silent base step; second_pass=True
    on every step (as the Flax steps run) still gives periodic SAM (base steps on g)."""
    tx = sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), every=2)
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(RHO))
    data = batches(4)
    p, s = make_params(), init(make_params())
    never = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))
    p1, s1, _ = never(p, s, data[0])  # update 1: base step, fine
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p1))
    p2, _, _ = never(p1, s1, data[1])  # update 2: SAM step without its second pass
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(p2))
    always = jax.jit(lambda p, s, b: step(p, s, b, second_pass=True))
    w = p
    for t, b in enumerate(data):
        p, s, _ = always(p, s, b)
        g, gp = HAND(w, b, RHO)
        w = tmap(lambda x, d: x - LR * d, w, gp if t % 2 == 1 else g)
    assert_trees_close(p, w, rtol=2e-5, atol=1e-6)


def _flags_and_updates(p, seed, n=200):
    """n updates of randomized(sam(sgd(1))) with g = 1, g_pert = 2: the flag read before
    each update and the update it gave (-2 on SAM steps, -1 on base steps)."""
    tx = sam_optax.randomized(sam_optax.sam(optax.sgd(1.0)), p=p, seed=seed)
    w = jnp.zeros(2)

    def body(state, _):
        flag = state.sam_step_next
        u, state = tx.update(jnp.ones(2), state, w, perturbed_grads=jnp.full(2, 2.0))
        return state, (flag, u[0])

    _, (flags, ups) = jax.jit(lambda s: jax.lax.scan(body, s, None, length=n))(tx.init(w))
    return np.asarray(flags), np.asarray(ups)


def test_randomized_fraction_reproducible_and_applied_where_drawn():
    flags, ups = _flags_and_updates(0.3, seed=0)
    np.testing.assert_array_equal(ups, np.where(flags, -2.0, -1.0))
    sd = np.sqrt(0.3 * 0.7 / 200)
    assert abs(flags.mean() - 0.3) < 4 * sd, flags.mean()
    np.testing.assert_array_equal(flags, _flags_and_updates(0.3, seed=0)[0])
    assert not np.array_equal(flags, _flags_and_updates(0.3, seed=1)[0])


def test_randomized_schedule_of_the_count():
    """p_t = 0 for t < 5, 1 after: base steps exactly on updates 0..4."""
    flags, _ = _flags_and_updates(lambda t: jnp.where(t < 5, 0.0, 1.0), seed=0, n=10)
    np.testing.assert_array_equal(flags, [False] * 5 + [True] * 5)


@pytest.mark.parametrize("p", [0.3, lambda t: jnp.where(t < 5, 0.0, 0.6)])
def test_randomized_schedule_draws_the_states_flags_ahead(p):
    """The host-side flags equal the ones the state draws, across block boundaries, also from a
    state part-way through training; each block is one device read."""
    flags, _ = _flags_and_updates(p, seed=4, n=60)
    tx = sam_optax.randomized(sam_optax.sam(optax.sgd(1.0)), p=p, seed=4)
    ahead = rules.randomized_schedule(p, tx.init(jnp.zeros(2)), block=7)
    np.testing.assert_array_equal([next(ahead) for _ in range(60)], flags)
    state = tx.init(jnp.zeros(2))
    for _ in range(13):  # resume from update 13
        _, state = tx.update(jnp.ones(2), state, jnp.zeros(2), perturbed_grads=jnp.ones(2))
    later = rules.randomized_schedule(p, optax.chain(optax.identity(), tx).init(jnp.zeros(2)), block=5)
    assert next(later) == flags[0]  # a chain: found inside it (from its own start)
    resumed = rules.randomized_schedule(p, state, block=5)
    np.testing.assert_array_equal([next(resumed) for _ in range(47)], flags[13:])


def test_randomized_schedule_with_the_wrong_p_gives_nan_not_a_silent_step():
    loss = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)  # noqa: E731
    tx = sam_optax.randomized(sam_optax.sam(optax.sgd(0.1)), p=1.0)
    init, step = sam_optax.sharpness_aware_step(loss, tx, sam_optax.geometry.l2(0.05))
    state = init(jnp.zeros(2))
    flag = next(rules.randomized_schedule(0.0, state))  # says base step; the state says SAM
    assert flag is True  # the first flag is the state's own
    w, state, _ = step(jnp.zeros(2), state, jnp.ones((4, 2)), second_pass=next(rules.randomized_schedule(1.0, state)))
    wrong = rules.randomized_schedule(0.0, state)
    next(wrong)
    assert next(wrong) is False  # drawn with p = 0 for update 2, which the rule draws with p = 1
    w2, _, _ = step(w, state, jnp.ones((4, 2)), second_pass=False)
    assert bool(state.opt_state.sam_step_next) and bool(jnp.isnan(w2).all())


def test_randomized_schedule_bad_arguments():
    state = sam_optax.randomized(sam_optax.sam(optax.sgd(LR)), p=0.5).init(make_params())
    with pytest.raises(ValueError, match="block"):
        rules.randomized_schedule(0.5, state, block=0)
    with pytest.raises(ValueError, match="p"):
        rules.randomized_schedule(1.5, state)
    with pytest.raises(ValueError, match="exactly one randomized state, found 0"):
        rules.randomized_schedule(0.5, sam_optax.sam(optax.sgd(LR)).init(make_params()))


def test_two_schedules_in_one_state_raise():
    with pytest.raises(ValueError, match="periodic: rule already schedules"):
        sam_optax.periodic(sam_optax.looksam(optax.sgd(LR), k=2), every=2).init(make_params())
    with pytest.raises(ValueError, match="randomized: rule already schedules"):
        sam_optax.randomized(sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), 2), p=0.5).init(make_params())
    a = sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), 2).init(make_params())
    b = sam_optax.looksam(optax.sgd(LR), k=2).init(make_params())
    with pytest.raises(ValueError, match="2 second-pass schedules"):
        resolve_second_pass("auto", (a, b))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
        ({"every": "3"}, "every"),
        ({"every": True}, "every"),
    ],
)
def test_periodic_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"p": -0.1}, "p"),
        ({"p": 1.5}, "p"),
        ({"p": float("nan")}, "p"),
        ({"p": "0.5"}, "p"),
        ({"p": lambda t: 2.0}, r"p\(0\)"),
        ({"p": lambda: 0.5}, "p must be"),
        ({"p": 0.5, "seed": -1}, "seed"),
        ({"p": 0.5, "seed": 1.5}, "seed"),
        ({"p": 0.5, "seed": 2**32}, "seed"),
        ({"p": 0.5, "seed": "0"}, "seed"),
    ],
)
def test_randomized_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sam_optax.randomized(sam_optax.sam(optax.sgd(LR)), **kwargs)


def test_bad_rule_raises():
    with pytest.raises(ValueError, match="rule"):
        sam_optax.periodic("sam", every=2)
    with pytest.raises(ValueError, match="rule"):
        sam_optax.randomized(None, p=0.5)


# --------------------------------------------------------------------------
# AE-SAM (adaptive_policy)
# --------------------------------------------------------------------------

AE = dict(delta=0.5, c_start=1.0, c_end=-1.0, total_steps=4, mu_init=0.0, var_init=0.0)


def ae(rule=None, **kw):
    return sam_optax.adaptive_policy(rule or sam_optax.sam(optax.sgd(LR)), **dict(AE, **kw))


def test_adaptive_policy_equals_a_hand_rolled_loop():
    """mu, sigma^2, c_t and the decision n_t >= mu_t + c_t sigma_t by hand, over 6 steps."""
    data = batches(6)
    init, step = sam_optax.sharpness_aware_step(loss_fn, ae(), geometry.l2(RHO))
    step = jax.jit(step)
    p, s = make_params(), init(make_params())
    w, mu, var, sams = make_params(), 0.0, 0.0, []
    for t, b in enumerate(data):
        p, s, _ = step(p, s, b)
        g, gp = HAND(w, b, RHO)
        n = float(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
        mu = 0.5 * mu + 0.5 * n
        var = 0.5 * var + 0.5 * (n - mu) ** 2
        c = 1.0 + (-1.0 - 1.0) * min(t / 4, 1.0)
        sams.append(n >= mu + c * np.sqrt(var))
        w = tmap(lambda x, d: x - LR * d, w, gp if sams[-1] else g)
        np.testing.assert_allclose(float(s.opt_state.grad_sq_mean), mu, rtol=1e-5)
        np.testing.assert_allclose(float(s.opt_state.grad_sq_var), var, rtol=1e-4, atol=1e-9)
    assert any(sams) and not all(sams), sams
    assert_trees_close(p, w, rtol=2e-5, atol=1e-6)


def test_adaptive_policy_infinite_thresholds_are_sam_and_the_base_and_skip_the_pass():
    """c = -inf is SAM, c = +inf the base; the decision is taken after the clean pass of
    the same step: the loss runs twice per step with c = -inf, once with c = +inf."""
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    base = lambda: sam_optax.sam(optax.sgd(LR, momentum=0.9))  # noqa: E731
    for c, kind, per_step in ((-np.inf, "sam", 2), (np.inf, "base", 1)):
        calls.clear()
        p, _, _ = run(ae(base(), c_start=c, c_end=c), 4, loss=counted, data=DATA)
        jax.effects_barrier()
        assert len(calls) == 4 * per_step
        assert_trees_close(p, reference(kind), rtol=1e-6, atol=1e-7)


def test_adaptive_policy_one_object_form_and_shards_limit():
    w = jnp.ones(3)
    nan_fn = lambda p: jnp.full_like(p, jnp.nan)  # noqa: E731
    for c, finite in ((np.inf, True), (-np.inf, False)):
        tx = sam_optax.sharpness_aware(ae(c_start=c, c_end=c), geometry.l2(RHO))
        u, _ = jax.jit(tx.update, static_argnames=("grad_fn",))(jnp.ones(3), tx.init(w), w, grad_fn=nan_fn)
        assert bool(jnp.all(jnp.isfinite(u))) == finite
    init, step = sam_optax.sharpness_aware_step(loss_fn, ae(), geometry.l2(RHO), sam_optax.data.shards(m=8))
    with pytest.raises(ValueError, match="one shard per device"):
        step(make_params(), init(make_params()), batches(1)[0])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"delta": 1.0}, "delta"),
        ({"delta": -0.1}, "delta"),
        ({"total_steps": 0}, "total_steps"),
        ({"c_start": np.inf}, "c_start and c_end"),
        ({"c_end": "x"}, "c_end"),
        ({"mu_init": -1.0}, "mu_init"),
        ({"var_init": float("nan")}, "var_init"),
    ],
)
def test_adaptive_policy_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ae(**kwargs)


def test_periodic_schedule_on_the_host():
    tx = sam_optax.periodic(sam_optax.sam(optax.sgd(LR)), every=3)
    s = tx.init(jnp.zeros(2))
    assert [next(rules.periodic_schedule(3, s)) for _ in range(1)] == [False]
    for _ in range(2):  # two updates: the schedule starts at update 2, a SAM step
        _, s = tx.update(jnp.ones(2), s, jnp.zeros(2), perturbed_grads=jnp.ones(2) * 2)
    flags = rules.periodic_schedule(3, s)
    assert [next(flags) for _ in range(4)] == [True, False, False, True]
    with pytest.raises(ValueError, match="disagrees"):
        rules.periodic_schedule(2, s)
    with pytest.raises(ValueError, match="exactly one periodic state"):
        rules.periodic_schedule(3, sam_optax.sam(optax.sgd(LR)).init(jnp.zeros(2)))
    with pytest.raises(ValueError, match="every"):
        rules.periodic_schedule(0, s)


# --------------------------------------------------------------------------
# Late-phase SAM (late_phase)
# --------------------------------------------------------------------------


def _counted(calls):
    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    return counted


def test_late_phase_equals_a_hand_rolled_loop_and_runs_one_pass_before_the_switch():
    """Heavy-ball SGD on g for updates 0..2, on g(w + rho g/|g|) from update 3 on; the
    momentum carries over the switch; the loss runs once per step before it, twice after."""
    calls, data = [], batches(6)
    tx = sam_optax.late_phase(sam_optax.sam(optax.sgd(LR, momentum=0.9)), start_step=3)
    p, s, flags = run(tx, 6, loss=_counted(calls), data=data)
    jax.effects_barrier()
    assert flags == [False] * 3 + [True] * 3
    assert len(calls) == 3 * 1 + 3 * 2
    w, m = make_params(), tmap(jnp.zeros_like, make_params())
    for t, b in enumerate(data):
        g, gp = HAND(w, b, RHO)
        m = tmap(lambda mi, d: 0.9 * mi + d, m, gp if t >= 3 else g)
        w = tmap(lambda x, mi: x - LR * mi, w, m)
    assert_trees_close(p, w, rtol=2e-5, atol=1e-6)
    assert int(s.opt_state.schedule_count) == 6 and bool(s.opt_state.sam_step_next)


@pytest.mark.slow
def test_late_phase_0_is_sam_and_past_the_end_is_the_base_optimizer():
    base = lambda: sam_optax.sam(optax.sgd(LR, momentum=0.9))  # noqa: E731
    for start, kind in ((0, "sam"), (100, "base")):
        p, _, flags = run(sam_optax.late_phase(base(), start_step=start), 4, data=DATA)
        assert flags == [kind == "sam"] * 4
        assert_trees_close(p, reference(kind), rtol=1e-6, atol=1e-7)


def test_late_phase_schedule_on_the_host_and_literal_false_after_the_switch_is_nan():
    tx = sam_optax.late_phase(sam_optax.sam(optax.sgd(LR)), start_step=1)
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(RHO))
    p, s = make_params(), init(make_params())
    flags = rules.late_phase_schedule(1, s.opt_state)
    assert [next(flags) for _ in range(3)] == [False, True, True]
    never = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))
    p, s, _ = never(p, s, DATA[0])  # update 0: the base step, one pass
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
    assert [next(rules.late_phase_schedule(1, s.opt_state))] == [True]
    p, _, _ = never(p, s, DATA[1])  # update 1: a SAM step without its second pass
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(p))
    with pytest.raises(ValueError, match="disagrees"):
        rules.late_phase_schedule(5, s.opt_state)
    with pytest.raises(ValueError, match="exactly one late_phase state"):
        rules.late_phase_schedule(1, sam_optax.sam(optax.sgd(LR)).init(jnp.zeros(2)))


@pytest.mark.parametrize("start_step", [-1, 1.5, "3", True, None, 2**31])
def test_late_phase_bad_arguments(start_step):
    with pytest.raises(ValueError, match="start_step"):
        sam_optax.late_phase(sam_optax.sam(optax.sgd(LR)), start_step)


def test_late_phase_bad_rule():
    with pytest.raises(ValueError, match="rule"):
        sam_optax.late_phase("sam", 3)
    with pytest.raises(ValueError, match="late_phase: rule already schedules"):
        sam_optax.late_phase(sam_optax.looksam(optax.sgd(LR), k=2), 3).init(make_params())


# --------------------------------------------------------------------------
# AE-LookSAM (adaptive_looksam)
# --------------------------------------------------------------------------

ALPHA = 0.7


def ae_look(**kw):
    return sam_optax.adaptive_looksam(optax.sgd(LR), **dict(AE, **kw), alpha=ALPHA)


def test_adaptive_looksam_equals_a_hand_rolled_loop():
    """AE-SAM's decision by hand; SAM steps store g_v = g_s - <g, g_s>/|g|^2 g, the others
    take g + alpha |g| g_v/|g_v| (the last stored g_v: LookSAM's reuse, not the base step)."""
    data, calls = batches(6), []
    init, step = sam_optax.sharpness_aware_step(_counted(calls), ae_look(), geometry.l2(RHO))
    step = jax.jit(step)
    p, s = make_params(), init(make_params())
    w, mu, var, g_v, sams = make_params(), 0.0, 0.0, None, []
    for t, b in enumerate(data):
        p, s, _ = step(p, s, b)
        g, gp = HAND(w, b, RHO)
        n = float(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(g)))
        mu = 0.5 * mu + 0.5 * n
        var = 0.5 * var + 0.5 * (n - mu) ** 2
        sams.append(n >= mu + (1.0 - 2.0 * min(t / 4, 1.0)) * np.sqrt(var))
        d, g_v = looksam_direction_by_hand(g, gp, 0 if sams[-1] else 1, 2, ALPHA, g_v)
        w = tmap(lambda x, di: x - LR * di, w, d)
        assert bool(s.opt_state.rule_state.extra.sam_step) == sams[-1]
    jax.effects_barrier()
    assert sams[0] and not all(sams), sams  # reuse steps after a stored direction
    assert len(calls) == 6 + sum(sams)
    assert_trees_close(p, w, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
def test_adaptive_looksam_infinite_thresholds_are_sam_and_the_base():
    """c = -inf: every step is a SAM step (LookSAM with k = 1 = SAM), 2 passes; c = +inf:
    no SAM step, so no stored direction (0): every step is the base step on g, 1 pass."""
    base = lambda: optax.sgd(LR, momentum=0.9)  # noqa: E731
    calls = []
    for c, kind, per_step in ((-np.inf, "sam", 2), (np.inf, "base", 1)):
        calls.clear()
        tx = sam_optax.adaptive_looksam(base(), **dict(AE, c_start=c, c_end=c), alpha=ALPHA)
        p, s, _ = run(tx, 4, loss=_counted(calls), data=DATA)
        jax.effects_barrier()
        assert len(calls) == 4 * per_step
        assert_trees_close(p, reference(kind), rtol=1e-6, atol=1e-7)
        assert bool(jnp.any(s.opt_state.rule_state.extra.sharpness_direction["scale"] != 0)) == (kind == "sam")


def test_adaptive_looksam_literal_false_on_a_sam_step_is_nan_and_bad_arguments():
    tx = sam_optax.adaptive_looksam(optax.sgd(LR), **dict(AE, c_start=-np.inf, c_end=-np.inf))
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(RHO))
    p, _, _ = step(make_params(), init(make_params()), DATA[0], second_pass=False)
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(p))
    for kwargs, name in (
        ({"alpha": -1.0}, "alpha"),
        ({"eps": -1.0}, "eps"),
        ({"delta": 1.0}, "delta"),
        ({"max_norm": 0.0}, "max_norm"),
    ):
        with pytest.raises(ValueError, match=name):
            sam_optax.adaptive_looksam(optax.sgd(LR), **dict(AE, **kwargs))
    with pytest.raises(ValueError, match="base"):
        sam_optax.adaptive_looksam("sgd", **AE)
    with pytest.raises(ValueError, match="adaptive_looksam"):  # the plain composition stays refused
        ae(sam_optax.looksam(optax.sgd(LR), k=2)).init(make_params())
