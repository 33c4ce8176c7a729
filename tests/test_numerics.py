"""Numerical robustness (issue 11, items 3-6 and 10).

* a zero gradient with ``eps = 0`` gives a zero perturbation, never NaN;
* huge (up to the float32 maximum) and tiny finite gradients give the
  perturbation of radius ``rho`` along ``g`` (norms are overflow-safe), and
  GSAM / LookSAM / ``max_norm`` clipping match their float64 formulas;
* ASAM with ``eta = 0`` and a zero weight has a finite norm, so multi-step
  ascent stays in the ball;
* the adaptive geometry without params raises a clear ``ValueError``;
* under ``jax_enable_x64`` hyperparameters are not rounded to float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import averaging, decay, geometry, rules
from sam_optax.data import DataSelection

RHO = 0.1


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def perturb(geo, g, params=None):
    eps, _ = geo.update(g, geo.init(g if params is None else params), params)
    return eps


def split(values, dtype=jnp.float32):
    """A two-leaf tree holding ``values`` (3 + rest entries)."""
    values = np.asarray(values)
    return {"a": jnp.asarray(values[:3], dtype), "b": jnp.asarray(values[3:], dtype)}


def assert_close_scaled(got, want, rtol=1e-5):
    """``got`` equals ``want`` up to ``rtol`` relative to the largest entry."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.all(np.isfinite(got)), got
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


# --------------------------------------------------------------------------
# Item 3: eps = 0 and a zero gradient.
# --------------------------------------------------------------------------

EPS0_GEOMETRIES = {
    "l2": lambda: geometry.l2(RHO, eps=0.0),
    "pnorm2": lambda: geometry.pnorm(RHO, 2, eps=0.0),
    "pnorm3": lambda: geometry.pnorm(RHO, 3, eps=0.0),
    "pnorm1": lambda: geometry.pnorm(RHO, 1, eps=0.0),
    "pnorm_inf": lambda: geometry.pnorm(RHO, math.inf, eps=0.0),
    "adaptive": lambda: geometry.adaptive(RHO, eps=0.0),
    "adaptive_p3": lambda: geometry.adaptive(RHO, p=3, eps=0.0),
    "fisher": lambda: geometry.fisher(RHO, eps=0.0),
    "stochastic_masked": lambda: geometry.stochastic(geometry.l2(RHO, eps=0.0), 0.5, normalize="masked"),
    "grouped_l2": lambda: geometry.grouped_l2({"a": "x", "b": "y"}, {"x": RHO, "y": 2 * RHO}, eps=0.0),
}


@pytest.mark.parametrize("name", sorted(EPS0_GEOMETRIES))
def test_zero_gradient_with_eps0_gives_zero_perturbation(name):
    geo = EPS0_GEOMETRIES[name]()
    g, params = split(np.zeros(5)), split(np.ones(5))
    eps = perturb(geo, g, params)
    assert np.all(flat(eps) == 0.0)
    assert float(geo.norm(eps, g, params)) == 0.0


def test_stochastic_masked_with_everything_masked_is_zero():
    """normalize='masked' hands the inner geometry m * g, here zero (beta tiny)."""
    geo = geometry.stochastic(geometry.l2(RHO, eps=0.0), 1e-6, granularity="coordinate", normalize="masked")
    eps = perturb(geo, split([1.0, -2.0, 3.0, 4.0, 5.0]))
    assert np.all(flat(eps) == 0.0)


def rule_updates(tx, steps, params):
    """Updates of ``tx`` for ``steps = [(g, g_pert), ...]`` (sgd(1): update = -base gradient)."""
    state, out = tx.init(params), []
    for g, gp in steps:
        u, state = tx.update(g, state, params, perturbed_grads=gp)
        out.append(flat(u))
    return out


def test_gsam_zero_cases_with_eps0():
    g, zero = split([1.0, -2.0, 3.0, 0.5, 0.0]), split(np.zeros(5))
    tx = sam_optax.gsam(optax.sgd(1.0), alpha=0.4, eps=0.0)
    (zero_pert,) = rule_updates(tx, [(g, zero)], zero)  # g_pert = 0: g_par = 0
    np.testing.assert_allclose(zero_pert, 0.4 * flat(g), rtol=1e-6)
    (zero_clean,) = rule_updates(tx, [(zero, g)], zero)  # g = 0: the perturbed gradient
    np.testing.assert_allclose(zero_clean, -flat(g), rtol=1e-6)
    (both,) = rule_updates(tx, [(zero, zero)], zero)
    assert np.all(both == 0.0)


