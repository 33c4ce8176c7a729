"""The experiments' building blocks: datasets, label noise, the whole-step helper."""

import re

import jax
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import experiments, geometry
from helpers import assert_trees_close, batches, loss_fn, make_params, train


def test_symmetric_label_noise_flips_the_stated_fraction_to_other_classes():
    y = np.arange(20000) % 10
    noisy = experiments.add_label_noise(y, 0.4, 10, seed=0)
    flipped = noisy != y
    assert abs(flipped.mean() - 0.4) < 0.015
    # flipped labels are uniform over the 9 other classes
    counts = np.bincount((noisy[flipped] - y[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()
    assert np.array_equal(noisy, experiments.add_label_noise(y, 0.4, 10, seed=0))
    with pytest.raises(ValueError, match="label noise"):
        experiments.add_label_noise(y, 1.5, 10, seed=0)


def test_datasets_are_generated_locally_and_deterministically():
    a = experiments.load("mnist1d", seed=3, num_samples=500)
    b = experiments.load("mnist1d", seed=3, num_samples=500)
    assert a.x_train.shape == (400, 40) and a.x_test.shape == (100, 40)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    d = experiments.load("digits", seed=0, label_noise=0.2)
    assert d.x_train.shape[1] == 64 and (d.y_train != d.y_train_clean).mean() > 0.1
    with pytest.raises(ValueError, match="dataset"):
        experiments.load("cifar")


def test_sharpness_aware_step_skips_looksam_reuse_steps_and_matches_the_explicit_loop():
    tx = sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3)
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(0.1))
    p, s = make_params(), init(make_params())
    step = jax.jit(step)
    for b in batches(5):
        p, s, out = step(p, s, b)
    # on reuse steps the helper reported perturbed_grads == grads (second pass skipped)
    assert_trees_close(out.perturbed_grads, out.grads, rtol=1e-6, atol=1e-8)
    want, _ = train(sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3), geometry.l2(0.1), make_params(), batches(5))
    assert_trees_close(p, want, rtol=1e-6, atol=1e-7)


def test_sharpness_aware_step_literal_second_pass_chosen_on_the_host_equals_the_cond():
    tx = lambda: sam_optax.looksam(optax.sgd(0.1, momentum=0.9), k=3)  # noqa: E731
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx(), geometry.l2(0.1))
    full = jax.jit(lambda p, s, b: step(p, s, b, second_pass=True))
    reuse = jax.jit(lambda p, s, b: step(p, s, b, second_pass=False))
    for f in (full, reuse):  # literal flags: no gradient pass under a conditional in either program
        text = f.lower(make_params(), init(make_params()), batches(1)[0]).compile().as_text()
        conds = [line.split("conditional(")[0] for line in text.splitlines() if " conditional(" in line]
        assert not any(re.search(r"f32\[\d", c) for c in conds)  # only scalar (norm) conditionals
    p, s = make_params(), init(make_params())
    for b in batches(5):
        p, s, out = (full if bool(sam_optax.looksam_full_step(s.opt_state)) else reuse)(p, s, b)
    want, _ = train(tx(), geometry.l2(0.1), make_params(), batches(5))
    assert_trees_close(p, want, rtol=1e-6, atol=1e-7)
