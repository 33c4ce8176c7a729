"""Flax NNX: the two passes for an ``nnx.Module``, an optimizer holding the
ascent state, and a train step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.nnx.training.optimizer import to_opt_state

from sam_optax.flax import _common
from sam_optax.geometry import AscentGeometry
from sam_optax.rules import check_placement
from sam_optax.train import resolve_second_pass
from sam_optax.two_pass import SharpnessAwareGrads, sharpness_aware_grad


def nnx_sharpness_aware_grad(
    loss_fn: Callable[..., Any],
    geometry: AscentGeometry | None = None,
    *,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    **sa_kwargs: Any,
) -> Callable[..., SharpnessAwareGrads]:
    r""":func:`sam_optax.sharpness_aware_grad` for an ``nnx.Module``.

    The module is split into the variables ``wrt`` (differentiated and
    perturbed), its random keys, and the rest (BatchNorm statistics, rng
    counts, ...). Each pass runs ``loss_fn`` on a throwaway copy
    ``nnx.merge(graphdef, params, keys, rest, copy=True)``, so the model itself
    is not modified; the non-``wrt`` state the *clean* pass leaves in its copy
    is returned as ``out.aux[0]`` for one ``nnx.update(model, out.aux[0])``
    (the perturbed pass's is discarded: BatchNorm statistics and rng counts
    advance once per step).

    **Dropout.** Both passes of a shard start from the same rng state, hence use
    the same dropout mask (the perturbation is the ascent direction of the
    sampled loss, as in the original SAM code). Every shard's copy folds the
    index of its first example into the module's rng keys
    (``jax.random.fold_in(key, i)``), so different m-sharpness shards draw
    different masks; the model's keys themselves are never changed and its rng
    counts advance once per step. **BatchNorm** with shards normalizes per
    shard ("ghost" BatchNorm) and the returned statistics are the mean over
    shards.

    Args:
      loss_fn: ``loss_fn(model, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``).
      geometry: the ascent geometry (default ``sam_optax.geometry.l2(0.05)``).
      wrt: filter of the variables to differentiate (as ``nnx.Optimizer``'s).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      **sa_kwargs: the other arguments of :func:`sam_optax.sharpness_aware_grad`
        (``data=sam_optax.data.shards(...)``, ``ascent_steps``,
        ``ascent_step_size``).

    Returns:
      ``f(model, batch, *args, ascent_state=None, second_pass=True) -> SharpnessAwareGrads``
      (``second_pass`` as in :func:`sam_optax.sharpness_aware_grad`) whose
      ``grads`` and ``perturbed_grads`` are ``nnx.State`` of the ``wrt``
      variables (as ``nnx.grad`` returns) and whose ``aux`` is
      ``(new_state, loss_aux)``: the clean pass's non-``wrt`` state and the aux
      of ``loss_fn`` (``None`` without ``has_aux``).

    Examples:
      The linear model of :func:`linen_train_step`'s example: clean gradient
      :math:`-2`, perturbed gradient :math:`-2(1 + 0.05\sqrt 3) = -2.1732` per
      coordinate; the model itself is not changed.

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import sam_optax
      >>> model = nnx.Linear(3, 1, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
      >>> loss_fn = lambda m, batch: jnp.mean((m(batch)[:, 0] - 1.0) ** 2)
      >>> grad_fn = sam_optax.flax.nnx_sharpness_aware_grad(loss_fn, sam_optax.geometry.l2(0.05))
      >>> out = grad_fn(model, jnp.ones((4, 3)))
      >>> print(float(out.loss), [round(float(x), 4) for x in out.grads["kernel"][...][:, 0]])
      1.0 [-2.0, -2.0, -2.0]
      >>> print([round(float(x), 4) for x in out.perturbed_grads["kernel"][...][:, 0]])
      [-2.1732, -2.1732, -2.1732]
      >>> print(model.kernel[...][:, 0].tolist())
      [0.0, 0.0, 0.0]
    """
    sa_kwargs = dict(sa_kwargs, has_aux=True)

    def build(graphdef):
        def closure(params, batch_and_index, keys, rest, *args):
            batch, index = batch_and_index
            keys = jax.tree.map(lambda k: jax.random.fold_in(k, index[0]), keys)
            module = nnx.merge(graphdef, params, keys, rest, copy=True)
            out = loss_fn(module, batch, *args)
            loss, aux = out if has_aux else (out, None)
            _, _, _, new_rest = nnx.split(module, wrt, nnx.RngKey, ...)
            return loss, (new_rest, aux)

        return sharpness_aware_grad(closure, geometry, **sa_kwargs)

    get_sa_grad = _common.cached(build)

    def f(model, batch, *args, ascent_state=None, second_pass=True):
        graphdef, params, keys, rest = nnx.split(model, wrt, nnx.RngKey, ...)
        index = _common.example_index(batch, sa_kwargs.get("data"))
        return get_sa_grad(graphdef)(
            params, (batch, index), keys, rest, *args, ascent_state=ascent_state, second_pass=second_pass
        )

    return f


class SharpnessAwareOptimizer(nnx.Optimizer):
    """An ``nnx.Optimizer`` that also holds the ascent geometry and its state.

    ``update`` forwards ``perturbed_grads`` to the rule (``nnx.Optimizer``
    forwards keyword arguments to ``tx.update``) and stores the new ascent
    state. ``nnx.state((model, optimizer))`` checkpoints everything with orbax.

    Attributes:
      step, tx, opt_state, wrt: as ``nnx.Optimizer``.
      geometry: the :class:`~sam_optax.geometry.AscentGeometry` (static).
      ascent_state: its state (``OptState`` variables).

    Examples:
      SAM steps with the perturbed gradient: :math:`0 - 0.1 \\cdot 2 = -0.2`.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax
      >>> import sam_optax
      >>> model = nnx.Linear(3, 1, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
      >>> optimizer = sam_optax.flax.SharpnessAwareOptimizer(
      ...     model, sam_optax.sam(optax.sgd(0.1)), sam_optax.geometry.l2(0.05))
      >>> grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
      >>> perturbed = jax.tree.map(lambda g: 2.0 * g, grads)
      >>> _ = optimizer.update(model, grads, perturbed_grads=perturbed)
      >>> print(int(optimizer.step[...]), [round(float(x), 4) for x in model.kernel[...][:, 0]])
      1 [-0.2, -0.2, -0.2]
    """

    def __init__(self, model, tx, geometry: AscentGeometry, *, wrt: Any = nnx.Param):
        """Args:
        model: the ``nnx.Module``.
        tx: the rule (e.g. ``sam_optax.sam(optax.sgd(0.1))``).
        geometry: the ascent geometry (e.g. ``sam_optax.geometry.l2(0.05)``).
        wrt: filter of the trained variables.
        """
        if geometry is None or not callable(getattr(geometry, "init", None)):
            raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
        super().__init__(model, tx, wrt=wrt)
        check_placement(nnx.as_pure(self.opt_state))
        self.geometry = geometry
        self.ascent_state = nnx.data(to_opt_state(geometry.init(nnx.as_pure(nnx.state(model, wrt)))))

    def update(self, model, grads, /, *, perturbed_grads, ascent_state=None, **kwargs):
        """Applies one update of the rule to ``model`` and stores ``ascent_state``.

        Args:
          model: the module.
          grads: the clean gradient (``out.grads``).
          perturbed_grads: ``out.perturbed_grads``.
          ascent_state: the new ascent state (``out.ascent_state``), if any.
          **kwargs: further extra arguments of ``tx.update``.

        Returns:
          The updates.
        """
        kwargs.setdefault("clean_grads", grads)
        updates = super().update(model, grads, perturbed_grads=perturbed_grads, **kwargs)
        if ascent_state is not None:
            nnx.update(self.ascent_state, nnx.state(ascent_state))
        return updates


def nnx_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    jit: bool = True,
    **sa_kwargs: Any,
) -> Callable[..., Any]:
    r"""Builds ``step(model, optimizer, batch, *args, second_pass="auto") -> metrics`` for an NNX model.

    One step updates ``model`` and ``optimizer`` (a
    :class:`SharpnessAwareOptimizer`) in place:

    .. math::

      g = \nabla L(w), \quad \epsilon = \mathrm{geometry}(g), \quad
      \tilde g = \nabla L(w + \epsilon), \quad
      (w, s) \leftarrow \mathrm{rule}(g, \tilde g, w, s)

    with the clean pass's BatchNorm statistics and rng counts written to
    ``model`` once (see :func:`nnx_sharpness_aware_grad` for dropout and
    m-sharpness shards). It is the few lines::

      out = nnx_sharpness_aware_grad(loss_fn, optimizer.geometry, wrt=optimizer.wrt)(
          model, batch, ascent_state=nnx.as_pure(optimizer.ascent_state))
      nnx.update(model, out.aux[0])
      optimizer.update(model, out.grads, perturbed_grads=out.perturbed_grads,
                       ascent_state=out.ascent_state)

    ``second_pass="auto"`` reads the second-pass schedule in the optimizer's
    state (:func:`sam_optax.periodic`, :func:`sam_optax.randomized`,
    :func:`sam_optax.adaptive_policy`, LookSAM), so a base step runs one
    gradient pass; ``True`` / ``False`` force the program (each compiles
    once), a boolean array decides at run time.

    Args:
      loss_fn: ``loss_fn(model, batch, *args) -> loss`` (or ``(loss, metrics)``
        with ``has_aux``).
      has_aux: whether ``loss_fn`` returns ``(loss, metrics)`` (a dict, averaged
        over shards and returned).
      **sa_kwargs: the other arguments of :func:`sam_optax.sharpness_aware_grad`
        (``data=sam_optax.data.shards(...)``, ``ascent_steps``,
        ``ascent_step_size``).
      jit: return the step ``nnx.jit``-ed. With ``data=shards(mesh=mesh)`` it
        first moves the arrays of ``model`` and ``optimizer`` that are not yet
        on the mesh where the step leaves them
        (:func:`sam_optax.distributed.place`), so it compiles once.

    Returns:
      ``step(model, optimizer, batch, *args, second_pass="auto") -> metrics`` with ``loss``,
      ``perturbed_loss``, ``sharpness`` and the ``loss_fn`` metrics.

    Examples:
      The linear model of :func:`linen_train_step`'s example, with the same
      numbers:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import optax
      >>> import sam_optax
      >>> model = nnx.Linear(3, 1, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
      >>> optimizer = sam_optax.flax.SharpnessAwareOptimizer(
      ...     model, sam_optax.sam(optax.sgd(0.1)), sam_optax.geometry.l2(0.05))
      >>> loss_fn = lambda m, batch: jnp.mean((m(batch)[:, 0] - 1.0) ** 2)
      >>> step = sam_optax.flax.nnx_train_step(loss_fn)
      >>> metrics = step(model, optimizer, jnp.ones((4, 3)))
      >>> print({k: round(float(v), 4) for k, v in sorted(metrics.items())})
      {'loss': 1.0, 'perturbed_loss': 1.1807, 'sharpness': 0.1807}
      >>> print([round(float(x), 4) for x in model.kernel[...][:, 0]])
      [0.2173, 0.2173, 0.2173]
    """
    kwargs = dict(sa_kwargs, has_aux=has_aux)
    get_grad_fn = _common.cached(lambda geometry, wrt: nnx_sharpness_aware_grad(loss_fn, geometry, wrt=wrt, **kwargs))

    def step(model, optimizer: SharpnessAwareOptimizer, batch, *args, second_pass="auto"):
        grad_fn = get_grad_fn(optimizer.geometry, optimizer.wrt)
        second_pass = resolve_second_pass(second_pass, nnx.as_pure(optimizer.opt_state))
        out = grad_fn(model, batch, *args, ascent_state=nnx.as_pure(optimizer.ascent_state), second_pass=second_pass)
        new_state, metrics = out.aux
        nnx.update(model, new_state)
        perturbed = out.grads if second_pass is False else out.perturbed_grads
        optimizer.update(model, out.grads, perturbed_grads=perturbed, ascent_state=out.ascent_state)
        metrics = dict(
            metrics or {}, loss=out.loss, perturbed_loss=out.perturbed_loss, sharpness=out.perturbed_loss - out.loss
        )
        return metrics

    if not jit:
        return step
    jitted = _common.jit_with_flag(step, jit=nnx.jit)
    mesh = getattr(sa_kwargs.get("data"), "mesh", None)
    if mesh is None:
        return jitted

    def placed_step(model, optimizer, batch, *args, second_pass="auto"):
        _place(model, optimizer, mesh)
        return jitted(model, optimizer, batch, *args, second_pass=second_pass)

    return placed_step


def _place(model: Any, optimizer: Any, mesh: Any) -> None:
    """Moves the arrays of ``model`` and ``optimizer`` that are not yet on ``mesh``
    where the step leaves them (:func:`sam_optax.distributed.place`), in place."""
    from sam_optax import distributed

    state = nnx.state((model, optimizer))
    if not distributed.is_placed(state, mesh):
        nnx.update((model, optimizer), distributed.place(state, mesh, like=nnx.state(model, optimizer.wrt)))