def test_looksam_zero_cases_with_eps0():
    g, gp, zero = split([1.0, -2.0, 3.0, 0.5, 0.0]), split([2.0, 1.0, 0.0, 0.0, 1.0]), split(np.zeros(5))
    tx = sam_optax.looksam(optax.sgd(1.0), k=2, alpha=0.7, eps=0.0)
    # g = 0 on the full step: g_v = g_pert; then a zero clean gradient: no reuse term.
    full, reuse = rule_updates(tx, [(zero, gp), (zero, zero)], zero)
    np.testing.assert_allclose(full, -flat(gp), rtol=1e-6)
    assert np.all(reuse == 0.0)
    # g_pert parallel to g on the full step (exactly): g_v = 0, and the reuse step is plain g.
    g0, gp0 = split([2.0, 0.0, 0.0, 0.0, 0.0]), split([1.0, 0.0, 0.0, 0.0, 0.0])
    full, reuse = rule_updates(tx, [(g0, gp0), (g, zero)], zero)
    np.testing.assert_array_equal(full, -flat(gp0))
    np.testing.assert_allclose(reuse, -flat(g), rtol=1e-6)


# --------------------------------------------------------------------------
# Item 4: huge and tiny finite gradients.
# --------------------------------------------------------------------------

DIRECTION = np.array([1.0, -0.5, 0.25, 0.0, 0.9])
SCALES = [1e30, 3e38, 1e-30, 3e-36]

L2_LIKE = {
    "l2": lambda: geometry.l2(RHO, eps=0.0),
    "pnorm2": lambda: geometry.pnorm(RHO, 2, eps=0.0),
    "adaptive_eta0": lambda: geometry.adaptive(RHO, eta=0.0, eps=0.0),  # T = 1 at w = 1
    "fisher_eta0": lambda: geometry.fisher(RHO, eta=0.0, eps=0.0),
    "stochastic_masked": lambda: geometry.stochastic(geometry.l2(RHO, eps=0.0), 1.0, normalize="masked"),
    "grouped_l2": lambda: geometry.grouped_l2({"a": "x", "b": "y"}, {"x": RHO, "y": RHO}, eps=0.0),
}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", sorted(L2_LIKE))
def test_extreme_gradient_gives_radius_rho_along_g(name, scale):
    g = split(scale * DIRECTION)
    eps = flat(perturb(L2_LIKE[name](), g, split(np.ones(5))))
    g64 = flat(g)
    np.testing.assert_allclose(np.linalg.norm(eps), RHO, rtol=1e-5)
    assert_close_scaled(eps, RHO * g64 / np.linalg.norm(g64))


@pytest.mark.parametrize("scale", SCALES)
def test_extreme_gradient_pnorm3_and_adaptive(scale):
    g, w = split(scale * DIRECTION), split([2.0, 0.5, 1.0, 3.0, 0.0])
    g64, w64 = flat(g), flat(w)
    q = 1.5  # dual of p = 3
    ref = RHO * np.sign(g64) * (np.abs(g64) / np.sum(np.abs(g64) ** q) ** (1 / q)) ** (q - 1)
    assert_close_scaled(flat(perturb(geometry.pnorm(RHO, 3, eps=0.0), g)), ref)
    t = np.abs(w64) + 0.01
    ref = RHO * t * t * g64 / np.linalg.norm(t * g64)
    geo = geometry.adaptive(RHO, eta=0.01, eps=0.0)
    eps = perturb(geo, g, w)
    assert_close_scaled(flat(eps), ref)
    np.testing.assert_allclose(float(geo.norm(eps, g, w)), RHO, rtol=1e-5)


@pytest.mark.parametrize("scale, eta", [(1e30, 1.0), (3e38, 1e-74), (3e38, 0.0), (1e-30, 1e30), (1e-19, 1e38)])
def test_extreme_gradient_fisher(scale, eta):
    g = split(scale * DIRECTION)
    g64 = flat(g)
    f_inv_g = g64 / (1.0 + eta * g64 * g64)
    ref = RHO * f_inv_g / np.sqrt(np.sum(g64 * f_inv_g))
    geo = geometry.fisher(RHO, eta=eta, eps=0.0)
    eps = perturb(geo, g)
    assert_close_scaled(flat(eps), ref)
    np.testing.assert_allclose(float(geo.norm(eps, g, None)), RHO, rtol=1e-5)


