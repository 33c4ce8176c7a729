r"""ESAM's stochastic weight perturbation that really skips weight gradients.

ESAM's official code gives the tensors its mask leaves out
``requires_grad=False`` for the first (clean) backward pass, so their clean
gradient is never computed; the perturbation is made from the gradients that
exist, :math:`\epsilon = \frac{\rho}{\beta}\frac{m\odot g}{\lVert m\odot
g\rVert}` (``geometry.stochastic(..., normalize='masked')``). The second pass,
at :math:`w+\epsilon`, needs every gradient.

Here the mask is drawn from the geometry's state *before* the clean pass (the
same key split its ``update`` uses, so the masks are the ones of
:func:`sam_optax.geometry.stochastic`), and the loss is rewritten
(:func:`skip_weight_grads`): every ``dot_general`` / ``conv_general_dilated``
whose weight operand is a parameter leaf runs through a ``jax.custom_vjp``
whose backward always computes the input cotangent and computes the kernel
cotangent only under ``lax.cond`` on that tensor's mask bit. The rewrite works
on the loss's jaxpr, so it works for Flax Linen, NNX and plain JAX alike.

What cannot be right raises ``ValueError``: the clean gradient of a skipped
tensor is zero, so a rule that reads the clean gradient (WSAM, GSAM, LookSAM,
wrappers such as ``skip_nonfinite``) would silently use :math:`m\odot g`;
:func:`swp_step` checks, when it is traced, that ``tx``'s outputs do not depend
on the clean gradient's values (SAM reads only the perturbed gradient).

References:
  Du et al, `Efficient Sharpness-aware Minimization for Improved Training of
  Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend.core import Literal

from sam_optax.data._axis import DataAxis
from sam_optax.geometry import AscentGeometry
from sam_optax.geometry._stochastic import keep_bits, swp_config
from sam_optax.train import SharpnessAwareState, step_pair
from sam_optax.two_pass import SharpnessAwareGrads, sharpness_aware_grad

__all__ = ["skip_weight_grads", "swp_step", "default_skipped_primitives"]

_BILINEAR = ("dot_general", "conv_general_dilated")
# Ops that pass a weight on unchanged up to layout / dtype: a matmul of their output still
# consumes the weight.
_PASS_THROUGH = ("convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "copy", "copy_p")
_CALLS = ("jit", "pjit", "closed_call", "core_call")


def default_skipped_primitives(backend: str | None = None) -> tuple[str, ...]:
    """The primitives skipped by default on ``backend`` (default: JAX's default backend).

    On CPU only ``dot_general``: XLA:CPU runs a convolution's gradient inside
    ``lax.cond`` on a slow path (jax-ml/jax#12868), slower than computing it
    unconditionally. Elsewhere both ``dot_general`` and ``conv_general_dilated``
    (GPU measurement pending).

    Examples:
      >>> import sam_optax
      >>> print(sam_optax.swp.default_skipped_primitives("cpu"))
      ('dot_general',)
      >>> print(sam_optax.swp.default_skipped_primitives("gpu"))
      ('dot_general', 'conv_general_dilated')
    """
    backend = jax.default_backend() if backend is None else backend
    return ("dot_general",) if backend == "cpu" else _BILINEAR


@jax.custom_vjp
def _mask_grad(p: jax.Array, keep: jax.Array) -> jax.Array:
    return p


def _mask_grad_fwd(p, keep):
    return p, keep


def _mask_grad_bwd(keep, ct):
    return ct * keep.astype(ct.dtype), None  # as the geometry's g * m (a non-finite g stays visible)


_mask_grad.defvjp(_mask_grad_fwd, _mask_grad_bwd)


def _kept_bilinear(prim: Any, params: dict, w_index: int) -> Callable[..., jax.Array]:
    """``op(x, w, keep)``: ``prim`` of the operands (weight at ``w_index``) whose
    backward computes ``d/dx`` always and ``d/dw`` only under ``lax.cond(keep)``."""

    def apply(x, w):
        return prim.bind(*((x, w) if w_index == 1 else (w, x)), **params)

    @jax.custom_vjp
    def op(x, w, keep):
        return apply(x, w)

    def fwd(x, w, keep):
        return apply(x, w), (x, w, keep)

    def bwd(res, ct):
        x, w, keep = res
        dx = jax.vjp(lambda x_: apply(x_, w), x)[1](ct)[0]
        dw = jax.lax.cond(keep, lambda: jax.vjp(lambda w_: apply(x, w_), w)[1](ct)[0], lambda: jnp.zeros_like(w))
        return dx, dw, None

    op.defvjp(fwd, bwd)
    return op


def _interpret(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    tags: Sequence[int | None],
    keep: Sequence[jax.Array],
    prims: Sequence[str],
) -> list:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, but a ``prims`` equation with an
    operand tagged ``i`` (the ``i``-th parameter leaf, possibly reshaped or cast)
    runs through :func:`_kept_bilinear` with ``keep[i]``; calls (``jit``) are inlined
    when a tagged value enters them."""
    env: dict = {}
    tag: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    tag.update({v: t for v, t in zip(jaxpr.invars, tags) if t is not None})
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        intags: list[Any] = [None if isinstance(v, Literal) else tag.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in prims and any(t is not None for t in intags[:2]):
            wi = 1 if intags[1] is not None else 0
            ans: Any = _kept_bilinear(eqn.primitive, eqn.params, wi)(invals[1 - wi], invals[wi], keep[intags[wi]])
        elif name in _CALLS and "jaxpr" in eqn.params and any(t is not None for t in intags):
            inner = eqn.params["jaxpr"]
            ans = _interpret(inner.jaxpr, inner.consts, invals, intags, keep, prims)
        else:
            ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if name in _PASS_THROUGH and intags and intags[0] is not None:
                tag[eqn.outvars[0]] = intags[0]
        if eqn.primitive.multiple_results or isinstance(ans, (list, tuple)):
            env.update(zip(eqn.outvars, ans))
        else:
            env[eqn.outvars[0]] = ans
    return [read(v) for v in jaxpr.outvars]


def skip_weight_grads(
    loss_fn: Callable[..., Any], keep: Any, primitives: Sequence[str] = _BILINEAR
) -> Callable[..., Any]:
    r"""``loss_fn`` whose gradient skips the weight gradients of the leaves ``keep`` leaves out.

    ``f = skip_weight_grads(loss_fn, keep)`` computes ``loss_fn(params, *rest)``
    (same value and outputs) with

    .. math:: \nabla_{p} f = m \odot \nabla_{p}\,\mathrm{loss\_fn}, \qquad m_i = \mathrm{keep}_i,

    exactly (skipped leaves get zeros). The saving: every equation of
    ``primitives`` (``dot_general``, ``conv_general_dilated``) whose operand is a
    parameter leaf (directly, or after a reshape / transpose / dtype cast, also
    inside ``jax.jit``-ed functions) computes that kernel gradient only under
    ``lax.cond(keep_i)``; other uses of a skipped leaf (biases, norms, other
    higher-order primitives such as ``scan``) are computed and masked.

    Args:
      loss_fn: ``loss_fn(params, *rest) -> any pytree``, traceable.
      keep: a tree shaped like ``params`` of boolean scalars (traced or not).
      primitives: names of the primitives to rewrite (a subset of
        ``('dot_general', 'conv_general_dilated')``).

    Returns:
      ``f(params, *rest)``, to be differentiated with respect to ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, x: jnp.sum(jnp.tanh(x @ p["a"]) @ p["b"])
      >>> p = {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}
      >>> keep = {"a": jnp.array(False), "b": jnp.array(True)}
      >>> g = jax.grad(skip_weight_grads(loss, keep))(p, jnp.ones((5, 3)))
      >>> bool(jnp.all(g["a"] == 0)), bool(jnp.allclose(g["b"], jax.grad(loss)(p, jnp.ones((5, 3)))["b"]))
      (True, True)
    """
    prims = tuple(primitives)
    if not set(prims) <= set(_BILINEAR):
        raise ValueError(f"primitives must be a subset of {_BILINEAR}, got {prims!r}.")

    def wrapped(params, *rest):
        p_leaves, p_def = jax.tree.flatten(params)
        try:
            k_leaves = p_def.flatten_up_to(keep)
        except (ValueError, TypeError) as e:
            raise ValueError(f"keep must have the tree structure of params {p_def}: {e}") from e
        k_leaves = [jnp.asarray(k, bool) for k in k_leaves]
        masked = [
            _mask_grad(p, k) if jnp.issubdtype(jnp.result_type(p), jnp.inexact) else p
            for p, k in zip(p_leaves, k_leaves)
        ]
        params = jax.tree.unflatten(p_def, masked)
        closed, out_shape = jax.make_jaxpr(loss_fn, return_shape=True)(params, *rest)
        flat = jax.tree.leaves((params, *rest))
        tags = list(range(len(p_leaves))) + [None] * (len(flat) - len(p_leaves))
        outs = _interpret(closed.jaxpr, closed.consts, flat, tags, k_leaves, prims)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return wrapped


def _check_rule(
    tx: optax.GradientTransformation,
    grads: optax.Updates,
    opt_state: optax.OptState,
    params: optax.Params,
    perturbed: optax.Updates,
) -> None:
    """``ValueError`` unless ``tx.update``'s outputs (updates and state) do not depend on
    the values of the clean gradient (read off its jaxpr at trace time: no run-time cost)."""
    from jax._src.interpreters import partial_eval as pe  # dead-code elimination of a jaxpr

    def upd(g, s, p, gp):
        return tx.update(g, s, p, perturbed_grads=gp, clean_grads=g)

    closed = jax.make_jaxpr(upd)(grads, opt_state, params, perturbed)
    _, used = pe.dce_jaxpr(closed.jaxpr, True)
    if any(used[: len(jax.tree.leaves(grads))]):
        raise ValueError(
            "tx reads the clean gradient (e.g. wsam, gsam, looksam, skip_nonfinite), but with "
            "skipped weight gradients the clean gradient of a masked tensor is zero, so its "
            "update would be silently wrong. Use a rule that reads only the perturbed "
            "gradient (sam_optax.sam(base)), or skip=False."
        )


def _check_geometry(geometry: Any) -> Any:
    cfg = swp_config(geometry)
    if cfg is None:
        raise ValueError(
            "geometry must be sam_optax.geometry.stochastic(inner, beta, normalize='masked') "
            f"(not wrapped), got {geometry!r}."
        )
    if cfg.normalize != "masked":
        raise ValueError(
            "normalize must be 'masked' to skip weight gradients: with normalize='full' the "
            "perturbation needs the norm of the whole clean gradient. Build the geometry with "
            "sam_optax.geometry.stochastic(inner, beta, normalize='masked'), or pass skip=False."
        )
    if cfg.granularity != "tensor":
        raise ValueError(
            "granularity must be 'tensor' to skip weight gradients (a per-coordinate mask "
            f"needs every gradient entry), got {cfg.granularity!r}; or pass skip=False."
        )
    return cfg


def swp_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    geometry: AscentGeometry,
    data: DataAxis | None = None,
    *,
    has_aux: bool = False,
    skip: Any = "auto",
) -> tuple[
    Callable[[optax.Params], SharpnessAwareState],
    Callable[..., tuple[optax.Params, SharpnessAwareState, SharpnessAwareGrads]],
]:
    r"""ESAM's training step whose clean pass skips the masked tensors' weight gradients.

    As :func:`sam_optax.sharpness_aware_step` (same ``(init, step)``, same
    state, same update), with ``geometry =
    sam_optax.geometry.stochastic(inner, beta, normalize='masked')``: the
    per-tensor mask :math:`m` of this step is drawn from the geometry's state
    before the clean pass and the clean gradient is :math:`m\odot\nabla L(w)`
    computed by :func:`skip_weight_grads` (kernel gradients of masked Dense /
    Conv tensors are not computed); then :math:`\epsilon = \frac{1}{\beta}
    G(m\odot g)` and the second pass (every gradient) as before. ``out.grads``
    is :math:`m\odot g`.

    Args:
      loss_fn, data, has_aux: as :func:`sam_optax.sharpness_aware_grad`.
      tx: a rule that reads only the perturbed gradient (``sam_optax.sam(base)``,
        possibly inside ``apply_to_both`` etc.); checked when ``step`` is traced
        (``ValueError`` otherwise).
      geometry: ``stochastic(..., normalize='masked')`` with
        ``granularity='tensor'`` (``ValueError`` otherwise, naming the argument).
      skip: ``'auto'`` (:func:`default_skipped_primitives` of the default
        backend: matmuls only on CPU, matmuls and convolutions elsewhere),
        ``True`` (both), ``False`` (nothing skipped: exactly
        ``sharpness_aware_step``), or a tuple of primitive names.

    Returns:
      ``(init, step)``; ``step(params, state, batch, *args) -> (params, state, out)``.

    Examples:
      Every example has loss :math:`(0 - 1)^2 = 1` and gradient :math:`(-2, -2, -2)`.
      This step's mask (``seed=0``) leaves the only tensor out: its clean
      gradient is not computed (zeros), so :math:`\epsilon = 0`, the perturbed
      loss is the clean one, and SGD takes the perturbed gradient :math:`-2`:
      :math:`w = 0 + 0.1 \cdot 2 = 0.2`.

      >>> import jax, jax.numpy as jnp, optax, sam_optax
      >>> loss_fn = lambda w, b: (b @ w["k"] - 1.0) ** 2  # per-example losses
      >>> geo = sam_optax.geometry.stochastic(sam_optax.geometry.l2(0.05), 0.5, normalize="masked")
      >>> data = sam_optax.data.shards(selection=sam_optax.data.sharpness_sensitive(0.5))
      >>> init, step = sam_optax.swp.swp_step(loss_fn, sam_optax.sam(optax.sgd(0.1)), geo, data)
      >>> w = {"k": jnp.zeros(3)}; state = init(w)
      >>> w, state, out = jax.jit(step)(w, state, jnp.ones((4, 3)))
      >>> print(float(out.loss), float(out.perturbed_loss), [float(x) for x in out.grads["k"]])
      1.0 1.0 [0.0, 0.0, 0.0]
      >>> print([round(float(x), 4) for x in w["k"]])
      [0.2, 0.2, 0.2]

    References:
      Du et al, `Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    """
    if skip is False:
        prims: tuple = ()
    elif skip is True:
        prims = _BILINEAR
    elif skip == "auto":
        prims = default_skipped_primitives()
    elif isinstance(skip, (tuple, list)) and set(skip) <= set(_BILINEAR):
        prims = tuple(skip)
    else:
        raise ValueError(f"skip must be 'auto', True, False or a tuple from {_BILINEAR}, got {skip!r}.")
    cfg = _check_geometry(geometry) if prims else None

    def clean_pass(fn, params, state):
        return skip_weight_grads(fn, keep_bits(state, params, cfg.beta), prims)

    sa_grad = sharpness_aware_grad(loss_fn, geometry, data, has_aux=has_aux, _clean_pass=clean_pass if prims else None)

    def check(tx, out, opt_state, params, second_pass):
        if not prims:
            return
        _check_rule(tx, out.grads, opt_state, params, out.perturbed_grads)
        if second_pass is not True:  # a skipped second pass would hand the rule the masked clean gradient
            raise ValueError(
                "swp_step skips clean-pass weight gradients, so every step needs its second pass: "
                f"second_pass must be True (got {second_pass!r}; a LookSAM or scheduler state in the "
                "optimizer gives a traced flag); use skip=False with schedulers."
            )

    return step_pair(sa_grad, tx, geometry, data, before_update=check)
