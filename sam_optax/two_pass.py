"""The two-pass machinery of sharpness-aware training, shared by every rule.

``sharpness_aware_grad`` composes the three axes: an ascent *geometry* makes
the perturbation, the *data* axis decides which examples share it (m-sharpness
shards: chunks inside a device, devices of a mesh), and the output carries
what every combination *rule* needs (the clean and the perturbed gradient).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sam_optax import _utils
from sam_optax.data import _shards
from sam_optax.data._selection import DataSelection
from sam_optax.geometry import AscentGeometry, l2

AxisName = Union[str, Sequence[str], None]


class SharpnessAwareGrads(NamedTuple):
    """What one call of :func:`sharpness_aware_grad` returns.

    All gradients and losses are means over the m-sharpness shards (chunks and
    devices), each shard having used its own perturbation.

    Attributes:
      loss: the clean loss ``L(w)``.
      aux: the auxiliary output of the *clean* pass only (e.g. Flax BatchNorm
        statistics), averaged over shards (non-float leaves: max); ``None``
        without ``has_aux``.
      grads: the clean gradient ``g = grad L(w)``.
      perturbed_grads: the gradient at the perturbed weights, ``grad L(w + eps)``
        (each shard at its own ``eps``); pass it to the rule as
        ``tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)``.
      perturbed_loss: ``L(w + eps)``; ``perturbed_loss - loss`` is the
        (first-order, m-) sharpness of the batch.
      ascent_state: the geometry's new state (feed it to the next call).
    """

    loss: jax.Array
    aux: Any
    grads: Any
    perturbed_grads: Any
    perturbed_loss: jax.Array
    ascent_state: Any


class _Skip(NamedTuple):
    """Static marker (an empty pytree, so it passes through jit): no second pass."""


_SKIP = _Skip()


class _ShardResult(NamedTuple):
    loss: jax.Array
    aux: Any
    grads: Any
    perturbed_grads: Any
    perturbed_loss: jax.Array


def _value_and_grad(fn: Callable, params: Any, shard: Any, args: tuple, microbatch_size: Optional[int]):
    """``((loss, aux), grads)`` of a shard, optionally accumulated over micro-batches.

    With micro-batches, the shard's loss, aux and gradient are the means over its
    micro-batches (exact for a loss that is a mean over examples); only one
    micro-batch's activations are live at a time.
    """
    vg = jax.value_and_grad(fn, has_aux=True)
    size = _shards.batch_size(shard)
    if microbatch_size is not None and size % microbatch_size:
        raise ValueError(
            f"microbatch_size={microbatch_size} must divide the m-sharpness shard size {size}."
        )
    n = size // microbatch_size if microbatch_size else 1
    if n == 1:
        return vg(params, shard, *args)
    micro = _shards.split(shard, n)

    def body(carry, mb):
        (loss, aux), g = vg(params, mb, *args)
        new = jax.tree.map(_accumulate, carry, ((loss, aux), g))
        return new, None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: vg(params, first, *args))
    zeros = _shards.zeros_varying_like(shapes, jax.tree.leaves(params)[0])
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda t, s: _finish(t, n, s.dtype), total, shapes)


def _accumulate(total, x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return total + x.astype(total.dtype)
    return x  # non-float leaves (counters, flags): keep the last


def _finish(total, n, dtype):
    if jnp.issubdtype(dtype, jnp.inexact):
        return (total / n).astype(dtype)
    return total


def sharpness_aware_grad(
    loss_fn: Callable[..., Any],
    geometry: Optional[AscentGeometry] = None,
    *,
    has_aux: bool = False,
    m: Optional[int] = None,
    axis_name: AxisName = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    chunk_mode: str = "vmap",
    microbatch_size: Optional[int] = None,
    ascent_steps: int = 1,
    ascent_step_size: Optional[float] = None,
    data_selection: Optional[DataSelection] = None,
) -> Callable[..., SharpnessAwareGrads]:
    r"""Builds the jitted two-pass gradient function of sharpness-aware training.

    For every m-sharpness shard :math:`S` of the batch (disjoint groups of ``m``
    examples; the whole batch when ``m`` is ``None``):

    .. math::

      g_S = \nabla L_S(w), \quad
      \epsilon_S = \mathrm{geometry}(g_S), \quad
      \tilde g_S = \nabla L_S(w + \epsilon_S)

    and the results are averaged over the shards: ``grads`` :math:`=\bar g`,
    ``perturbed_grads`` :math:`=\bar{\tilde g}`. With ``m`` equal to the batch
    size (or ``None``) on one device this is exactly SAM's gradient.

    Shards are laid out in two composable ways:

    * ``m`` smaller than the (local) batch: the batch is reshaped to
      ``[B // m, m, ...]`` and the body is ``vmap``-ed over the chunks
      (``chunk_mode='vmap'``: per-chunk weights become batched matmuls and
      grouped convolutions), unrolled in the program (``'unroll'``: one
      ordinary pass per chunk, faster for convnets on CPU, compile time grows
      with the number of chunks) or run in a ``lax.scan`` (``'scan'``: memory of
      one chunk: gradient accumulation where each micro-batch is its own shard);
    * devices: call the function inside your own ``jax.shard_map`` / ``jax.pmap``
      over a mesh axis and pass that ``axis_name`` (each device perturbs with its
      local gradient; the results are ``pmean``-ed), or pass ``mesh=`` and the
      function wraps itself in ``jax.shard_map`` over ``axis_name`` (default: the
      mesh's only axis), taking care of the varying/invariant trap of
      ``check_vma``.

    Both at once give ``m`` smaller than the per-device batch.

    Weight decay does not enter the ascent direction unless it is part of
    ``loss_fn`` (the original JAX SAM code puts an L2 term in the loss; the
    PyTorch references, and the default here, keep decay in the base optimizer,
    e.g. ``optax.add_decayed_weights``, so the perturbation comes from the pure
    loss gradient). To add decay to the ascent direction only, chain it before
    the geometry: ``optax.chain(optax.add_decayed_weights(wd), geometry)``.

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``). ``batch`` is a pytree whose leaves share a leading example
        dimension (split into shards); ``args`` are passed whole to every shard.
        The loss should be a mean over the examples.
      geometry: an :class:`~sam_optax.geometry.AscentGeometry` (default:
        ``sam_optax.geometry.l2(rho=0.05)``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Only the clean pass's
        aux is returned, so e.g. BatchNorm statistics advance once per step.
      m: m-sharpness shard size, ``>= 1``, dividing the local batch; ``None``:
        one shard per device (the local batch).
      axis_name: mesh axis name(s) of the devices (inside your ``shard_map`` /
        ``pmap``, or with ``mesh``).
      mesh: a ``jax.sharding.Mesh``; if given the function runs itself under
        ``jax.shard_map`` with the batch split over ``axis_name`` and everything
        else replicated.
      chunk_mode: ``'vmap'``, ``'unroll'`` or ``'scan'`` (how chunks inside a
        device are run; all give the same result).
      microbatch_size: if given, each pass over a shard is accumulated over
        micro-batches of this size (a divisor of the shard size); the shard still
        shares one perturbation made from its full gradient.
      ascent_steps: number of ascent steps, ``>= 1``. With ``n > 1``:
        :math:`\epsilon_{k+1} = \Pi_\rho(\epsilon_k + a\,\mathrm{geometry}(\nabla
        L(w+\epsilon_k)))` from :math:`\epsilon_0 = 0`, projected back onto the
        ``rho``-ball of the geometry's norm (by radial rescaling), costing
        ``n + 1`` gradient passes in all.
      ascent_step_size: ``a`` above, as a fraction of ``rho``, ``> 0``;
        default ``1 / ascent_steps``.
      data_selection: e.g. ``sam_optax.data.sharpness_sensitive(gamma)`` (ESAM's
        SDS): per shard, the second pass runs only on the ``gamma`` fraction of
        examples whose loss rises most at ``w + eps`` (one extra forward pass).
        ``loss_fn`` must then return per-example losses (a vector; its mean is
        the loss). Not combinable with ``microbatch_size``.

    Returns:
      ``f(params, batch, *args, ascent_state=None, second_pass=True) ->
      SharpnessAwareGrads``, jitted. ``ascent_state`` is
      ``geometry.init(params)`` on the first call and ``out.ascent_state`` after;
      it may be left ``None`` when the geometry has no state (a constant
      ``rho``). ``second_pass`` may be a (traced) bool: where it is false the
      second pass is skipped at run time inside ``lax.cond`` (one gradient pass;
      ``perturbed_grads = grads``), as LookSAM's reuse steps need
      (:func:`sam_optax.looksam_full_step`); a literal ``True`` / ``False``
      compiles no cond (always / never the second pass; e.g. two jitted steps
      chosen on the host, for XLA:CPU, where convolutions inside a ``lax.cond``
      run on a slow path: jax-ml/jax#12868).
      ``loss_fn`` may return a scalar or a vector of per-example losses (then
      averaged).

    Example::

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(w, batch):
      ...   x, y = batch
      ...   return jnp.mean((x @ w - y) ** 2)
      >>> w = jnp.zeros(3)
      >>> batch = (jnp.ones((8, 3)), jnp.arange(8.0))
      >>> tx = sam_optax.sam(optax.sgd(0.1))
      >>> opt_state = tx.init(w)
      >>> sa_grad = sam_optax.sharpness_aware_grad(loss_fn, sam_optax.geometry.l2(0.05), m=4)
      >>> out = sa_grad(w, batch)
      >>> updates, opt_state = tx.update(out.grads, opt_state, w, perturbed_grads=out.perturbed_grads)
      >>> w = optax.apply_updates(w, updates)

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (section 5.1)
    """
    if geometry is None:
        geometry = l2(0.05)
    if not callable(getattr(geometry, "update", None)) or not callable(getattr(geometry, "init", None)):
        raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
    _utils.check_positive_int("m", m, allow_none=True)
    _utils.check_positive_int("microbatch_size", microbatch_size, allow_none=True)
    _utils.check_positive_int("ascent_steps", ascent_steps)
    if ascent_step_size is not None:
        _utils.check_range("ascent_step_size", ascent_step_size, low=0.0, low_inclusive=False)
    if chunk_mode not in ("vmap", "scan", "unroll"):
        raise ValueError(f"chunk_mode must be 'vmap', 'scan' or 'unroll', got {chunk_mode!r}.")
    if ascent_steps > 1 and getattr(geometry, "norm", None) is None:
        raise ValueError("ascent_steps > 1 needs a geometry with a norm (to project onto the rho-ball).")
    if data_selection is not None:
        if not isinstance(data_selection, DataSelection):
            raise ValueError(
                f"data_selection must come from sam_optax.data.sharpness_sensitive, got {data_selection!r}."
            )
        if microbatch_size is not None:
            raise ValueError("data_selection and microbatch_size cannot be combined.")
    device_axes = _shards.axis_tuple(axis_name)
    if mesh is not None:
        if not device_axes:
            if len(mesh.axis_names) != 1:
                raise ValueError(
                    f"axis_name is required with a mesh of several axes {mesh.axis_names}."
                )
            device_axes = tuple(mesh.axis_names)
        unknown = [a for a in device_axes if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"axis_name {unknown} not in the mesh axes {mesh.axis_names}.")
    step_size = ascent_step_size if ascent_step_size is not None else 1.0 / ascent_steps

    select = data_selection if data_selection is not None and data_selection.fraction < 1.0 else None

    def fn(params, batch, *args):
        """``(mean loss, (aux, per-example losses or None))``."""
        out = loss_fn(params, batch, *args)
        value, aux = out if has_aux else (out, None)
        value = jnp.asarray(value)
        if value.ndim == 1:
            return jnp.mean(value), (aux, value if select is not None else None)
        if value.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar or per-example losses [n], got shape {value.shape}.")
        if select is not None:
            raise ValueError("data_selection needs a loss_fn that returns per-example losses (a vector).")
        return value, (aux, None)

    def vg(params, shard, args):
        return _value_and_grad(fn, params, shard, args, microbatch_size)

    def refine(params, shard, args, g, state, eps):
        """Multi-step ascent from the first perturbation ``eps`` (projected)."""
        radius = geometry.norm(eps, g, params)

        def project(e, gk):
            r = geometry.norm(e, gk, params)
            scale = jnp.where(r > radius, radius / jnp.where(r > 0, r, 1.0), 1.0)
            return jax.tree.map(lambda x: scale * x, e)

        eps = project(jax.tree.map(lambda x: step_size * x, eps), g)
        for _ in range(ascent_steps - 1):
            (_, _), gk = vg(_utils.add_perturbation(params, eps), shard, args)
            d, _ = geometry.update(gk, state, params)
            eps = project(jax.tree.map(lambda e, x: e + step_size * x, eps, d), gk)
        return eps

    def body(params, shard, args, state, second_pass):
        (loss, (aux, clean_losses)), g = vg(params, shard, args)
        eps, new_state = geometry.update(g, state, params)

        def perturbed(_):
            e = refine(params, shard, args, g, state, eps) if ascent_steps > 1 else eps
            pp = _utils.add_perturbation(params, e)
            if select is None:
                (ploss, _), gp = vg(pp, shard, args)
            else:
                pert_losses = fn(pp, shard, *args)[1][1]  # forward only
                idx = select.select(clean_losses, pert_losses)
                (_, _), gp = vg(pp, jax.tree.map(lambda x: x[idx], shard), args)
                ploss = jnp.mean(pert_losses)
            return jnp.asarray(ploss, loss.dtype), gp

        if second_pass is None:
            ploss, gp = perturbed(None)
        elif isinstance(second_pass, _Skip):
            ploss, gp = loss, g
        else:  # LookSAM-style reuse steps skip the second pass at run time
            ploss, gp = jax.lax.cond(second_pass, perturbed, lambda _: (loss, g), None)
        return _ShardResult(loss, aux, g, gp, ploss), new_state

    def local(params, batch, args, state, second_pass):
        """Runs on one device's batch; averages over its chunks and the devices."""
        params = _shards.as_device_varying(params, device_axes)
        size = _shards.batch_size(batch)
        where = "per-device batch" if device_axes else "batch"
        n = _shards.num_chunks(size, m, where=where)
        if n == 1:
            res, new_state = body(params, batch, args, state, second_pass)
            return _shards.shard_mean(res, device_axes), new_state
        chunks = _shards.split(batch, n)
        if chunk_mode == "vmap":
            stacked, new_state = jax.vmap(
                lambda shard: body(params, shard, args, state, second_pass), out_axes=(0, None)
            )(chunks)
            return _shards.shard_mean(_shards.chunk_mean(stacked), device_axes), new_state

        if chunk_mode == "unroll":
            outs = [body(params, jax.tree.map(lambda x: x[i], chunks), args, state, second_pass) for i in range(n)]
            res = _shards.list_mean([o[0] for o in outs])
            return _shards.shard_mean(res, device_axes), outs[0][1]

        def step(carry, shard):
            res, new_state = body(params, shard, args, state, second_pass)
            return (jax.tree.map(_accumulate, carry[0], res), new_state), None

        first = jax.tree.map(lambda x: x[0], chunks)
        shapes, _ = jax.eval_shape(lambda: body(params, first, args, state, second_pass))
        zeros = _shards.zeros_varying_like(shapes, jax.tree.leaves(params)[0])
        (total, new_state), _ = jax.lax.scan(step, (zeros, state), chunks)
        res = jax.tree.map(lambda t, s: _finish(t, n, s.dtype), total, shapes)
        return _shards.shard_mean(res, device_axes), new_state

    def run(params, batch, args, state, second_pass):
        if mesh is None:
            return local(params, batch, args, state, second_pass)
        n_dev = int(np.prod([mesh.shape[a] for a in device_axes]))
        size = _shards.batch_size(batch)
        if size % n_dev:
            raise ValueError(
                f"the batch size {size} must be divisible by the number of devices {n_dev} "
                f"on mesh axes {device_axes}."
            )
        spec = P(device_axes if len(device_axes) > 1 else device_axes[0])
        explicit = any(
            t == jax.sharding.AxisType.Explicit
            for a, t in zip(mesh.axis_names, mesh.axis_types)
            if a in device_axes
        )
        if explicit:
            batch = jax.tree.map(lambda x: jax.sharding.reshard(x, NamedSharding(mesh, spec)), batch)
        mapped = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), spec, P(), P(), P()), out_specs=P(), check_vma=True
        )
        return mapped(params, batch, args, state, second_pass)

    @jax.jit
    def jitted(params, batch, *args, ascent_state=None, second_pass=None):
        if ascent_state is None:
            ascent_state = geometry.init(params)
            if jax.tree.leaves(ascent_state):
                raise ValueError(
                    "this geometry has a state (e.g. a rho schedule): pass "
                    "ascent_state=geometry.init(params) on the first call and "
                    "out.ascent_state after."
                )
        res, new_state = run(params, batch, args, ascent_state, second_pass)
        return SharpnessAwareGrads(
            loss=res.loss,
            aux=res.aux,
            grads=res.grads,
            perturbed_grads=res.perturbed_grads,
            perturbed_loss=res.perturbed_loss,
            ascent_state=new_state,
        )

    def sa_grad(params, batch, *args, ascent_state=None, second_pass=True):
        # A literal True / False compiles no lax.cond (the second pass is always /
        # never run); anything else (e.g. a traced bool from
        # sam_optax.looksam_full_step(opt_state)) selects the step kind at run time.
        if isinstance(second_pass, bool):
            flag = None if second_pass else _SKIP
        else:
            flag = jnp.asarray(second_pass, bool)
        return jitted(params, batch, *args, ascent_state=ascent_state, second_pass=flag)

    sa_grad.__doc__ = jitted.__doc__
    return sa_grad
