"""Perturb a subset of the parameters only (SAM-ON: the normalization layers)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry

MaskOrFn = Any | Callable[[Any], Any]


def _static_bool(m: Any) -> bool:
    if _utils.is_traced(m):
        raise ValueError("mask must hold Python bools (known when tracing), got a traced value.")
    return bool(m)


def _select(tree: Any, mask: Any) -> Any:
    """``tree`` with ``optax.MaskedNode()`` where ``mask`` is False (as ``optax.masked``)."""
    return jax.tree.map(lambda m, x: x if _static_bool(m) else optax.MaskedNode(), mask, tree)


def _fill(sub: Any, like: Any, mask: Any) -> Any:
    """``sub`` where ``mask`` is True, zeros (at least float32) shaped like ``like`` elsewhere."""

    def zeros(x):
        return jnp.zeros(jnp.shape(x), _utils.compute_dtype(x))

    return jax.tree.map(lambda m, s, x: s if _static_bool(m) else jax.tree.map(zeros, x), mask, sub, like)


def only(geometry: AscentGeometry, mask: MaskOrFn) -> AscentGeometry:
    r"""Restricts an ascent geometry to the leaves selected by ``mask``.

    With :math:`S` the selected leaves and :math:`G` the wrapped geometry:

    .. math::

      \epsilon_S = G(g_S), \qquad \epsilon_{\bar S} = 0 .

    The wrapped geometry sees only the sub-tree :math:`S` (the other leaves are
    ``optax.MaskedNode``, as in ``optax.masked``), so its norm is taken over
    :math:`S` only; e.g. ``only(l2(rho), mask)`` gives
    :math:`\epsilon_S = \rho\, g_S / (\lVert g_S\rVert_2 + \varepsilon)`.
    Its ``norm`` is the wrapped norm of the selected part.

    SAM-ON (Mueller et al., 2023) perturbs only the normalization layers:
    ``only(l2(rho), norm_layer_mask)`` (SAM-ON) or ``only(adaptive(rho, eta),
    norm_layer_mask)`` (ASAM-ON, the paper's main variant). Differences from the
    official code (``mueller-mp/SAM-ON``, ``sam_on.py``): it selects every
    parameter whose PyTorch name contains ``'norm'`` or ``'bn'``, whereas
    :func:`norm_layer_mask` selects ``scale``/``bias`` leaves of modules whose
    name looks like a normalization layer; it adds ``1e-16`` to the norm (pass
    ``eps=1e-16`` to the geometry to match); its ASAM-ON scales biases only with
    ``--normalize_bias`` (the README's command sets it), like ``adaptive`` with
    no ``mask``. The official code uses much larger radii than SAM's for
    SAM-ON; tune ``rho`` for the subset.

    Args:
      geometry: the ascent geometry applied to the selected leaves.
      mask: a pytree of Python bools with the structure of the params (or a
        prefix of it), or a function of the params returning one. As in
        ``optax.masked``, a function is called with the params at ``init`` and
        with the gradient at ``update`` (so it must depend only on the tree's
        structure and paths).

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`; its state is
      the wrapped geometry's.

    References:
      Mueller, Vlaar, Rolnick and Hein, `Normalization Layers Are All That
      Sharpness-Aware Minimization Needs <https://arxiv.org/abs/2306.04226>`_,
      NeurIPS 2023

    Examples:
      >>> import jax.numpy as jnp, sam_optax
      >>> geo = sam_optax.geometry.only(sam_optax.geometry.l2(0.5), {'w': False, 'b': True})
      >>> g = {'w': jnp.array([3.0]), 'b': jnp.array([4.0])}
      >>> eps, _ = geo.update(g, geo.init(g))
      >>> print(float(eps['w'][0]), float(eps['b'][0]))
      0.0 0.5
    """
    if not callable(getattr(geometry, "update", None)) or not callable(getattr(geometry, "init", None)):
        raise ValueError(f"geometry must be an AscentGeometry (init/update), got {geometry!r}.")
    mask_of = mask if callable(mask) else (lambda _: mask)

    def init_fn(params):
        return geometry.init(_select(params, mask_of(params)))

    def update_fn(grads, state, params=None, **extra_args):
        m = mask_of(grads)
        sub_params = None if params is None else _select(params, m)
        sub, state = geometry.update(_select(grads, m), state, sub_params, **extra_args)
        return _fill(sub, grads, m), state

    def norm_fn(perturbation, grads, params=None):
        m = mask_of(perturbation)
        sub_params = None if params is None else _select(params, m)
        return geometry.norm(_select(perturbation, m), _select(grads, m), sub_params)

    inner_norm = getattr(geometry, "norm", None)
    return AscentGeometry(init_fn, update_fn, None if inner_norm is None else norm_fn)


_NORM_TOKEN = re.compile(r"(?<![a-z])(bn|ln|gn)\d*(?![a-z])")
_VARIABLE_FIELDS = ("value", "raw_value")  # how flax.nnx Variables flatten


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_norm_param(path: tuple) -> bool:
    names = [_key_name(k) for k in path]
    while names and names[-1] in _VARIABLE_FIELDS:
        names.pop()
    if len(names) < 2 or names[-1] not in ("scale", "bias"):
        return False
    modules = [n for n in names[:-1] if not n.isdigit()]  # skip list indices
    if not modules:
        return False
    owner = modules[-1].lower()
    return "norm" in owner or _NORM_TOKEN.search(owner) is not None


def norm_layer_mask(params: optax.Params) -> Any:
    """Marks the normalization-layer parameters (``scale`` and ``bias``) by name.

    A leaf is selected when its name is ``scale`` or ``bias`` and the module
    owning it (the nearest path key above it that is not a list index) has a
    name containing ``norm`` (case-insensitive: Flax's ``BatchNorm_0``,
    ``LayerNorm_1``, ``GroupNorm_0``, ``RMSNorm_0``, or ``norm1``) or a token
    ``bn``, ``ln`` or ``gn`` (``bn1``, ``conv_bn``, ``ln_f``, ``query_ln``).
    Works for Flax Linen params dicts and ``flax.nnx`` states (the trailing
    ``value`` key of an ``nnx.Variable`` is skipped). Statistics
    (``mean``/``var``) are not selected.

    This is a heuristic on names: check the result, or pass your own pytree of
    bools to :func:`only` when the layers are named otherwise (e.g. the
    ``layers_1`` of ``nn.Sequential``).

    Args:
      params: a pytree of parameters (or gradients: only paths are read).

    Returns:
      A pytree of Python bools with the structure of ``params``.

    Examples:
      >>> import sam_optax
      >>> params = {'Dense_0': {'kernel': 1.0, 'bias': 1.0}, 'LayerNorm_0': {'scale': 1.0, 'bias': 1.0}}
      >>> sam_optax.geometry.norm_layer_mask(params)
      {'Dense_0': {'bias': False, 'kernel': False}, 'LayerNorm_0': {'bias': True, 'scale': True}}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_norm_param(path), params)
