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
    steps_per_second: float
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
    and the training steps per second after compilation (evaluation excluded).
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
    if recipe.geometry is None:
        init, plain = sam_optax.plain_step(loss_fn, recipe.tx)

        def step(params, state, batch):
            params, state, (loss, _) = plain(params, state, batch)
            return params, state, loss

        get_opt_state = lambda state: state  # noqa: E731
    else:
        init, sa_step = sam_optax.sharpness_aware_step(
            per_example_loss if recipe.per_example else loss_fn, recipe.tx, recipe.geometry, **recipe.sa_kwargs)

        def step(params, state, batch):
            params, state, out = sa_step(params, state, batch)
            return params, state, out.loss

        get_opt_state = lambda state: state.opt_state  # noqa: E731

    state = init(params)
    step = jax.jit(step, donate_argnums=(0, 1))

    @jax.jit
    def accuracy(params, state, x, y):
        p = recipe.eval_params(params, get_opt_state(state))
        return jnp.mean(jnp.argmax(apply(p, x), -1) == y)

    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)  # on the device once
    rng = np.random.default_rng(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{method:<12}", position=position, leave=True,
                   dynamic_ncols=True)
    curve, t_start, train_seconds, timed_steps = [], time.perf_counter(), 0.0, 0
    for epoch in range(epochs):
        order = jnp.asarray(rng.permutation(n)[: steps_per_epoch * batch_size].reshape(steps_per_epoch, -1))
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = order[i]
            params, state, loss = step(params, state, {"x": x_train[idx], "y": y_train[idx]})
            if epoch == 0 and i == 0:  # exclude compilation from the timing
                jax.block_until_ready(params)
                t0 = time.perf_counter()
            if bar is not None:
                bar.update(1)
        jax.block_until_ready(params)
        train_seconds += time.perf_counter() - t0
        timed_steps += steps_per_epoch - (1 if epoch == 0 else 0)
        acc = float(accuracy(params, state, x_test, y_test))
        curve.append((epoch + 1, acc))
        if bar is not None:
            bar.set_postfix(loss=f"{float(loss):.3f}", test_acc=f"{acc:.3f}")
    if bar is not None:
        bar.close()
    eval_params = recipe.eval_params(params, get_opt_state(state))
    full = {"x": jnp.asarray(data.x_train), "y": jnp.asarray(data.y_train)}
    train_loss = float(jax.jit(loss_fn)(eval_params, full))
    lam, sharp, converged = None, None, None
    if hessian:
        sub = jax.tree.map(lambda a: a[:hessian_examples], full)
        res = sam_optax.metrics.power_iteration(loss_fn, eval_params, sub, key=jax.random.PRNGKey(seed),
                                                tol=1e-3, max_iterations=50)
        lam, converged = float(res.eigenvalue), bool(res.converged)
        radius = hp.rho if sharpness_rho is None else sharpness_rho
        out = sam_optax.sharpness_aware_grad(loss_fn, sam_optax.geometry.l2(radius))(eval_params, sub)
        sharp = float(out.perturbed_loss - out.loss)
    return RunResult(
        method=method, seed=seed, test_accuracy=curve[-1][1], train_loss=train_loss, lambda_max=lam,
        steps_per_second=timed_steps / max(train_seconds, 1e-9), seconds=time.perf_counter() - t_start, curve=curve,
        sharpness=sharp, lambda_max_converged=converged,
    )

