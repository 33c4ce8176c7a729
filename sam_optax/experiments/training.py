"""The training loop of the experiments: one method, one dataset, one seed."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax.experiments import _interrupt
from sam_optax.experiments.datasets import Dataset
from sam_optax.experiments.methods import Hyper, StepContext, build_method
from sam_optax.experiments.models import logits_fn, make_model
from sam_optax.rules._schedules import schedule_flags
from sam_optax.train import resolve_second_pass


@dataclasses.dataclass
class RunResult:
    """One method's run: final test accuracy, train loss, ``lambda_max``, speed and the accuracy curve."""

    method: str
    seed: int
    test_accuracy: float
    train_loss: float
    lambda_max: float | None
    steps_per_second: float | None  # None when the run has a single step (compilation, not timed)
    seconds: float
    curve: list  # [(epoch, test accuracy)]
    sharpness: float | None = None  # first-order sharpness L(w + rho g/|g|) - L(w) on the eval subset
    lambda_max_converged: bool | None = None  # power iteration reached its tolerance
    # fraction of the steps that ran sharpness_aware_step's second gradient pass (None: no such step)
    second_pass_fraction: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def train_method(
    method: str,
    data: Dataset,
    *,
    model: str = "mlp",
    epochs: int = 30,
    batch_size: int = 128,
    hyper: Hyper | None = None,
    seed: int = 0,
    hessian: bool = True,
    hessian_examples: int = 512,
    sharpness_rho: float | None = None,
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
    ``None`` for a run of a single step, which is all compilation), and for a
    sharpness-aware method the fraction of steps that ran the second gradient
    pass (1 for SAM; less for LookSAM and the schedulers).

    Inside :func:`sam_optax.experiments._interrupt.sigint_sets_flag` (the
    ``sam-optax`` command), Ctrl-C raises ``Interrupted`` after the step in
    flight, between epochs or between the curvature metrics.
    """
    hp = hyper or Hyper()
    n = len(data.x_train)
    steps_per_epoch = n // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} examples).")
    recipe = build_method(method, hp, steps_per_epoch=steps_per_epoch, epochs=epochs, seed=seed)
    net = make_model(model, data.num_classes)
    apply = logits_fn(net)
    context = model_context(apply, n, data.num_classes)
    loss_fn = context.loss_fn
    params = net.init(jax.random.PRNGKey(seed), jnp.asarray(data.x_train[:1]))["params"]
    init, step, get_opt_state = _make_step(recipe, loss_fn, context.per_example_loss, context)
    state = init(params, init_key(seed))
    step = _jit_step(step, state, get_opt_state, recipe.host_schedule)

    @jax.jit
    def accuracy(params, state, x, y):
        p = recipe.eval_params(params, get_opt_state(state))
        return jnp.mean(jnp.argmax(apply(p, x), -1) == y)

    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)  # on the device once
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=epochs * steps_per_epoch, desc=f"{method:<12}", position=position, leave=True, dynamic_ncols=True
        )
    t_start = time.perf_counter()
    try:
        params, state, curve, train_seconds, timed_steps = _train_epochs(
            step,
            lambda p, s: float(accuracy(p, s, x_test, y_test)),
            params,
            state,
            x_train,
            y_train,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            bar=bar,
        )
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
        lam, converged, sharp = _curvature(
            loss_fn, eval_params, jax.tree.map(lambda a: a[:hessian_examples], full), radius, seed
        )
    # one step is all compilation, excluded from the timing: no speed to report (None, not 0.0)
    speed = timed_steps / max(train_seconds, 1e-9) if timed_steps else None
    fraction = None
    if recipe.geometry is not None and recipe.make_step is None:
        fraction = int(state.second_passes) / (epochs * steps_per_epoch)
    return RunResult(
        method=method,
        seed=seed,
        test_accuracy=curve[-1][1],
        train_loss=train_loss,
        lambda_max=lam,
        steps_per_second=speed,
        seconds=time.perf_counter() - t_start,
        curve=curve,
        sharpness=sharp,
        lambda_max_converged=converged,
        second_pass_fraction=fraction,
    )


def model_context(apply, num_examples: int, num_classes: int) -> StepContext:
    """The cross-entropy losses of ``apply(params, x) -> logits`` as a :class:`StepContext`
    (batches ``{"x", "y", ...}``; other keys, e.g. ``"index"``, are ignored)."""

    def per_example_loss(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply(params, batch["x"]), batch["y"])

    def loss_fn(params, batch):
        return jnp.mean(per_example_loss(params, batch))

    def logits_loss(logits, batch):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

    return StepContext(
        loss_fn, per_example_loss, lambda p, b: apply(p, b["x"]), logits_loss, int(num_examples), int(num_classes)
    )


def init_key(seed: int) -> jax.Array:
    """The PRNG key a run of ``seed`` gives ``init`` (``Recipe.needs_key``); not the params' key."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def looksam_host_chosen_default() -> bool:
    """Whether a second-pass schedule's programs are chosen on the host (XLA:CPU) rather
    than by ``lax.cond`` inside one program (GPU / TPU).

    XLA:CPU runs a convolution's gradient inside a conditional on a slow path
    (jax-ml/jax#12868: the full step of a convnet measured several times slower), so
    on CPU the step is two jitted programs with literal ``second_pass`` flags picked
    per step: LookSAM's by :func:`sam_optax.looksam_schedule` (no device read), the
    other schedulers' by :func:`sam_optax.host_chosen_step`; elsewhere the one
    program with the conditional avoids a second compilation.
    """
    return jax.default_backend() == "cpu"