def test_fisher_norm_finite_for_the_largest_gradients():
    g = split(3e38 * DIRECTION)
    geo = geometry.fisher(RHO, eta=1.0)
    eps = perturb(geo, g)  # entries ~1e-40: flushed to 0 in float32 on CPU
    assert np.all(np.isfinite(flat(eps)))
    assert np.isfinite(float(geo.norm(eps, g, None)))


def test_subnormal_gradient_is_finite():
    """Subnormal entries may be flushed to zero (XLA on CPU): then the perturbation is 0."""
    eps = flat(perturb(geometry.l2(RHO, eps=0.0), split(1e-45 * np.abs(DIRECTION))))
    assert np.all(np.isfinite(eps))
    norm = np.linalg.norm(eps)
    assert norm == 0.0 or abs(norm - RHO) < 1e-5 * RHO


@pytest.mark.parametrize("scale", [1e30, 3e38])
def test_clip_by_global_norm_of_huge_tree(scale):
    g = split(scale * DIRECTION)
    g64 = flat(g)
    clipped = flat(rules.clip_by_global_norm(g, 2.0))
    assert_close_scaled(clipped, 2.0 * g64 / np.linalg.norm(g64))
    (update,) = rule_updates(sam_optax.sam(optax.sgd(1.0), max_norm=2.0), [(g, g)], split(np.zeros(5)))
    np.testing.assert_allclose(np.linalg.norm(update), 2.0, rtol=1e-5)


def gsam_ref(g, gp, alpha):
    return gp - alpha * (g - np.dot(g, gp) / np.dot(gp, gp) * gp)


GSAM_CASES = [
    ([3e38, 1e38, -2e38, 0.0, 1.0], [1e38, 3e38, 1e37, 2e38, 0.0]),
    ([1e30, -2e30, 1.0, 3e29, 0.0], [3e29, 1e30, 5e29, 0.0, 1e30]),
    ([1e-30, -2e-30, 1e-31, 0.0, 3e-30], [3e-30, 1e-30, 0.0, 2e-30, 1e-31]),
]


@pytest.mark.parametrize("g, gp", GSAM_CASES)
def test_gsam_huge_and_tiny_match_float64(g, gp):
    tx = sam_optax.gsam(optax.sgd(1.0), alpha=0.4, eps=0.0)
    (update,) = rule_updates(tx, [(split(g), split(gp))], split(np.zeros(5)))
    assert_close_scaled(-update, gsam_ref(flat(split(g)), flat(split(gp)), 0.4))


def looksam_ref(g0, gp0, g1, alpha):
    g_v = gp0 - np.dot(g0, gp0) / np.dot(g0, g0) * g0
    return g1 + alpha * np.linalg.norm(g1) * g_v / np.linalg.norm(g_v)


LOOKSAM_CASES = [
    ([3e38, 1e38, -2e38, 0.0, 1.0], [1e38, 3e38, 1e37, 2e38, 0.0], [1e38, -1e38, 5e37, 0.0, 2e37]),
    ([1e30, -2e30, 1.0, 3e29, 0.0], [3e29, 1e30, 5e29, 0.0, 1e30], [2e30, 1e30, -1e30, 0.0, 5e29]),
    ([1e-30, -2e-30, 1e-31, 0.0, 3e-30], [3e-30, 1e-30, 0.0, 2e-30, 1e-31], [1e-30, 1e-30, 0.0, 0.0, 1e-30]),
]


@pytest.mark.parametrize("g0, gp0, g1", LOOKSAM_CASES)
def test_looksam_huge_and_tiny_match_float64(g0, gp0, g1):
    tx = sam_optax.looksam(optax.sgd(1.0), k=2, alpha=0.7, eps=0.0)
    steps = [(split(g0), split(gp0)), (split(g1), split(np.zeros(5)))]
    full, reuse = rule_updates(tx, steps, split(np.zeros(5)))
    np.testing.assert_array_equal(-full, flat(split(gp0)))
    assert_close_scaled(-reuse, looksam_ref(flat(split(g0)), flat(split(gp0)), flat(split(g1)), 0.7))


# --------------------------------------------------------------------------
# Item 5: ASAM with eta = 0 and a zero weight.
# --------------------------------------------------------------------------

A_DIAG = np.array([50.0, 20.0, 8.0, 30.0])
B_LIN = np.array([1.0, -2.0, 3.0, 0.5])


