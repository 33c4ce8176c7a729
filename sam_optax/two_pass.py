"""The two-pass machinery of sharpness-aware training, shared by every rule.

``sharpness_aware_grad(loss_fn, geometry, data)`` composes the three axes: an
ascent *geometry* (:mod:`sam_optax.geometry`) makes the perturbation, the
*data* axis (:func:`sam_optax.data.shards`) decides which examples share it
and which enter the second pass, and the output carries what every
combination *rule* (:mod:`sam_optax.rules`) needs: the clean and the perturbed
gradient. The layouts live in :mod:`sam_optax.data` (``_layout``: chunks and
micro-batches; ``_devices``: the mesh), multi-step ascent in ``_ascent``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _ascent, _utils
from sam_optax.data import _layout, _shards
from sam_optax.data._axis import DataAxis, shards
from sam_optax.data._devices import on_mesh
from sam_optax.data._selection import selected_pass
from sam_optax.geometry import AscentGeometry, l2


class SharpnessAwareGrads(NamedTuple):
    """What one call of :func:`sharpness_aware_grad` returns.

    All gradients and losses are means over the m-sharpness shards (chunks and
    devices), each shard having used its own perturbation.

    Attributes:
      loss: the clean loss ``L(w)``.
      aux: the auxiliary output of the *clean* pass only (e.g. Flax BatchNorm
        statistics), averaged over shards (non-float leaves: the max over
        shards and micro-batches, in every layout); ``None`` without ``has_aux``.
      grads: the clean gradient ``g = grad L(w)``.
      perturbed_grads: the gradient at the perturbed weights, ``grad L(w + eps)``
        (each shard at its own ``eps``); pass it to the rule as
        ``tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads,
        clean_grads=out.grads)``.
      perturbed_loss: ``L(w + eps)``; ``perturbed_loss - loss`` is the
        (first-order, m-) sharpness of the batch.
      ascent_state: the geometry's new state (feed it to the next call).
    """

    loss: jax.Array
    aux: Any
    grads: optax.Updates
    perturbed_grads: optax.Updates
    perturbed_loss: jax.Array
    ascent_state: optax.OptState


class _Always(NamedTuple):
    """Static marker (an empty pytree, so it passes through jit): always the second pass."""


class _Never(NamedTuple):
    """Static marker: never the second pass (``perturbed_grads = grads``)."""


_ALWAYS = _Always()


class _ShardResult(NamedTuple):
    loss: jax.Array
    aux: Any
    grads: optax.Updates
    perturbed_grads: optax.Updates
    perturbed_loss: jax.Array


def _first_leaf(params: optax.Params) -> jax.Array | None:
    """A parameter whose manual mesh axes a scan carry must vary over (``None``: no params)."""
    leaves = jax.tree.leaves(params)
    return leaves[0] if leaves else None


def _leading_size(batch: Any) -> int | None:
    """The leading size all leaves of ``batch`` share, or ``None`` (e.g. a graph batch)."""
    sizes = {x.shape[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    return sizes.pop() if len(sizes) == 1 else None


def _split_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
    """``(value, aux)`` of what ``loss_fn`` returned; ``ValueError`` where it cannot be right."""
    if not has_aux:
        if isinstance(out, (tuple, list)):
            raise ValueError(
                f"loss_fn returned a {type(out).__name__} of {len(out)} items: pass has_aux=True "
                "if it returns (loss, aux), as jax.value_and_grad needs."
            )
        return out, None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"an array of shape {jnp.shape(out)}" if hasattr(out, "shape") else type(out).__name__
        raise ValueError(f"with has_aux=True loss_fn must return a pair (loss, aux), got {got}.")
    return out[0], out[1]


def _mean_loss(loss_fn: Callable[..., Any], has_aux: bool, per_example: bool) -> Callable[..., Any]:
    """``fn(params, batch, *args) -> (mean loss, (aux, per-example losses or None))``."""

    def fn(params, batch, *args):
        value, aux = _split_output(loss_fn(params, batch, *args), has_aux)
        value = jnp.asarray(value)
        if value.ndim == 1:
            size = _leading_size(batch)
            if size is not None and value.shape[0] != size:
                raise ValueError(
                    f"loss_fn returned {value.shape[0]} per-example losses for a batch of {size} "
                    "examples: return one loss per example, or their mean (a scalar)."
                )
            return jnp.mean(value), (aux, value if per_example else None)
        if value.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar or per-example losses [n], got shape {value.shape}.")
        if per_example:
            raise ValueError("data selection needs a loss_fn that returns per-example losses (a vector).")
        return value, (aux, None)

    return fn


def _shard_body(
    fn: Callable[..., Any],
    geometry: AscentGeometry,
    data: DataAxis,
    steps: int,
    step_size: float,
    clean_pass: Callable[..., Any] | None = None,
):
    """``body(params, shard, args, state, flag) -> (_ShardResult, new_state)``: the two
    passes of one m-sharpness shard. ``clean_pass(fn, params, state) -> fn'`` (internal
    hook of :mod:`sam_optax.swp`) replaces the loss differentiated in the clean pass."""
    grad_fn = jax.value_and_grad(fn, has_aux=True)

    def vg(params, shard, args, gf=grad_fn):
        like = _first_leaf(params)
        return _layout.micro_batched(lambda s: gf(params, s, *args), shard, data.microbatch_size, like)

    def second(params, shard, args, g, state, eps, clean_losses):
        if steps > 1:

            def grad_at(p):
                return vg(p, shard, args)[1]

            eps = _ascent.refine(geometry, grad_at, params, g, state, eps, steps, step_size)
        pp = _utils.add_perturbation(params, eps)
        if data.selection is None:
            (ploss, _), gp = vg(pp, shard, args)
            return ploss, gp

        def losses_at(s):
            return fn(pp, s, *args)[1][1]

        def grads_on(s):
            return vg(pp, s, args)[1]

        return selected_pass(data.selection, losses_at, grads_on, shard, clean_losses)

    def body(params, shard, args, state, flag):
        gf = grad_fn if clean_pass is None else jax.value_and_grad(clean_pass(fn, params, state), has_aux=True)
        (loss, (aux, clean_losses)), g = vg(params, shard, args, gf)
        eps, new_state = geometry.update(g, state, params)

        def perturbed(_, eps=eps):
            if not isinstance(flag, _Always):  # eps made inside the branch: a reuse step skips it
                eps, _ = geometry.update(g, state, params)
            ploss, gp = second(params, shard, args, g, state, eps, clean_losses)
            return jnp.asarray(ploss, loss.dtype), gp

        if isinstance(flag, _Always):
            ploss, gp = perturbed(None)
        elif isinstance(flag, _Never):
            ploss, gp = loss, g
        else:  # LookSAM-style reuse steps skip the second pass at run time (AE-SAM: decided from g)
            pred = flag(g) if isinstance(flag, jax.tree_util.Partial) else flag
            ploss, gp = jax.lax.cond(pred, perturbed, lambda _: (loss, g), None)
        return _ShardResult(loss, aux, g, gp, ploss), new_state

    return body


def _per_device(body: Callable[..., Any], data: DataAxis) -> Callable[..., Any]:
    """``local(params, batch, args, state, flag)``: one device's batch, averaged over
    its chunks and then over the devices of ``data.axis_name``."""

    def local(params, batch, args, state, flag):
        params = _shards.as_device_varying(params, data.axis_name)
        n = 1
        if data.m is not None:
            where = "per-device batch" if data.axis_name else "batch"
            n = _shards.num_chunks(_shards.batch_size(batch), data.m, where=where)
        elif data.splits_batch:
            _shards.batch_size(batch)  # micro-batches / selection index examples: check the layout
        like = _first_leaf(params)

        def run(shard):
            return body(params, shard, args, state, flag)

        res, new_state = _layout.over_chunks(run, batch, n, data.chunk_mode, state, like)
        return _shards.shard_mean(res, data.axis_name), new_state

    return local


def _check_args(geometry: Any, data: Any, ascent_steps: int, ascent_step_size: Any) -> tuple[AscentGeometry, DataAxis]:
    geometry = l2(0.05) if geometry is None else geometry
    if not callable(getattr(geometry, "update", None)) or not callable(getattr(geometry, "init", None)):
        raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
    data = shards() if data is None else data
    if not isinstance(data, DataAxis):
        raise ValueError(f"data must come from sam_optax.data.shards(...), got {data!r}.")
    _utils.check_positive_int("ascent_steps", ascent_steps)
    if ascent_step_size is not None:
        _utils.check_range("ascent_step_size", ascent_step_size, low=0.0, low_inclusive=False, high=1.0)
    if ascent_steps > 1 and getattr(geometry, "norm", None) is None:
        raise ValueError("ascent_steps > 1 needs a geometry with a norm (to project onto the rho-ball).")
    return geometry, data


def second_pass_flag(second_pass: Any, data: DataAxis | None = None) -> Any:
    """The static marker (literal bool), the traced bool, or the decision
    ``clean_grads -> bool`` (a ``jax.tree_util.Partial``) for ``second_pass``."""
    if isinstance(second_pass, bool):
        return _Always() if second_pass else _Never()
    if second_pass is None or isinstance(second_pass, str):
        raise ValueError(f"second_pass must be True, False or a boolean array, got {second_pass!r}.")
    if callable(second_pass) and not hasattr(second_pass, "shape"):
        if data is not None and (data.m is not None or data.axis_name or data.mesh is not None):
            raise ValueError(
                "second_pass as a callable of the clean gradient (AE-SAM's adaptive_policy) needs one "
                "shard per device and no mesh / axis_name for now (each shard would decide alone): "
                "use data=shards() without m, axis_name or mesh."
            )
        return second_pass if isinstance(second_pass, jax.tree_util.Partial) else jax.tree_util.Partial(second_pass)
    return jnp.asarray(second_pass, bool)


def sharpness_aware_grad(
    loss_fn: Callable[..., Any],
    geometry: AscentGeometry | None = None,
    data: DataAxis | None = None,
    *,
    has_aux: bool = False,
    ascent_steps: int = 1,
    ascent_step_size: float | None = None,
    _clean_pass: Callable[..., Any] | None = None,
) -> Callable[..., SharpnessAwareGrads]:
    r"""Builds the jitted two-pass gradient function of sharpness-aware training.

    For every m-sharpness shard :math:`S` of the batch (see
    :func:`sam_optax.data.shards`; the whole batch by default):

    .. math::

      g_S = \nabla L_S(w), \quad
      \epsilon_S = \mathrm{geometry}(g_S), \quad
      \tilde g_S = \nabla L_S(w + \epsilon_S)

    and the results are averaged over the shards: ``grads`` :math:`=\bar g`,
    ``perturbed_grads`` :math:`=\bar{\tilde g}`. With one shard this is exactly
    SAM's gradient.

    Weight decay does not enter the ascent direction unless it is part of
    ``loss_fn`` (the original JAX SAM code puts an L2 term in the loss; the
    PyTorch references, and the default here, keep decay in the base optimizer,
    so the perturbation comes from the pure loss gradient).

    Args:
      loss_fn: ``loss_fn(params, batch, *args) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``), a mean over the examples; it may also return per-example
        losses (a vector, then averaged). ``batch`` is any pytree with one
        shard; splitting it into shards needs leaves sharing a leading example
        dimension. ``args`` are passed whole to every shard.
      geometry: the ascent geometry, an :class:`~sam_optax.geometry.AscentGeometry`
        (default: ``sam_optax.geometry.l2(rho=0.05)``).
      data: the data axis, from :func:`sam_optax.data.shards` (m-sharpness
        chunks, devices, micro-batches, data selection); default: one shard.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Only the clean pass's
        aux is returned, so e.g. BatchNorm statistics advance once per step.
      ascent_steps: number of ascent steps, ``>= 1``. With ``n > 1``:
        :math:`\epsilon_{k+1} = \Pi_\rho(\epsilon_k + a\,\mathrm{geometry}(\nabla
        L(w+\epsilon_k)))` from :math:`\epsilon_0 = 0`, projected back onto the
        ``rho``-ball of the geometry's norm (by radial rescaling), costing
        ``n + 1`` gradient passes in all.
      ascent_step_size: ``a`` above, as a fraction of ``rho``, ``0 < a <= 1``
        (a longer step is always projected back onto the ball; a huge one
        overflowed the projection and gave a zero perturbation, i.e. SGD);
        default ``1 / ascent_steps``.
      _clean_pass: internal hook of :func:`sam_optax.swp.swp_step` (``(fn, params,
        ascent_state) -> fn'``, the loss differentiated in the clean pass); not for users.

    Returns:
      ``f(params, batch, *args, ascent_state=None, second_pass=True) ->
      SharpnessAwareGrads``, jitted. ``ascent_state`` is
      ``geometry.init(params)`` on the first call and ``out.ascent_state`` after;
      it may be left ``None`` when the geometry has no state (a constant
      ``rho``). ``second_pass`` is ``True`` (always the second pass), ``False``
      (never: one gradient pass, ``perturbed_grads = grads``; both compile no
      conditional), a boolean array, e.g. ``sam_optax.looksam_full_step(opt_state)``,
      or a callable ``clean_grads -> bool`` evaluated after the clean pass (AE-SAM;
      one shard per device, no mesh or axis_name; a ``jax.tree_util.Partial`` to
      carry arrays, else closing over no traced value):
      the second pass then runs inside ``lax.cond`` only where it is true (on
      XLA:CPU convolutions inside a ``lax.cond`` run on a slow path,
      jax-ml/jax#12868: there, jit the two literal programs and pick one on
      the host).

    Examples:
      Two shards of 4 examples with :math:`x = (1, 1, 1)`, :math:`y = 0..3` and
      :math:`4..7`, from :math:`w = 0`: the clean loss is
      :math:`\mathrm{mean}(y^2) = 17.5` and the clean gradient
      :math:`-2\,\bar y = -7` per coordinate. Each shard's perturbation is
      :math:`\epsilon = -0.05 (1, 1, 1)/\sqrt 3` (its gradient points along
      :math:`-(1, 1, 1)`), so :math:`x \cdot \epsilon = -0.05\sqrt 3` and the
      perturbed gradient is :math:`2(-0.05\sqrt 3 - \bar y_S)` per coordinate,
      :math:`-7.1732` on average; SGD with rate 0.1 moves :math:`w` to 0.7173.

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> def loss_fn(w, batch):
      ...   x, y = batch
      ...   return jnp.mean((x @ w - y) ** 2)
      >>> w = jnp.zeros(3)
      >>> batch = (jnp.ones((8, 3)), jnp.arange(8.0))
      >>> tx = sam_optax.sam(optax.sgd(0.1))
      >>> opt_state = tx.init(w)
      >>> sa_grad = sam_optax.sharpness_aware_grad(
      ...     loss_fn, sam_optax.geometry.l2(0.05), sam_optax.data.shards(m=4))
      >>> out = sa_grad(w, batch)
      >>> updates, opt_state = tx.update(out.grads, opt_state, w,
      ...     perturbed_grads=out.perturbed_grads, clean_grads=out.grads)
      >>> w = optax.apply_updates(w, updates)
      >>> print(f"{float(out.loss):.4f}", [round(float(x), 4) for x in out.grads])
      17.5000 [-7.0, -7.0, -7.0]
      >>> print([round(float(x), 4) for x in out.perturbed_grads], [round(float(x), 4) for x in w])
      [-7.1732, -7.1732, -7.1732] [0.7173, 0.7173, 0.7173]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (section 5.1)
    """
    geometry, data = _check_args(geometry, data, ascent_steps, ascent_step_size)
    step_size = ascent_step_size if ascent_step_size is not None else 1.0 / ascent_steps
    fn = _mean_loss(loss_fn, has_aux, data.selection is not None)
    local = _per_device(_shard_body(fn, geometry, data, ascent_steps, step_size, _clean_pass), data)
    run = on_mesh(local, data)

    @jax.jit
    def jitted(params, batch, *args, ascent_state=None, flag=_ALWAYS):
        if ascent_state is None:
            ascent_state = geometry.init(params)
            if jax.tree.leaves(ascent_state):
                raise ValueError(
                    "this geometry has a state (e.g. a rho schedule): pass "
                    "ascent_state=geometry.init(params) on the first call and "
                    "out.ascent_state after."
                )
        res, new_state = run(params, batch, args, ascent_state, flag)
        return SharpnessAwareGrads(res.loss, res.aux, res.grads, res.perturbed_grads, res.perturbed_loss, new_state)

    def sa_grad(params, batch, *args, ascent_state=None, second_pass=True):
        return jitted(params, batch, *args, ascent_state=ascent_state, flag=second_pass_flag(second_pass, data))

    sa_grad.__doc__ = sharpness_aware_grad.__doc__
    return sa_grad
