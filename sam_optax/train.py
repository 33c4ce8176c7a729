"""A whole sharpness-aware training step: two-pass helper + rule + apply_updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from sam_optax import distributed
from sam_optax.data._axis import DataAxis
from sam_optax.geometry import AscentGeometry, l2
from sam_optax.rules import check_placement, scheduled_second_pass
from sam_optax.two_pass import SharpnessAwareGrads, sharpness_aware_grad


class SharpnessAwareState(NamedTuple):
    """Everything a sharpness-aware step carries besides the params.

    Attributes:
      opt_state: the rule's (optimizer's) state.
      ascent_state: the geometry's state (rho schedule count, SWP key, ...).
    """

    opt_state: optax.OptState
    ascent_state: optax.OptState


def sharpness_aware_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    geometry: AscentGeometry | None = None,
    data: DataAxis | None = None,
    *,
    has_aux: bool = False,
    ascent_steps: int = 1,
    ascent_step_size: float | None = None,
) -> tuple[
    Callable[[optax.Params], SharpnessAwareState],
    Callable[..., tuple[optax.Params, SharpnessAwareState, SharpnessAwareGrads]],
]:
    """The training step of ``tx`` (a sam_optax rule, possibly wrapped) as ``(init, step)``.

    ``step(params, state, batch, *args) -> (params, state, out)`` runs
    :func:`sharpness_aware_grad` (with ``geometry``, ``data`` and the keyword
    arguments), ``tx.update(out.grads, ..., perturbed_grads=..., clean_grads=...)``
    and ``optax.apply_updates``; ``out`` is the :class:`SharpnessAwareGrads`
    (loss, clean-pass aux, ...). If the optimizer state holds a second-pass
    schedule (LookSAM, :func:`sam_optax.periodic`, :func:`sam_optax.randomized`,
    :func:`sam_optax.late_phase`, :func:`sam_optax.adaptive_policy`), the second pass is skipped on its
    one-pass steps (chosen at run time by ``lax.cond``: ``second_pass="auto"``,
    the default). ``step(...,
    second_pass=True / False)`` overrides that with a
    literal flag, so two programs can be jitted and one picked on the host each
    step (with LookSAM: ``next(schedule)`` of :func:`sam_optax.looksam_schedule`, which
    reads no device value); on XLA:CPU this avoids running convolutions inside a
    conditional, and the ``False`` program compiles LookSAM's one-pass reuse update
    only. ``step`` is not jitted, so it can be wrapped in ``jax.jit`` with donation,
    or called inside a larger step.
    With ``data=shards(mesh=mesh)``, ``init(params)`` (called outside ``jit``)
    places the state on the mesh where the step leaves it (param-shaped leaves
    sharded like ``params``, the rest replicated; see
    :func:`sam_optax.distributed.place`): put ``params`` on the mesh first with
    ``sam_optax.distributed.place(params, mesh)`` and the jitted step compiles once.

    Examples:
      From :math:`w = 0` with :math:`b = (1, 1, 1)`: the loss is 1 and the clean
      gradient :math:`-2\\,(1, 1, 1)`, so :math:`\\epsilon = -0.05\\,(1, 1, 1)/\\sqrt 3`,
      :math:`b \\cdot \\epsilon = -0.05\\sqrt 3`, the perturbed gradient is
      :math:`2(-0.05\\sqrt 3 - 1) = -2.1732` per coordinate and SGD moves
      :math:`w` to 0.2173.

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> init, step = sam_optax.sharpness_aware_step(
      ...     loss_fn, sam_optax.sam(optax.sgd(0.1)), sam_optax.geometry.l2(0.05))
      >>> w = jnp.zeros(3); state = init(w)
      >>> w, state, out = jax.jit(step)(w, state, jnp.ones((4, 3)))
      >>> print(f"{float(out.loss):.4f}", [round(float(x), 4) for x in out.perturbed_grads])
      1.0000 [-2.1732, -2.1732, -2.1732]
      >>> print([round(float(x), 4) for x in w])
      [0.2173, 0.2173, 0.2173]
    """
    geometry = l2(0.05) if geometry is None else geometry
    sa_grad = sharpness_aware_grad(
        loss_fn, geometry, data, has_aux=has_aux, ascent_steps=ascent_steps, ascent_step_size=ascent_step_size
    )

    return step_pair(sa_grad, tx, geometry, data)


def step_pair(
    sa_grad: Callable[..., SharpnessAwareGrads],
    tx: optax.GradientTransformation,
    geometry: AscentGeometry,
    data: DataAxis | None,
    before_update: Callable[..., None] | None = None,
) -> tuple[
    Callable[[optax.Params], SharpnessAwareState],
    Callable[..., tuple[optax.Params, SharpnessAwareState, SharpnessAwareGrads]],
]:
    """The ``(init, step)`` of :func:`sharpness_aware_step` around a two-pass
    function ``sa_grad`` (also used by :func:`sam_optax.swp.swp_step`);
    ``before_update(tx, out, opt_state, params, second_pass)`` runs at trace
    time before the rule's update (a check; ``second_pass`` as resolved)."""

    def init(params):
        opt_state = tx.init(params)
        check_placement(opt_state)
        state = SharpnessAwareState(opt_state=opt_state, ascent_state=geometry.init(params))
        if data is not None and data.mesh is not None:  # where the step leaves it: one compilation
            state = distributed.place(state, data.mesh, like=params)
        return state

    def step(params, state, batch, *args, second_pass="auto"):
        second_pass = resolve_second_pass(second_pass, state.opt_state)
        out = sa_grad(params, batch, *args, ascent_state=state.ascent_state, second_pass=second_pass)
        if before_update is not None:
            before_update(tx, out, state.opt_state, params, second_pass)
        # no second pass: hand the rule the clean gradient itself (LookSAM then compiles its
        # one-pass reuse update, see sam_optax.rules.same_arrays)
        perturbed = out.grads if second_pass is False else out.perturbed_grads
        updates, opt_state = tx.update(
            out.grads, state.opt_state, params, perturbed_grads=perturbed, clean_grads=out.grads
        )
        return optax.apply_updates(params, updates), SharpnessAwareState(opt_state, out.ascent_state), out

    return init, step