def quadratic(params, batch):
    """``mean(c) * (0.5 sum(A w^2) + sum(B w))``: gradient ``A w + B``."""
    w = params["w"]
    return jnp.mean(batch["c"]) * (0.5 * jnp.sum(A_DIAG * w * w) + jnp.sum(B_LIN * w))


def test_asam_eta0_zero_weight_norm_is_finite():
    geo = geometry.adaptive(1.0, eta=0.0)
    w, g = {"w": jnp.array([0.0, 1.0, -2.0, 0.5])}, {"w": jnp.array([1.0, 2.0, 3.0, -1.0])}
    eps = perturb(geo, g, w)
    assert float(eps["w"][0]) == 0.0  # a zero weight is never perturbed
    np.testing.assert_allclose(float(geo.norm(eps, g, w)), 1.0, rtol=1e-5)


def test_asam_eta0_zero_weight_multistep_stays_in_ball():
    rho = 0.5
    geo = geometry.adaptive(rho, eta=0.0)
    w = {"w": jnp.array([0.0, 1.0, -2.0, 0.5])}
    batch = {"c": jnp.ones(4)}
    grad_fn = sam_optax.sharpness_aware_grad(quadratic, geo, ascent_steps=3, ascent_step_size=1.0)
    out = grad_fn(w, batch, ascent_state=geo.init(w))
    w64 = flat(w)
    eps = (flat(out.perturbed_grads) - B_LIN) / A_DIAG - w64  # grad = A (w + eps) + B
    assert np.isfinite(float(out.perturbed_loss))
    assert abs(eps[0]) < 1e-6
    scaled = eps[1:] / np.abs(w64[1:])
    assert np.linalg.norm(scaled) <= rho * (1 + 1e-4), np.linalg.norm(scaled)
    np.testing.assert_allclose(np.linalg.norm(scaled), rho, rtol=1e-4)  # the ascent reaches the sphere


# --------------------------------------------------------------------------
# Item 6: the adaptive geometry needs params.
# --------------------------------------------------------------------------


def test_adaptive_without_params_is_a_value_error():
    geo = geometry.adaptive(0.5)
    g = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="adaptive geometry needs the current params"):
        geo.update(g, geo.init(g))
    with pytest.raises(ValueError, match="params"):
        geo.norm(g, g, None)


# --------------------------------------------------------------------------
# Item 10: float64 mode keeps float64 hyperparameters.
# --------------------------------------------------------------------------

RHO64 = 0.1 + 1e-12  # float32 would round it by about 1.5e-9


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


W64 = np.array([0.3, -1.2, 2.5, 0.7])


def test_float64_sam_step_matches_numpy(x64):
    lr = 0.05 + 1e-13
    w = {"w": jnp.asarray(W64, jnp.float64)}
    batch = {"c": jnp.ones(4, jnp.float64)}
    geo = geometry.l2(RHO64, eps=0.0)
    out = sam_optax.sharpness_aware_grad(quadratic, geo)(w, batch, ascent_state=geo.init(w))
    tx = sam_optax.sam(optax.sgd(lr))
    u, _ = tx.update(out.grads, tx.init(w), w, perturbed_grads=out.perturbed_grads)
    new = optax.apply_updates(w, u)["w"]
    assert new.dtype == jnp.float64
    g = A_DIAG * W64 + B_LIN
    eps = RHO64 * g / np.linalg.norm(g)
    want = W64 - lr * (A_DIAG * (W64 + eps) + B_LIN)
    np.testing.assert_allclose(np.asarray(new), want, rtol=1e-12, atol=1e-14)


F64_GEOMETRIES = {
    "l2": (lambda: geometry.l2(RHO64, eps=0.0), lambda g, w: RHO64 * g / np.linalg.norm(g)),
    "adaptive": (
        lambda: geometry.adaptive(RHO64, eta=0.01, eps=0.0),
        lambda g, w: RHO64 * (np.abs(w) + 0.01) ** 2 * g / np.linalg.norm((np.abs(w) + 0.01) * g),
    ),
    "fisher": (
        lambda: geometry.fisher(RHO64, eta=1.0, eps=0.0),
        lambda g, w: RHO64 * (g / (1 + g * g)) / np.sqrt(np.sum(g * g / (1 + g * g))),
    ),
    "pnorm3": (
        lambda: geometry.pnorm(RHO64, 3, eps=0.0),
        lambda g, w: RHO64 * np.sign(g) * (np.abs(g) / np.sum(np.abs(g) ** 1.5) ** (1 / 1.5)) ** 0.5,
    ),
    "grouped_l2": (
        lambda: geometry.grouped_l2(lambda t: jax.tree.map(lambda _: "x", t), {"x": RHO64}, eps=0.0),
        lambda g, w: RHO64 * g / np.linalg.norm(g),
    ),
    "gsam_schedule": (
        lambda: geometry.l2(sam_optax.gsam_rho_schedule(0.3, rho_max=RHO64, rho_min=0.01), eps=0.0),
        lambda g, w: RHO64 * g / np.linalg.norm(g),
    ),
}


