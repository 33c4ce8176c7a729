"""The training loop of the experiments: one method, one dataset, one seed."""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax.experiments import _interrupt
from sam_optax.experiments.datasets import Dataset
from sam_optax.experiments.methods import Hyper, build_method
from sam_optax.experiments.models import logits_fn, make_model


@dataclasses.dataclass
class RunResult:
    method: str
    seed: int
    test_accuracy: float
    train_loss: float
    lambda_max: Optional[float]
    steps_per_second: Optional[float]  # None when the run has a single step (compilation, not timed)
    seconds: float
    curve: list  # [(epoch, test accuracy)]
    sharpness: Optional[float] = None  # first-order sharpness L(w + rho g/|g|) - L(w) on the eval subset
    lambda_max_converged: Optional[bool] = None  # power iteration reached its tolerance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_method(
    method: str,
    data: Dataset,
    *,
    model: str = "mlp",
    epochs: int = 30,
    batch_size: int = 128,
    hyper: Optional[Hyper] = None,
    seed: int = 0,
    hessian: bool = True,
    hessian_examples: int = 512,
    sharpness_rho: Optional[float] = None,
    progress: bool = True,
    position: int = 0,
) -> RunResult:
    """Trains ``model`` on ``data`` with ``method`` and evaluates it.

    Reports the clean test accuracy of the evaluated weights (the SWA / EMA /
    slow weights for the averaging methods), the final training loss on the
    (possibly noisy) training set, the top Hessian eigenvalue of the training
    loss on the first ``hessian_examples`` training examples (power iteration)
    and the first-order sharpness there with radius ``sharpness_rho`` (default:
    the recipe's ``rho``; fix it to compare methods tuned to different radii),
    and the training steps per second after compilation (evaluation excluded;
    ``None`` for a run of a single step, which is all compilation).

    Inside :func:`sam_optax.experiments._interrupt.sigint_sets_flag` (the
    ``sam-optax`` command), Ctrl-C raises ``Interrupted`` after the step in
    flight, between epochs or between the curvature metrics.
    """
    hp = hyper or Hyper()
    n = len(data.x_train)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples).")
    recipe = build_method(method, hp, steps_per_epoch=steps_per_epoch, epochs=epochs)
    net = make_model(model, data.num_classes)
    apply = logits_fn(net)

    def per_example_loss(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, batch["x"]), batch["y"])

    def loss_fn(params, batch):
        return jnp.mean(per_example_loss(params, batch))

    params = net.init(jax.random.PRNGKey(seed), jnp.asarray(data.x_train[:1]))["params"]
    init, step, get_opt_state = _make_step(recipe, loss_fn, per_example_loss)
    state = init(params)
    step = _jit_step(step, state, get_opt_state, hp.looksam_k)

    @jax.jit
    def accuracy(params, state, x, y):
        p = recipe.eval_params(params, get_opt_state(state))
        return jnp.mean(jnp.argmax(apply(p, x), -1) == y)

    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)  # on the device once
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{method:<12}", position=position, leave=True,
                   dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        params, state, curve, train_seconds, timed_steps = _train_epochs(
            step, lambda p, s: float(accuracy(p, s, x_test, y_test)), params, state, x_train, y_train,
            epochs=epochs, batch_size=batch_size, seed=seed, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    eval_params = recipe.eval_params(params, get_opt_state(state))
    full = {"x": x_train, "y": y_train}
    train_loss = float(jax.jit(loss_fn)(eval_params, full))
    _interrupt.check()
    lam, sharp, converged = None, None, None
    if hessian:
        radius = hp.rho if sharpness_rho is None else sharpness_rho
        lam, converged, sharp = _curvature(loss_fn, eval_params, jax.tree.map(lambda a: a[:hessian_examples], full),
                                           radius, seed)
    # one step is all compilation, excluded from the timing: no speed to report (None, not 0.0)
    speed = timed_steps / max(train_seconds, 1e-9) if timed_steps else None
    return RunResult(
        method=method, seed=seed, test_accuracy=curve[-1][1], train_loss=train_loss, lambda_max=lam,
        steps_per_second=speed, seconds=time.perf_counter() - t_start, curve=curve,
        sharpness=sharp, lambda_max_converged=converged,
    )



def looksam_host_chosen_default() -> bool:
    """Whether LookSAM's two programs are chosen on the host (XLA:CPU) rather than by
    ``lax.cond`` inside one program (GPU / TPU).

    XLA:CPU runs a convolution's gradient inside a conditional on a slow path
    (jax-ml/jax#12868: the full step of a convnet measured several times slower), so
    on CPU two jitted programs with literal ``second_pass`` flags are picked per step
    by :func:`sam_optax.looksam_schedule`; elsewhere the one program with the
    conditional avoids a second compilation.
    """
    return jax.default_backend() == "cpu"


def _jit_step(step, state, get_opt_state, looksam_k):
    """``step`` jitted with donation; a LookSAM step on CPU becomes two programs (literal
    ``second_pass``) picked on the host by :func:`sam_optax.looksam_schedule`."""
    opt_state = get_opt_state(state)
    if optax.tree.get(opt_state, "looksam_full_step", None) is None or not looksam_host_chosen_default():
        return jax.jit(step, donate_argnums=(0, 1))
    programs = {flag: jax.jit(lambda p, s, b, flag=flag: step(p, s, b, second_pass=flag), donate_argnums=(0, 1))
                for flag in (True, False)}
    schedule = sam_optax.looksam_schedule(looksam_k, opt_state)  # checked against the state here

    def host_step(params, state, batch):
        return programs[next(schedule)](params, state, batch)

    return host_step


def _make_step(recipe, loss_fn, per_example_loss):
    """``(init, step, get_opt_state)`` of ``recipe``: plain or sharpness-aware,
    ``step(params, state, batch) -> (params, state, loss)`` (sharpness-aware: also
    ``second_pass=``, see :func:`sam_optax.sharpness_aware_step`)."""
    if recipe.geometry is None:
        init, plain = sam_optax.plain_step(loss_fn, recipe.tx)

        def step(params, state, batch):
            params, state, (loss, _) = plain(params, state, batch)
            return params, state, loss

        get_opt_state = lambda state: state  # noqa: E731
    else:
        init, sa_step = sam_optax.sharpness_aware_step(
            per_example_loss if recipe.per_example else loss_fn, recipe.tx, recipe.geometry, **recipe.sa_kwargs)

        def step(params, state, batch, second_pass="auto"):
            params, state, out = sa_step(params, state, batch, second_pass=second_pass)
            return params, state, out.loss

        get_opt_state = lambda state: state.opt_state  # noqa: E731

    return init, step, get_opt_state


def _train_epochs(step, accuracy, params, state, x_train, y_train, *, epochs, batch_size, seed, bar):
    """The epochs of :func:`train_method`: ``(params, state, curve, train_seconds, timed_steps)``.

    Checks for Ctrl-C (:mod:`sam_optax.experiments._interrupt`) after every step
    and raises ``Interrupted`` once the step in flight has finished.
    """
    n = len(x_train)
    steps_per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    curve, train_seconds, timed_steps = [], 0.0, 0
    for epoch in range(epochs):
        order = jnp.asarray(rng.permutation(n)[: steps_per_epoch * batch_size].reshape(steps_per_epoch, -1))
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i]
            params, state, loss = step(params, state, {"x": x_train[idx], "y": y_train[idx]})
            if epoch == 0 and i == 0:  # exclude compilation from the timing
                jax.block_until_ready(params)
                t0 = time.perf_counter()
            if _interrupt.requested():
                jax.block_until_ready(params)  # nothing left running on buffers when we unwind
                _interrupt.check()
            if bar is not None:
                bar.update(1)
        jax.block_until_ready(params)
        train_seconds += time.perf_counter() - t0
        timed_steps += steps_per_epoch - (1 if epoch == 0 else 0)
        acc = accuracy(params, state)
        curve.append((epoch + 1, acc))
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{acc:.3f}")
        _interrupt.check()
    return params, state, curve, train_seconds, timed_steps


def _curvature(loss_fn, params, batch, radius, seed):
    """``(lambda_max, converged, sharpness)`` on ``batch`` (power iteration; first-order sharpness)."""
    res = sam_optax.metrics.power_iteration(loss_fn, params, batch, key=jax.random.PRNGKey(seed),
                                            tol=1e-3, max_iterations=50)
    lam, converged = float(res.eigenvalue), bool(res.converged)
    _interrupt.check()
    out = sam_optax.sharpness_aware_grad(loss_fn, sam_optax.geometry.l2(radius))(params, batch)
    return lam, converged, float(out.perturbed_loss - out.loss)