def resolve_second_pass(second_pass: Any, opt_state: optax.OptState) -> Any:
    """``"auto"``: the choice of the one second-pass schedule in ``opt_state``
    (LookSAM, :func:`sam_optax.periodic`, :func:`sam_optax.randomized`,
    :func:`sam_optax.late_phase`: a traced bool; :func:`sam_optax.adaptive_policy`: a ``clean_grads -> bool`` callable),
    else ``True`` (``ValueError`` for two schedules, see
    :func:`sam_optax.rules.scheduled_second_pass`); ``True`` / ``False`` / a
    boolean array as they are."""
    if second_pass is None or isinstance(second_pass, str):
        if second_pass != "auto":
            raise ValueError(f"second_pass must be 'auto', True, False or a boolean array, got {second_pass!r}.")
        return scheduled_second_pass(opt_state)
    return second_pass


def plain_step(
    loss_fn: Callable[..., Any], tx: optax.GradientTransformation, *, has_aux: bool = False
) -> tuple[Callable[[optax.Params], optax.OptState], Callable[..., tuple[optax.Params, optax.OptState, Any]]]:
    """The same ``(init, step)`` shape for a plain (one-pass) optax optimizer;
    ``step`` returns ``(params, opt_state, (loss, aux))``.

    Examples:
      The loss of :func:`sharpness_aware_step`'s example: gradient
      :math:`-2\\,(1, 1, 1)` at :math:`w = 0`, so SGD with rate 0.1 moves
      :math:`w` to 0.2 (SAM's step went to 0.2173).

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
      >>> init, step = sam_optax.plain_step(loss_fn, optax.sgd(0.1))
      >>> w = jnp.zeros(3); opt_state = init(w)
      >>> w, opt_state, (loss, aux) = jax.jit(step)(w, opt_state, jnp.ones((4, 3)))
      >>> print(float(loss), aux, [round(float(x), 4) for x in w])
      1.0 None [0.2, 0.2, 0.2]
    """

    def step(params, opt_state, batch, *args):
        value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch, *args)
        updates, opt_state = tx.update(grads, opt_state, params)
        loss, aux = value if has_aux else (value, None)
        return optax.apply_updates(params, updates), opt_state, (loss, aux)

    return tx.init, step
