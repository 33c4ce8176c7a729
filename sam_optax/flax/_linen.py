"""Flax Linen: a TrainState and a train step for sharpness-aware training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

from sam_optax.flax import _common
from sam_optax.geometry import AscentGeometry
from sam_optax.rules import check_placement
from sam_optax.train import resolve_second_pass
from sam_optax.two_pass import sharpness_aware_grad


class TrainState(train_state.TrainState):
    """A ``flax.training.train_state.TrainState`` for sharpness-aware rules.

    Adds the BatchNorm statistics, the ascent geometry (static) and its state,
    and an ``apply_gradients`` that forwards ``perturbed_grads`` to the rule
    (Flax's own ``apply_gradients`` calls ``tx.update`` without extra
    arguments). Every field is a pytree of arrays (or a static field), so the
    state checkpoints with orbax: restore with
    ``jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh_state)`` as the target.

    Attributes:
      step: number of updates applied (an int32 array).
      apply_fn: usually ``model.apply``.
      params: the parameters.
      tx: the rule (e.g. ``sam_optax.sam(optax.sgd(0.1))``).
      opt_state: its state.
      batch_stats: the model's ``batch_stats`` collection (``None`` without
        BatchNorm).
      ascent_state: the geometry's state (e.g. the count of a ``rho`` schedule).
      geometry: the :class:`~sam_optax.geometry.AscentGeometry` (static).

    Examples:
      ``apply_gradients`` hands the rule both gradients; SAM steps with the
      perturbed one: :math:`0 - 0.1 \\cdot 2 = -0.2`.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import optax
      >>> import sam_optax
      >>> net = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)
      >>> params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
      >>> state = sam_optax.flax.TrainState.create(
      ...     apply_fn=net.apply, params=params, tx=sam_optax.sam(optax.sgd(0.1)),
      ...     geometry=sam_optax.geometry.l2(0.05))
      >>> grads = {"kernel": jnp.ones((3, 1))}
      >>> state = state.apply_gradients(grads=grads, perturbed_grads={"kernel": jnp.full((3, 1), 2.0)})
      >>> print(int(state.step), [round(float(x), 4) for x in state.params["kernel"][:, 0]])
      1 [-0.2, -0.2, -0.2]
    """

    batch_stats: Any = None
    ascent_state: optax.OptState | None = None
    geometry: AscentGeometry | None = struct.field(pytree_node=False, default=None)

    @classmethod
    # (mypy) geometry is required, unlike TrainState.create
    def create(cls, *, apply_fn, params, tx, geometry: AscentGeometry, batch_stats=None, **kwargs):  # type: ignore[override]
        """A new state at step 0 with ``tx.init(params)`` and ``geometry.init(params)``.

        Args:
          apply_fn: usually ``model.apply``.
          params: ``variables["params"]``.
          tx: the rule, a ``GradientTransformationExtraArgs`` taking
            ``perturbed_grads`` (``sam``, ``wsam``, ``gsam``, ...).
          geometry: the ascent geometry (e.g. ``sam_optax.geometry.l2(0.05)``).
          batch_stats: ``variables["batch_stats"]`` (or ``None``).
          **kwargs: further fields of a subclass.
        """
        if geometry is None or not callable(getattr(geometry, "init", None)):
            raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
        opt_state = tx.init(params)
        check_placement(opt_state)
        return cls(
            step=jnp.zeros((), jnp.int32),
            apply_fn=apply_fn,
            params=params,
            tx=tx,
            opt_state=opt_state,
            batch_stats=batch_stats,
            ascent_state=geometry.init(params),
            geometry=geometry,
            **kwargs,
        )

    def apply_gradients(self, *, grads, perturbed_grads, clean_grads=None, tx_extra_args=None, **kwargs):
        """One update of the rule: ``tx.update(grads, opt_state, params, perturbed_grads=..., clean_grads=...)``.

        Args:
          grads: the clean gradient ``out.grads`` of
            :func:`sam_optax.sharpness_aware_grad`.
          perturbed_grads: ``out.perturbed_grads``.
          clean_grads: ``out.grads`` again (default: ``grads``), so that a rule
            can tell whether a piece chained before it changed the gradient.
          tx_extra_args: further keyword arguments for ``tx.update``.
          **kwargs: fields to ``replace`` (e.g. ``batch_stats``, ``ascent_state``).

        Returns:
          The state with ``step + 1`` and the new ``params`` and ``opt_state``.
        """
        updates, opt_state = self.tx.update(
            grads,
            self.opt_state,
            self.params,
            perturbed_grads=perturbed_grads,
            clean_grads=grads if clean_grads is None else clean_grads,
            **(tx_extra_args or {}),
        )
        return self.replace(
            step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state, **kwargs
        )


def linen_train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    rng_collections: Sequence[str] = ("dropout",),
    jit: bool = True,
    donate: bool = False,
    **sa_kwargs: Any,
) -> Callable[..., Any]:
    r"""Builds ``step(state, batch, rng=None, second_pass="auto") -> (state, metrics)`` for a Linen model.

    One step is :func:`sam_optax.sharpness_aware_grad` (with the geometry of
    ``state``) followed by :meth:`TrainState.apply_gradients`:

    .. math::

      g = \nabla L(w), \quad \epsilon = \mathrm{geometry}(g), \quad
      \tilde g = \nabla L(w + \epsilon), \quad
      (w, s) \leftarrow \mathrm{rule}(g, \tilde g, w, s)

    ``loss_fn(apply, batch)`` computes the loss of a batch; ``apply(*args,
    **kwargs)`` calls ``state.apply_fn`` with the current (clean or perturbed)
    params, the state's ``batch_stats`` as a mutable collection and the shard's
    random keys, e.g.::

      def loss_fn(apply, batch):
          logits = apply(batch["image"], train=True)
          return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    **BatchNorm.** The new ``batch_stats`` come from the clean pass only (the
    perturbed pass's updates are discarded), so the running statistics advance
    once per step. With m-sharpness shards (``m``, devices) each shard
    normalizes with its own batch statistics ("ghost" BatchNorm, as in the
    SAM paper's m-sharpness experiments) and the stored running statistics are
    the mean over shards of the per-shard updates.

    **Second-pass schedules.** ``second_pass="auto"`` reads the schedule in
    ``state.opt_state`` (:func:`sam_optax.periodic`, :func:`sam_optax.randomized`,
    :func:`sam_optax.adaptive_policy`, LookSAM), so a base step runs one
    gradient pass, as :func:`sam_optax.sharpness_aware_step` does; ``True`` /
    ``False`` force the program (each literal compiles once) and a boolean
    array decides at run time. On a one-pass step ``perturbed_loss`` is the
    clean loss and ``sharpness`` is 0.

    **Dropout.** Both passes of a shard use the *same* random key, hence the same
    dropout mask: the perturbation is the ascent direction of the very loss
    (mask included) whose gradient is then taken at :math:`w + \epsilon`, as in
    the original SAM code. Different shards use different keys: the key of a
    shard is ``jax.random.fold_in(rng, i)``, ``i`` the index of its first
    example in the global batch, and collection number ``c`` of
    ``rng_collections`` gets ``jax.random.fold_in(that, c)``.

    Args:
      loss_fn: ``loss_fn(apply, batch) -> loss`` (or ``(loss, metrics)`` with
        ``has_aux``; the metrics of the clean pass, averaged over shards, are
        returned). Do not pass ``rngs`` or ``mutable`` to ``apply``.
      has_aux: whether ``loss_fn`` returns ``(loss, metrics)``.
      rng_collections: the Linen rng collections made from ``rng``.
      jit: return the step ``jax.jit``-ed. With ``data=shards(mesh=mesh)`` the
        jitted step first puts a state that is not yet on the mesh where the
        step leaves it (:func:`sam_optax.distributed.place`), so it compiles once.
      donate: with ``jit``, donate the input state's buffers.
      **sa_kwargs: the other arguments of :func:`sam_optax.sharpness_aware_grad`
        (``data=sam_optax.data.shards(...)``, ``ascent_steps``,
        ``ascent_step_size``).

    Returns:
      ``step(state, batch, rng=None, second_pass="auto") -> (state, metrics)`` where ``metrics`` has
      ``loss``, ``perturbed_loss``, ``sharpness`` (their difference) and the
      ``loss_fn`` metrics.

    Examples:
      The linear model :math:`x \cdot w` at :math:`w = 0` on :math:`x = (1, 1, 1)`,
      target 1: loss 1, gradient :math:`-2\,(1, 1, 1)`,
      :math:`\epsilon = -0.05\,(1, 1, 1)/\sqrt 3`, perturbed loss
      :math:`(1 + 0.05\sqrt 3)^2 = 1.1807`, perturbed gradient
      :math:`-2(1 + 0.05\sqrt 3) = -2.1732` per coordinate, so SGD with rate 0.1
      moves :math:`w` to 0.2173.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import optax
      >>> import sam_optax
      >>> net = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)
      >>> params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))["params"]
      >>> state = sam_optax.flax.TrainState.create(
      ...     apply_fn=net.apply, params=params, tx=sam_optax.sam(optax.sgd(0.1)),
      ...     geometry=sam_optax.geometry.l2(0.05))
      >>> def loss_fn(apply, batch):
      ...     return jnp.mean((apply(batch)[:, 0] - 1.0) ** 2)
      >>> step = sam_optax.flax.linen_train_step(loss_fn)
      >>> state, metrics = step(state, jnp.ones((4, 3)))
      >>> print({k: round(float(v), 4) for k, v in sorted(metrics.items())})
      {'loss': 1.0, 'perturbed_loss': 1.1807, 'sharpness': 0.1807}
      >>> print([round(float(x), 4) for x in state.params["kernel"][:, 0]])
      [0.2173, 0.2173, 0.2173]
    """
    collections = tuple(rng_collections)
    sa_kwargs = dict(sa_kwargs, has_aux=True)

    def build(apply_fn, geometry):
        def closure(params, batch_and_index, batch_stats, rng):
            batch, index = batch_and_index
            variables = {"params": params}
            if batch_stats is not None:
                variables["batch_stats"] = batch_stats
            rngs = None
            if rng is not None:
                key = _common.shard_key(rng, index)
                rngs = {c: jax.random.fold_in(key, i) for i, c in enumerate(collections)}
            mutable = ["batch_stats"] if batch_stats is not None else False
            new_stats = [batch_stats]

            def apply(*args, **kwargs):
                current = dict(variables, batch_stats=new_stats[0]) if mutable else variables
                if not mutable:
                    return apply_fn(current, *args, rngs=rngs, **kwargs)
                out, updates = apply_fn(current, *args, rngs=rngs, mutable=mutable, **kwargs)
                new_stats[0] = updates["batch_stats"]
                return out

            out = loss_fn(apply, batch)
            loss, metrics = out if has_aux else (out, {})
            return loss, (new_stats[0], metrics)

        return sharpness_aware_grad(closure, geometry, **sa_kwargs)

    get_sa_grad = _common.cached(build)

    def step(state: TrainState, batch: Any, rng: jax.Array | None = None, second_pass: Any = "auto"):
        if state.geometry is None:
            raise ValueError("state.geometry is None: make the state with TrainState.create(..., geometry=...).")
        sa_grad = get_sa_grad(state.apply_fn, state.geometry)
        index = _common.example_index(batch, sa_kwargs.get("data"))
        second_pass = resolve_second_pass(second_pass, state.opt_state)
        out = sa_grad(
            state.params,
            (batch, index),
            state.batch_stats,
            rng,
            ascent_state=state.ascent_state,
            second_pass=second_pass,
        )
        new_stats, metrics = out.aux
        state = state.apply_gradients(
            grads=out.grads,
            perturbed_grads=out.grads if second_pass is False else out.perturbed_grads,
            batch_stats=new_stats,
            ascent_state=out.ascent_state,
        )
        metrics = dict(
            metrics, loss=out.loss, perturbed_loss=out.perturbed_loss, sharpness=out.perturbed_loss - out.loss
        )
        return state, metrics

    if jit:
        jitted = _common.jit_with_flag(step, donate_argnums=(0,) if donate else ())
        mesh = getattr(sa_kwargs.get("data"), "mesh", None)
        return jitted if mesh is None else _common.placing(jitted, mesh, lambda state: state.params)
    return step
