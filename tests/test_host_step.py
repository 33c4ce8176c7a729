"""host_chosen_step: the scheduled step with its program picked on the host equals the
one-program step (lax.cond), and runs the passes the schedule says."""

import jax
import numpy as np
import optax
import pytest

import sam_optax
from helpers import assert_trees_close, batches, loss_fn, make_params
from sam_optax import geometry, rules

RHO, LR = 0.1, 0.1
AE = dict(delta=0.5, c_start=1.0, c_end=-1.0, total_steps=6, mu_init=0.0, var_init=0.0)


def counted(calls):
    def loss(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return loss_fn(params, batch)

    return loss


def both(make_tx, n):
    """(params, state) of n steps in the cond form and in the host form, the flags, and the passes
    the host form ran."""
    data = batches(n)
    init, step = sam_optax.sharpness_aware_step(loss_fn, make_tx(), geometry.l2(RHO))
    step = jax.jit(step)
    p, s = make_params(), init(make_params())
    ran = []
    for b in data:
        flag = rules.scheduled_second_pass(s.opt_state)
        p, s, out = step(p, s, b)
        ran.append(bool(flag(out.grads)) if isinstance(flag, jax.tree_util.Partial) else bool(flag))
    calls = []
    init, host = sam_optax.host_chosen_step(counted(calls), make_tx(), geometry.l2(RHO))
    q, t = make_params(), init(make_params())
    for b, want in zip(data, ran):
        q, t, _ = host(q, t, b)
        assert host.last_second_pass is want
    jax.effects_barrier()
    return (p, s), (q, t), ran, len(calls)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["periodic", "randomized", "late_phase", "looksam", "adaptive_policy", "adaptive_looksam"]
)
def test_host_chosen_step_equals_the_cond_step_and_skips_the_pass(name):
    make = {
        "periodic": lambda: sam_optax.periodic(sam_optax.sam(optax.sgd(LR, momentum=0.9)), every=3),
        "randomized": lambda: sam_optax.randomized(sam_optax.sam(optax.sgd(LR)), p=0.5, seed=3),
        "late_phase": lambda: sam_optax.late_phase(sam_optax.sam(optax.sgd(LR)), start_step=4),
        "looksam": lambda: sam_optax.looksam(optax.sgd(LR), k=3, alpha=0.5),
        "adaptive_policy": lambda: sam_optax.adaptive_policy(sam_optax.sam(optax.sgd(LR, momentum=0.9)), **AE),
        "adaptive_looksam": lambda: sam_optax.adaptive_looksam(optax.sgd(LR), **AE, alpha=0.5),
    }[name]
    (p, s), (q, t), ran, passes = both(make, 6)
    assert 0 < sum(ran) < 6, ran  # both kinds of step occur
    assert passes == 6 + sum(ran)
    assert_trees_close(q, p, rtol=1e-5, atol=1e-6)
    assert_trees_close(t.opt_state, s.opt_state, rtol=1e-5, atol=1e-6)


def test_ae_split_needs_one_shard_and_a_plain_state_runs_two_passes():
    tx = sam_optax.adaptive_policy(sam_optax.sam(optax.sgd(LR)), **AE)
    init, step = sam_optax.host_chosen_step(loss_fn, tx, geometry.l2(RHO), sam_optax.data.shards(m=2))
    with pytest.raises(ValueError, match="one shard per device"):
        step(make_params(), init(make_params()), batches(1)[0])
    calls = []
    init, step = sam_optax.host_chosen_step(counted(calls), sam_optax.sam(optax.sgd(LR)), geometry.l2(RHO))
    w, s = make_params(), init(make_params())
    for b in batches(2):
        w, s, out = step(w, s, b)
    jax.effects_barrier()
    assert len(calls) == 4 and np.isfinite(float(out.perturbed_loss))
