"""SAF and MESA (Du et al. 2022): float64 hand loops, the KL gradient identity,
identities with the base optimizer, pass counts, bad ids and arguments, Flax."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sam_optax
from helpers import assert_trees_close, tmap, tree_norm
from sam_optax import trajectory
from sam_optax.trajectory import SCALE, TARGETS

N, D, C, B, SPE = 12, 4, 3, 4, 3  # 12 examples, 3 steps of 4 per epoch
_RNG = np.random.default_rng(0)
X = _RNG.normal(size=(N, D))
Y = _RNG.integers(0, C, size=N)
W0 = {"w": _RNG.normal(size=(D, C)) * 0.7, "b": _RNG.normal(size=(C,)) * 0.1}
PERMS = [np.random.default_rng(10 + e).permutation(N) for e in range(8)]  # epoch e (0-indexed) order


def batch_ids(step):
    epoch, s = divmod(step, SPE)
    return PERMS[epoch][s * B : (s + 1) * B].astype(np.int32)


def make_batch(step, dtype=np.float32):
    ids = batch_ids(step)
    return {"x": jnp.asarray(X[ids], dtype), "y": jnp.asarray(Y[ids]), "index": jnp.asarray(ids)}


def logits_fn(params, batch):
    return batch["x"] @ params["w"] + params["b"]


def ce(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hand_loop(tx, steps, *, weight, tau, delay, start, end, scale, teacher_decay=None):
    """numpy float64: CE + c * mean KL(p_target || q) with its closed-form logit gradient
    c (q - p) / (tau |B|); targets from a dict (epoch, id) -> logits (SAF) or an EMA teacher (MESA).
    The optax ``tx`` applies the hand gradient. Returns per-step (params, loss, epoch, scale)."""
    params = {k: np.array(v) for k, v in W0.items()}
    teacher = {k: np.array(v) for k, v in W0.items()}
    opt_state = tx.init(tmap(jnp.asarray, params))
    seen, out = {}, []
    c_full = weight * tau**2 if scale == "code" else weight
    for t in range(steps):
        epoch, ids = t // SPE + 1, batch_ids(t)  # 1-indexed epoch
        x, y = X[ids], Y[ids]
        z = x @ params["w"] + params["b"]
        c = c_full if start < epoch and (end is None or epoch <= end) else 0.0
        if teacher_decay is None:
            zt = np.stack([seen.get((epoch - delay, i), np.zeros(C)) for i in ids])
        else:
            zt = x @ teacher["w"] + teacher["b"]
        p, q = np_softmax(zt / tau), np_softmax(z / tau)
        soft = np_softmax(z)
        loss = -np.mean(np.log(soft[np.arange(B), y])) + c * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
        dz = (soft - np.eye(C)[y]) / B + c * (q - p) / (tau * B)
        grads = {"w": x.T @ dz, "b": dz.sum(0)}
        updates, opt_state = tx.update(tmap(jnp.asarray, grads), opt_state, tmap(jnp.asarray, params))
        params = {k: params[k] + np.asarray(updates[k]) for k in params}
        for i, row in zip(ids, z):
            seen[(epoch, i)] = row
        if teacher_decay is not None:
            teacher = {k: teacher_decay * teacher[k] + (1 - teacher_decay) * params[k] for k in params}
        out.append((params, loss, epoch, c, teacher))
    return out, seen


def run_library(tx, reg, steps, dtype=jnp.float32):
    init, step = trajectory.trajectory_step(logits_fn, ce, tx, reg)
    params = {k: jnp.asarray(v, dtype) for k, v in W0.items()}
    state, jstep, out = init(params), jax.jit(step, donate_argnums=1), []
    for t in range(steps):
        params, state, (loss, aux) = jstep(params, state, make_batch(t, dtype))
        out.append((params, loss, aux, jax.tree.map(np.asarray, state)))  # the state is donated next step
    assert jstep._cache_size() == 1  # one compilation across epochs and the switch-on
    return out


SAF_CASES = {
    "sgd-momentum, code scale, delay slots": (lambda: optax.sgd(0.3, momentum=0.9), "code", None),
    "adamw, paper scale, code slots": (lambda: optax.adamw(0.05, weight_decay=0.1), "paper", 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SAF_CASES))
def test_saf_matches_a_float64_hand_loop(case):
    make_tx, scale, slots = SAF_CASES[case]
    cfg = dict(weight=0.5, tau=2.0, delay=2, start=2, end=4, scale=scale)
    steps = 5 * SPE  # epochs 1-2 off, 3-4 on, 5 off again (end_epoch)
    with jax.enable_x64(True):
        want, seen = hand_loop(make_tx(), steps, **cfg)
        reg = trajectory.saf(
            N,
            C,
            steps_per_epoch=SPE,
            weight=0.5,
            temperature=2.0,
            delay_epochs=2,
            start_epoch=2,
            end_epoch=4,
            scale=scale,
            slots=slots,
            dtype=jnp.float64,
        )
        got = run_library(make_tx(), reg, steps, jnp.float64)
        for (wp, wl, we, wc, _), (gp, gl, aux, _) in zip(want, got):
            assert_trees_close(gp, wp, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(float(gl), wl, rtol=1e-10)
            assert int(aux["epoch"]) == we and float(aux["scale"]) == wc
        table = np.asarray(got[-1][3].reg_state.table)
    n_slots = 2 if slots is None else slots
    assert table.shape == (n_slots, N, C)
    for epoch in (5, 4):  # the last epochs sit in ring slot (epoch - 1) mod slots
        np.testing.assert_allclose(table[(epoch - 1) % n_slots], [seen[(epoch, i)] for i in range(N)], rtol=1e-12)
    assert sorted(c for *_, c, _ in want) == [0.0] * 9 + [want[6][3]] * 6 and want[6][3] > 0
    # the term matters: without it the weights end elsewhere
    base, _ = hand_loop(make_tx(), steps, **dict(cfg, weight=0.0))
    assert tree_norm(tmap(lambda a, b: a - b, base[-1][0], want[-1][0])) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["code", "paper"])
def test_kl_gradient_identity_on_the_logits(scale):
    weight, tau = 0.3, 5.0
    reg = trajectory.saf(
        N, C, steps_per_epoch=1, weight=weight, temperature=tau, delay_epochs=1, start_epoch=1, scale=scale
    )
    table = jax.random.normal(jax.random.PRNGKey(0), (1, N, C)) * 3
    state = trajectory.SAFState(count=jnp.asarray(1, jnp.int32), table=table)  # epoch 2: on
    ids = jnp.array([5, 0, 11, 3])
    batch = reg.prepare(state, {"index": ids})
    np.testing.assert_array_equal(batch[TARGETS], table[0, ids])
    z = jax.random.normal(jax.random.PRNGKey(1), (4, C)) * 2
    g = jax.grad(reg.loss)(z, batch)
    p, q = jax.nn.softmax(table[0, ids] / tau), jax.nn.softmax(z / tau)
    want = weight * tau * (q - p) / 4 if scale == "code" else weight * (q - p) / (tau * 4)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    kl = np.sum(p * (np.log(p) - np.log(q)), -1)
    c = weight * tau**2 if scale == "code" else weight
    np.testing.assert_allclose(reg.loss(z, batch), c * kl.mean(), rtol=1e-5)


def plain_run(tx, steps):
    params, opt_state, out = tmap(jnp.asarray, W0), tx.init(tmap(jnp.asarray, W0)), []

    @jax.jit
    def step(params, opt_state, batch):
        g = jax.grad(lambda p: ce(logits_fn(p, batch), batch))(params)
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    for t in range(steps):
        params, opt_state = step(params, opt_state, make_batch(t))
        out.append(params)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["saf weight 0", "saf before start", "mesa decay 0"])
def test_identities_with_the_base_optimizer(which):
    def tx():
        return optax.adamw(0.05, weight_decay=0.1) if which == "mesa decay 0" else optax.sgd(0.3, momentum=0.9)

    regs = {
        "saf weight 0": trajectory.saf(N, C, steps_per_epoch=SPE, weight=0.0, delay_epochs=1, start_epoch=1),
        "saf before start": trajectory.saf(N, C, steps_per_epoch=SPE, start_epoch=9),
        "mesa decay 0": trajectory.mesa(steps_per_epoch=SPE, decay=0.0, start_epoch=0),
    }
    got = run_library(tx(), regs[which], 3 * SPE)
    for (gp, _, _aux, _), wp in zip(got, plain_run(tx(), 3 * SPE)):
        # SAF: exactly (0 * KL adds 0); MESA: the teacher's own forward may round differently
        tol = dict(rtol=1e-5, atol=1e-7) if which == "mesa decay 0" else dict(rtol=0, atol=0)
        assert_trees_close(gp, wp, **tol)
    if which == "mesa decay 0":  # the term was on, and 0: the teacher is the student
        assert float(got[-1][2]["scale"]) > 0 and abs(float(got[-1][2]["trajectory_loss"])) < 1e-9


def test_mesa_matches_a_float64_hand_loop_with_its_ema_teacher():
    def tx():
        return optax.sgd(0.3, momentum=0.9)

    steps, decay = 3 * SPE, 0.7
    with jax.enable_x64(True):
        want, _ = hand_loop(
            tx(), steps, weight=0.4, tau=3.0, delay=None, start=1, end=None, scale="code", teacher_decay=decay
        )
        reg = trajectory.mesa(steps_per_epoch=SPE, weight=0.4, temperature=3.0, decay=decay, start_epoch=1)
        got = run_library(tx(), reg, steps, jnp.float64)
        for (wp, wl, _we, wc, wt), (gp, gl, aux, state) in zip(want, got):
            assert_trees_close(gp, wp, rtol=1e-10, atol=1e-12)
            assert_trees_close(state.reg_state.teacher, wt, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(float(gl), wl, rtol=1e-10)
            assert float(aux["scale"]) == wc
    assert want[-1][3] > 0 and float(got[-1][2]["trajectory_loss"]) > 1e-6


@pytest.mark.parametrize("kind,passes", [("saf", 1), ("mesa", 2)])
def test_one_forward_per_step_for_saf_one_extra_teacher_forward_for_mesa(kind, passes):
    calls = []

    def counted(params, batch):
        jax.debug.callback(lambda: calls.append(1))
        return logits_fn(params, batch)

    reg = (
        trajectory.saf(N, C, steps_per_epoch=SPE, delay_epochs=1, start_epoch=1)
        if kind == "saf"
        else trajectory.mesa(steps_per_epoch=SPE, start_epoch=1)
    )
    init, step = trajectory.trajectory_step(counted, ce, optax.sgd(0.1), reg)
    params = tmap(jnp.asarray, W0)
    state, jstep = init(params), jax.jit(step)
    for t in range(2 * SPE):
        params, state, _ = jstep(params, state, make_batch(t))
    jax.effects_barrier()
    assert len(calls) == passes * 2 * SPE
    jaxpr = jax.make_jaxpr(step)(params, state, make_batch(0))
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == passes + 1  # forward(s) + the one backward product for w (b's is a sum)


def test_bad_ids_raise_on_the_host_and_poison_the_loss_under_jit():
    reg = trajectory.saf(N, C, steps_per_epoch=SPE, delay_epochs=1, start_epoch=1)
    init, step = trajectory.trajectory_step(logits_fn, ce, optax.sgd(0.1), reg)
    params = tmap(jnp.asarray, W0)
    state = init(params)
    for bad in (N, -1):
        batch = dict(make_batch(0), index=jnp.array([0, 1, bad, 3], jnp.int32))
        with pytest.raises(ValueError, match=r"index.*num_examples=12"):
            step(params, state, batch)  # un-jitted: concrete ids checked
        with pytest.raises(ValueError, match="num_examples=12"):
            trajectory.check_ids(np.asarray(batch["index"]), N)
        new_params, new_state, (loss, _) = jax.jit(step)(params, state, batch)
        assert np.isnan(float(loss))  # even in epoch 1, while the term is off
        assert np.isnan(np.asarray(new_params["w"])).all()
        table = np.asarray(new_state.reg_state.table)
        np.testing.assert_array_equal(table[0, N - 1], 0.0)  # -1 did not wrap to the last row
        assert np.abs(table[0, [0, 1, 3]]).min() > 0  # the good ids were recorded
    with pytest.raises(ValueError, match="integer"):
        step(params, state, dict(make_batch(0), index=jnp.zeros(4)))
    with pytest.raises(ValueError, match="index"):
        step(params, state, {"x": make_batch(0)["x"], "y": make_batch(0)["y"]})


BAD_ARGS = [
    ("saf", dict(weight=-0.1), "weight"),
    ("saf", dict(temperature=0.0), "temperature"),
    ("saf", dict(delay_epochs=0), "delay_epochs"),
    ("saf", dict(start_epoch=-1), "start_epoch"),
    ("saf", dict(start_epoch=2, delay_epochs=3), "start_epoch"),
    ("saf", dict(end_epoch=5), "end_epoch"),
    ("saf", dict(num_examples=0), "num_examples"),
    ("saf", dict(num_classes=0), "num_classes"),
    ("saf", dict(steps_per_epoch=0), "steps_per_epoch"),
    ("saf", dict(scale="tau"), "scale"),
    ("saf", dict(slots=2), "slots"),
    ("mesa", dict(decay=1.0), "decay"),
    ("mesa", dict(decay=-0.1), "decay"),
    ("mesa", dict(weight=-1.0), "weight"),
    ("mesa", dict(temperature=-1.0), "temperature"),
    ("mesa", dict(start_epoch=3, end_epoch=3), "end_epoch"),
    ("mesa", dict(steps_per_epoch=0), "steps_per_epoch"),
]


@pytest.mark.parametrize("kind,kwargs,name", BAD_ARGS)
def test_bad_arguments_raise_value_error_naming_them(kind, kwargs, name):
    if kind == "saf":
        args = dict(dict(num_examples=N, num_classes=C, steps_per_epoch=SPE), **kwargs)

        def call():
            return trajectory.saf(args.pop("num_examples"), args.pop("num_classes"), **args)
    else:

        def call():
            return trajectory.mesa(**dict(dict(steps_per_epoch=SPE), **kwargs))

    with pytest.raises(ValueError, match=name):
        call()


# --------------------------------------------------------------------------- Flax


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(C)(x)


@pytest.mark.slow
def test_linen_saf_through_linen_train_step_equals_the_plain_step():
    """SAF with SAM at rho = 0 (the perturbed gradient is the clean one) through the
    Linen step: targets prepared into the batch, logits returned as a metric, recorded after."""
    model, lr = Lin(), 0.3
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))["params"]
    reg = trajectory.saf(N, C, steps_per_epoch=SPE, weight=0.5, temperature=2.0, delay_epochs=1, start_epoch=1)
    prepare, update = jax.jit(reg.prepare), jax.jit(reg.update, donate_argnums=0)

    def loss_fn(apply, batch):
        logits = apply(batch["x"])
        return ce(logits, batch) + reg.loss(logits, batch), {"logits": logits}

    state = sam_optax.flax.TrainState.create(
        apply_fn=model.apply, params=params, tx=sam_optax.sam(optax.sgd(lr)), geometry=sam_optax.geometry.l2(0.0)
    )
    step, reg_state = sam_optax.flax.linen_train_step(loss_fn, has_aux=True), reg.init(None)
    init, plain = trajectory.trajectory_step(lambda p, b: model.apply({"params": p}, b["x"]), ce, optax.sgd(lr), reg)
    want_p, want_s = params, init(params)
    for t in range(2 * SPE):
        batch = prepare(reg_state, make_batch(t))
        state, metrics = step(state, batch)
        reg_state = update(reg_state, batch, metrics["logits"], None)
        want_p, want_s, (want_loss, _) = jax.jit(plain)(want_p, want_s, make_batch(t))
        np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    assert_trees_close(state.params, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reg_state.table, want_s.reg_state.table, rtol=1e-5, atol=1e-6)
    assert float(batch[SCALE][0]) == 0.5 * 4  # epoch 2 was on


class NLin(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(D, C, rngs=rngs)

    def __call__(self, x):
        return self.l(x)


@pytest.mark.slow
def test_nnx_mesa_through_nnx_train_step_equals_the_plain_step():
    model, lr = NLin(nnx.Rngs(0)), 0.3
    graphdef, params0 = nnx.split(model, nnx.Param)
    params0 = jax.tree.map(jnp.copy, params0)  # not the model's own variables, which the step updates
    reg = trajectory.mesa(steps_per_epoch=SPE, weight=0.5, temperature=2.0, decay=0.5, start_epoch=0)

    def forward(p, b):
        return nnx.merge(graphdef, p)(b["x"])

    prepare = jax.jit(lambda s, b: reg.prepare(s, b, forward))
    update = jax.jit(reg.update)

    def loss_fn(model, batch):
        logits = model(batch["x"])
        return ce(logits, batch) + reg.loss(logits, batch), {"logits": logits}

    optimizer = sam_optax.flax.SharpnessAwareOptimizer(model, sam_optax.sam(optax.sgd(lr)), sam_optax.geometry.l2(0.0))
    step, reg_state = sam_optax.flax.nnx_train_step(loss_fn, has_aux=True), reg.init(params0)
    init, plain = trajectory.trajectory_step(forward, ce, optax.sgd(lr), reg)
    want_p, want_s = params0, init(params0)
    for t in range(2 * SPE):
        batch = prepare(reg_state, make_batch(t))
        metrics = step(model, optimizer, batch)
        reg_state = update(reg_state, batch, metrics["logits"], nnx.state(model, nnx.Param))
        want_p, want_s, (want_loss, aux) = jax.jit(plain)(want_p, want_s, make_batch(t))
        np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
    assert float(aux["trajectory_loss"]) > 1e-6  # the teacher lags: the term acts
    assert_trees_close(nnx.state(model, nnx.Param), want_p, rtol=1e-5, atol=1e-6)
    assert_trees_close(reg_state.teacher, want_s.reg_state.teacher, rtol=1e-5, atol=1e-6)