def _jit_step(step, state, get_opt_state, host_schedule=None):
    """``step`` jitted with donation. On CPU a step with a second-pass schedule becomes two
    programs (literal ``second_pass``) picked on the host: by ``host_schedule(opt_state)``
    (``Recipe.host_schedule``: LookSAM's, periodic's, late-phase's flags from a Python
    counter, RST's drawn a block ahead; no device read per step) when given, else by :func:`sam_optax.host_chosen_step`
    (``second_pass="host"``: reads the flag, or takes AE-SAM's decision after the clean pass)."""
    opt_state = get_opt_state(state)
    if not schedule_flags(opt_state) or not looksam_host_chosen_default():
        return jax.jit(step, donate_argnums=(0, 1))
    if host_schedule is None:
        return functools.partial(step, second_pass="host")  # its programs are jitted inside
    programs = {
        flag: jax.jit(lambda p, s, b, flag=flag: step(p, s, b, second_pass=flag), donate_argnums=(0, 1))
        for flag in (True, False)
    }
    schedule = host_schedule(opt_state)  # checked against the state here

    def host_step(params, state, batch):
        return programs[next(schedule)](params, state, batch)

    return host_step


class CountedState(NamedTuple):
    """The state of a step from :func:`_make_step`.

    Attributes:
      inner: the method's own step state (``get_opt_state`` reads its optimizer state).
      second_passes: int32, the number of steps so far that ran the second gradient
        pass of ``sharpness_aware_step`` (0 for the one-pass methods).
    """

    inner: Any
    second_passes: jax.Array


def _make_step(recipe, loss_fn, per_example_loss, context: StepContext | None = None):
    """``(init, step, get_opt_state)`` of ``recipe``: plain, sharpness-aware or the
    recipe's own (``Recipe.make_step``, called with ``context``).

    ``init(params, key=None)`` (``key`` required with ``Recipe.needs_key``) gives a
    :class:`CountedState`; ``step(params, state, batch) -> (params, state, loss)``
    (sharpness-aware: also ``second_pass=``, see :func:`sam_optax.sharpness_aware_step`, or
    ``"host"``: :func:`sam_optax.host_chosen_step`, not to be jitted;
    the count of second passes follows the pass actually run: the schedule's flag,
    AE-SAM's decision from the clean gradient, or a literal flag).
    """
    if recipe.make_step is not None:
        if context is None:
            raise ValueError("a recipe with its own make_step needs the StepContext of the model.")
        own_init, own_step, own_get = recipe.make_step(context)

        def inner_step(params, state, batch):
            if recipe.needs_index and "index" not in batch:
                raise ValueError('this method reads batch["index"] (the examples\' ids): pass it in the batch.')
            params, state, (loss, _) = own_step(params, state, batch)
            return params, state, loss, 0

        inner_get = own_get
    elif recipe.geometry is None:
        own_init, plain = sam_optax.plain_step(loss_fn, recipe.tx)

        def inner_step(params, state, batch):
            params, state, (loss, _) = plain(params, state, batch)
            return params, state, loss, 0

        inner_get = lambda state: state  # noqa: E731
    else:
        sa_loss = per_example_loss if recipe.per_example else loss_fn
        own_init, sa_step = sam_optax.sharpness_aware_step(sa_loss, recipe.tx, recipe.geometry, **recipe.sa_kwargs)
        _, host_step = sam_optax.host_chosen_step(sa_loss, recipe.tx, recipe.geometry, **recipe.sa_kwargs)

        # (mypy) the plain and own steps take no second_pass
        def inner_step(params, state, batch, second_pass="auto"):  # type: ignore[misc]
            if isinstance(second_pass, str) and second_pass == "host":  # a Python driver of jitted programs
                params, state, out = host_step(params, state, batch)
                return params, state, out.loss, host_step.last_second_pass
            flag = resolve_second_pass(second_pass, state.opt_state)
            params, state, out = sa_step(params, state, batch, second_pass=flag)
            ran = flag(out.grads) if callable(flag) else flag  # AE-SAM: the helper's own decision
            return params, state, out.loss, ran

        inner_get = lambda state: state.opt_state  # noqa: E731

    def init(params, key=None):
        if recipe.needs_key and key is None:
            raise ValueError("this method's init needs a PRNG key: init(params, key).")
        inner = own_init(params, key) if recipe.needs_key else own_init(params)
        # a host counter (numpy): the host-chosen steps add a Python bool without a device dispatch
        return CountedState(inner, np.zeros((), np.int32))

    def step(params, state, batch, **kwargs):
        params, inner, loss, ran = inner_step(params, state.inner, batch, **kwargs)
        count = state.second_passes + (int(ran) if isinstance(ran, (bool, int)) else jnp.asarray(ran, jnp.int32))
        return params, CountedState(inner, count), loss

    return init, step, lambda state: inner_get(state.inner)


def _train_epochs(step, accuracy, params, state, x_train, y_train, *, epochs, batch_size, seed, bar):
    """The epochs of :func:`train_method`: ``(params, state, curve, train_seconds, timed_steps)``.

    Each step gets ``{"x", "y", "index"}``, ``index`` the ids (rows of
    ``x_train``) of the batch's examples; the state's step count gives the epoch.

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
            params, state, loss = step(params, state, {"x": x_train[idx], "y": y_train[idx], "index": idx})
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
    res = sam_optax.metrics.power_iteration(
        loss_fn, params, batch, key=jax.random.PRNGKey(seed), tol=1e-3, max_iterations=50
    )
    lam, converged = float(res.eigenvalue), bool(res.converged)
    _interrupt.check()
    out = sam_optax.sharpness_aware_grad(loss_fn, sam_optax.geometry.l2(radius))(params, batch)
    return lam, converged, float(out.perturbed_loss - out.loss)
