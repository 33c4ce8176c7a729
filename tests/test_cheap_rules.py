"""LookSAM's cheap reuse steps: host-chosen programs, the host schedule, the one-pass norm."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from helpers import batches, loss_fn, make_params
from sam_optax import geometry, rules
from sam_optax.rules._base import global_norm_parts

K = 3


def looksam_step(loss=loss_fn, k=K):
    return sam_optax.sharpness_aware_step(loss, sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=k), geometry.l2(0.1))


@pytest.mark.slow
def test_host_chosen_programs_equal_the_cond_program_bit_for_bit():
    """7 steps (full steps 0, 3 and 6): the two literal programs picked by looksam_schedule
    give the very same params and state as the one program with lax.cond."""
    init, step = looksam_step()
    cond = jax.jit(step)
    host = {f: jax.jit(lambda p, s, b, f=f: step(p, s, b, second_pass=f)) for f in (True, False)}
    p1, s1 = make_params(), init(make_params())
    p2, s2 = make_params(), init(make_params())
    schedule = sam_optax.looksam_schedule(K, s2.opt_state)
    flags = []
    for b in batches(7):
        p1, s1, _ = cond(p1, s1, b)
        flags.append(next(schedule))
        p2, s2, _ = host[flags[-1]](p2, s2, b)
    assert flags == [True, False, False, True, False, False, True]
    schedule.check(s2.opt_state)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(make_params())[0])


@pytest.mark.slow
def test_reuse_program_runs_one_gradient_pass_and_no_full_step_branch():
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    init, step = looksam_step(counted)
    full = jax.jit(lambda p, s, b: step(p, s, b, second_pass=True))
    reuse = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))
    p, s = make_params(), init(make_params())
    data = batches(3)
    p, s, _ = full(p, s, data[0])
    jax.effects_barrier()
    assert len(calls) == 2
    for b in data[1:]:
        p, s, _ = reuse(p, s, b)
    jax.effects_barrier()
    assert len(calls) == 4  # one pass per reuse step
    # no conditional with array outputs: only the norm's overflow fallback, with scalar outputs
    conds = [line for line in reuse.lower(p, s, data[0]).compile().as_text().splitlines() if " conditional(" in line]
    assert conds and not any(re.search(r"f32\[\d", line.split("conditional(")[0]) for line in conds)
    full_conds = [
        line for line in full.lower(p, s, data[0]).compile().as_text().splitlines() if " conditional(" in line
    ]
    assert len(full_conds) > len(conds)  # the full program also updates the stored direction


def test_reuse_program_on_a_full_step_gives_nan_not_a_silent_sgd_step():
    init, step = looksam_step()
    p, s = make_params(), init(make_params())
    p, s, _ = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))(p, s, batches(1)[0])
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(p))


def test_looksam_schedule_checks_the_state():
    init, step = looksam_step()
    s = init(make_params())
    with pytest.raises(ValueError, match="k"):
        sam_optax.looksam_schedule(0, s.opt_state)
    with pytest.raises(ValueError, match="exactly one LookSAM"):
        sam_optax.looksam_schedule(K, sam_optax.sam(optax.sgd(0.1)).init(make_params()))
    _, s, _ = jax.jit(step)(make_params(), s, batches(1)[0])  # rule_count 1: a reuse step next
    schedule = sam_optax.looksam_schedule(K, s.opt_state)
    assert [next(schedule) for _ in range(4)] == [False, False, True, False]
    with pytest.raises(ValueError, match="out of sync"):
        schedule.check(s.opt_state)  # the schedule moved on, the state did not
    with pytest.raises(ValueError, match="out of sync"):
        sam_optax.looksam_schedule(1, s.opt_state)  # k = 1 wants a full step at count 1


def test_looksam_state_stores_the_unit_sharpness_direction():
    g, gp = {"a": jnp.array([2.0, 0.0]), "b": jnp.array([1.0])}, {"a": jnp.array([1.0, 3.0]), "b": jnp.array([0.0])}
    tx = rules.looksam(optax.sgd(1.0), k=2)
    _, s = tx.update(g, tx.init(g), g, perturbed_grads=gp)
    g64 = np.array([2.0, 0.0, 1.0])
    gp64 = np.array([1.0, 3.0, 0.0])
    g_v = gp64 - g64 @ gp64 / (g64 @ g64) * g64
    got = np.concatenate([np.asarray(x) for x in jax.tree.leaves(s.extra.sharpness_direction)])
    np.testing.assert_allclose(got, g_v / np.linalg.norm(g_v), rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e30, 2e37, 1e-30, 1e-36, 0.0])
def test_global_norm_parts_one_pass_with_exact_fallback(scale):
    x = np.array([3.0, -4.0, 12.0, 0.5, 0.0])
    tree = {"a": jnp.asarray(scale * x[:2], jnp.float32), "b": jnp.asarray(scale * x[2:], jnp.float32)}
    want = np.linalg.norm(np.concatenate([np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]))
    for f in (global_norm_parts, jax.jit(global_norm_parts)):
        d, n = f(tree)
        got = float(np.float64(d) * np.float64(n))
        assert np.isfinite(got)
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.slow
def test_experiments_harness_picks_looksam_programs_on_the_host_on_cpu():
    from sam_optax.experiments import training
    from sam_optax.experiments.methods import Hyper, build_method

    assert jax.default_backend() == "cpu" and training.looksam_host_chosen_default()
    recipe = build_method("looksam", Hyper(looksam_k=K), steps_per_epoch=4, epochs=1)
    init, step, get_opt_state = training._make_step(recipe, loss_fn, None)
    params = make_params()
    state = init(params)
    host = training._jit_step(step, state, get_opt_state, recipe.host_schedule)
    assert not hasattr(host, "lower")  # a host function over two jitted programs
    for b in batches(4):
        params, state, loss = host(params, state, b)
    assert int(get_opt_state(state).rule_count) == 4 and np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