@pytest.mark.parametrize("name", sorted(F64_GEOMETRIES))
def test_float64_geometry_keeps_rho(x64, name):
    make, ref = F64_GEOMETRIES[name]
    g64 = np.array([0.7, -1.1, 0.2, 2.3])
    eps = perturb(make(), {"w": jnp.asarray(g64)}, {"w": jnp.asarray(W64)})["w"]
    assert eps.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(eps), ref(g64, W64), rtol=1e-12, atol=1e-16)


def test_float64_gsam_rho_schedule(x64):
    lr_at = lambda count: 0.1 + 1e-12 * count  # noqa: E731
    sched = sam_optax.gsam_rho_schedule(lr_at, rho_max=0.05 + 1e-12, rho_min=0.01, lr_max=0.2, lr_min=0.1)
    value = sched(jnp.asarray(3))
    assert value.dtype == jnp.float64
    want = 0.01 + (0.05 + 1e-12 - 0.01) * (0.1 + 3e-12 - 0.1) / 0.1
    np.testing.assert_allclose(float(value), want, rtol=1e-12)


def test_float64_decoupled_weight_decay(x64):
    lam, mult = 0.1 + 1e-12, 0.5 + 1e-12
    tx = decay.decoupled_weight_decay(lam, schedule_multiplier=mult)
    w, u = jnp.asarray(W64), jnp.asarray([0.01, 0.02, -0.03, 0.0])
    new, _ = tx.update(u, tx.init(w), w)
    assert new.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(new), np.asarray(u) - mult * lam * W64, rtol=1e-13, atol=1e-16)


def test_float64_cosine_warm_restarts(x64):
    sched = decay.cosine_warm_restarts(7, eta_min=0.1 + 1e-12, eta_max=1.0)
    value = sched(jnp.asarray(5))
    assert value.dtype == jnp.float64
    want = 0.1 + 1e-12 + 0.5 * (1.0 - 0.1 - 1e-12) * (1 + math.cos(math.pi * 5 / 7))
    np.testing.assert_allclose(float(value), want, rtol=1e-13)


def run_steps(tx, w, grads):
    state, params = tx.init(w), w
    for g in grads:
        u, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, u)
    return params, state


GRADS = [np.array([0.1, 0.2, -0.3, 0.4]), np.array([0.3, -0.1, 0.2, 0.1]), np.array([-0.2, 0.5, 0.1, 0.3])]


def test_float64_swa_weight(x64):
    _, state = run_steps(averaging.swa(optax.sgd(1.0), start_step=0), jnp.asarray(W64), GRADS)
    snapshots = [W64 - sum(GRADS[:i]) if i else W64 for i in range(len(GRADS) + 1)]
    np.testing.assert_allclose(np.asarray(averaging.swa_params(state)), np.mean(snapshots, axis=0), rtol=1e-14)


def test_float64_weight_ema(x64):
    d = 0.9 + 1e-12
    _, state = run_steps(averaging.weight_ema(optax.sgd(1.0), d), jnp.asarray(W64), GRADS)
    ema, w = W64.copy(), W64.copy()
    for g in GRADS:
        w = w - g
        ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(np.asarray(averaging.ema_params(state)), ema, rtol=1e-14)


def test_float64_lookahead_alpha(x64):
    alpha = 0.3 + 1e-12
    _, state = run_steps(averaging.lookahead(optax.sgd(1.0), 1, alpha), jnp.asarray(W64), GRADS[:1])
    want = W64 + alpha * (W64 - GRADS[0] - W64)
    np.testing.assert_allclose(np.asarray(averaging.lookahead_slow_params(state)), want, rtol=1e-14)


def test_float64_sds_ranking(x64):
    clean = jnp.asarray([1.0, 1.0, 1.0, 1.0])
    perturbed = jnp.asarray([1.0 + 1e-10, 1.0 + 3e-10, 1.0 + 2e-10, 1.0])  # equal in float32
    np.testing.assert_array_equal(np.asarray(DataSelection(0.5).select(clean, perturbed)), [1, 2])
