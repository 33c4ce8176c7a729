"""A scheduled sharpness-aware step whose second pass is chosen on the host (XLA:CPU)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax import _utils
from sam_optax.data._axis import DataAxis
from sam_optax.geometry import AscentGeometry, l2
from sam_optax.rules import scheduled_second_pass
from sam_optax.train import SharpnessAwareState, sharpness_aware_step
from sam_optax.two_pass import SharpnessAwareGrads, _mean_loss


def host_chosen_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    geometry: AscentGeometry | None = None,
    data: DataAxis | None = None,
    *,
    has_aux: bool = False,
    donate: bool = True,
) -> tuple[
    Callable[[optax.Params], SharpnessAwareState],
    Callable[..., tuple[optax.Params, SharpnessAwareState, SharpnessAwareGrads]],
]:
    r""":func:`sharpness_aware_step` with a second-pass schedule, the program picked on the host each step.

    ``second_pass="auto"`` runs the second pass inside a ``lax.cond``; XLA:CPU
    runs a convolution's gradient inside a conditional on a slow path
    (jax-ml/jax#12868: a scheduled convnet step measured several times the cost
    its pass count predicts). Here each program has no conditional:

    * a flag in the state (LookSAM, :func:`sam_optax.periodic`,
      :func:`sam_optax.randomized`, :func:`sam_optax.late_phase`): the host reads
      it (one scalar from the device, so it waits for the previous step) and
      runs the jitted ``second_pass=True`` or ``False`` program;
    * AE-SAM's decision from the clean gradient (:func:`sam_optax.adaptive_policy`,
      :func:`sam_optax.adaptive_looksam`): a jitted clean pass returns :math:`g`
      and the decision, then the host runs the program that either takes the
      perturbed pass :math:`\tilde g = \nabla L(w + \epsilon(g))` and the rule's
      update, or the rule's one-pass update. One shard per device
      (``data=None`` or ``shards()`` without ``m``, devices, micro-batches or a
      selection), one ascent step.

    The updates equal those of ``sharpness_aware_step`` (tested); a state
    without a schedule always runs the two-pass program.

    Args:
      loss_fn, tx, geometry, data, has_aux: as :func:`sharpness_aware_step`.
      donate: donate the params and state to the programs (the caller's arrays
        are then invalid after a step, as with ``jax.jit(..., donate_argnums)``).

    Returns:
      ``(init, step)``: ``step(params, state, batch, *args) -> (params, state,
      out)`` is a Python function (not to be jitted itself) that runs the jitted
      programs; ``out.perturbed_loss`` is the clean loss on one-pass steps, and
      ``step.last_second_pass`` says whether the last call ran the second pass.

    Examples:
      >>> import jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> tx = sam_optax.periodic(sam_optax.sam(optax.sgd(0.1)), every=2)
      >>> init, step = sam_optax.host_chosen_step(loss_fn, tx, sam_optax.geometry.l2(0.05))
      >>> w = jnp.zeros(2); state = init(w)
      >>> for _ in range(3):
      ...     w, state, out = step(w, state, jnp.ones((4, 2)))
      >>> [round(float(x), 4) for x in w]  # base, SAM, base step
      [0.4005, 0.4005]
    """
    geometry = l2(0.05) if geometry is None else geometry
    init, sa_step = sharpness_aware_step(loss_fn, tx, geometry, data, has_aux=has_aux)
    donation = (0, 1) if donate else ()
    programs = {
        flag: jax.jit(lambda p, s, b, *a, flag=flag: sa_step(p, s, b, *a, second_pass=flag), donate_argnums=donation)
        for flag in (True, False)
    }
    clean, finish = _split_programs(loss_fn, tx, geometry, data, has_aux, donate)

    readers: dict = {}  # per state structure: where the flag is (found once; a tree search costs ~0.5 ms)

    def step(params, state, batch, *args):
        key = jax.tree.structure(state.opt_state)
        if key not in readers:
            readers[key] = _flag_reader(state.opt_state)
        read = readers[key]
        if read is None:  # AE-SAM: decided from this step's clean gradient
            out, decided = clean(params, state, batch, *args)
            step.last_second_pass = bool(decided)
            return finish[step.last_second_pass](params, state, batch, out, *args)
        step.last_second_pass = read(state.opt_state)
        return programs[step.last_second_pass](params, state, batch, *args)

    step.last_second_pass = None  # type: ignore[attr-defined]  # an attribute set on a function
    return init, step


def _flag_reader(opt_state: optax.OptState) -> Callable[[optax.OptState], bool] | None:
    """``opt_state -> bool`` reading the schedule's flag by its leaf index, ``None`` for
    AE-SAM's decision (a callable of the clean gradient)."""
    flag = scheduled_second_pass(opt_state)
    if isinstance(flag, jax.tree_util.Partial):
        return None
    if isinstance(flag, bool):  # no schedule: always the second pass
        return lambda _: flag
    index = next(i for i, leaf in enumerate(jax.tree.leaves(opt_state)) if leaf is flag)
    return lambda opt_state: bool(jax.tree.leaves(opt_state)[index])


def _split_programs(loss_fn, tx, geometry, data, has_aux, donate):
    """The clean-pass program ``(params, state, batch, *args) -> (out, decision)`` and the
    two finishing programs of AE-SAM's host-chosen step."""
    fn = _mean_loss(loss_fn, has_aux, False)

    def clean(params, state, batch, *args):
        _check_one_shard(data)
        (loss, (aux, _)), g = jax.value_and_grad(fn, has_aux=True)(params, batch, *args)
        decision = scheduled_second_pass(state.opt_state)
        out = SharpnessAwareGrads(loss, aux, g, g, loss, state.ascent_state)
        return out, decision(g)

    def make_finish(second):
        def finish(params, state, batch, out, *args):
            eps, ascent_state = geometry.update(out.grads, state.ascent_state, params)
            gp, ploss = out.grads, out.loss
            if second:
                (ploss, _), gp = jax.value_and_grad(fn, has_aux=True)(
                    _utils.add_perturbation(params, eps), batch, *args
                )
            updates, opt_state = tx.update(
                out.grads, state.opt_state, params, perturbed_grads=gp, clean_grads=out.grads
            )
            out = out._replace(perturbed_grads=gp, perturbed_loss=ploss, ascent_state=ascent_state)
            return optax.apply_updates(params, updates), SharpnessAwareState(opt_state, ascent_state), out

        return jax.jit(finish, donate_argnums=(0, 1) if donate else ())

    return jax.jit(clean), {True: make_finish(True), False: make_finish(False)}


def _check_one_shard(data: DataAxis | None) -> None:
    if data is not None and (
        data.m is not None
        or data.axis_name
        or data.mesh is not None
        or data.microbatch_size is not None
        or data.selection is not None
    ):
        raise ValueError(
            "host_chosen_step with AE-SAM's decision (adaptive_policy) needs one shard per device: "
            "data=None or shards() without m, axis_name, mesh, microbatch_size or selection."
        )
