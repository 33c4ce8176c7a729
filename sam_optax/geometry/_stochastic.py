"""ESAM's Stochastic Weight Perturbation (SWP): perturb a random subset of the weights."""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.geometry._base import AscentGeometry


class StochasticState(NamedTuple):
    """State of :func:`stochastic`.

    Attributes:
      key: raw ``uint32[2]`` PRNG key data (checkpoints as a plain array); split
        once per step.
      inner_state: the wrapped geometry's state.
    """

    key: jax.Array
    inner_state: optax.OptState


def tensor_bits(key: jax.Array, tree: Any, beta: float) -> list:
    """One Bernoulli(beta) boolean scalar per leaf of ``tree`` (in leaf order), from
    ``key``: the draws behind :func:`sample_mask`'s ``'tensor'`` masks."""
    leaves = jax.tree.leaves(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return [jax.random.bernoulli(k, beta) for k, _ in zip(keys, leaves)]


def sample_mask(key: jax.Array, tree: Any, beta: float, granularity: str) -> Any:
    """Bernoulli(beta) 0/1 masks (float32) shaped like ``tree``: one draw per leaf
    (``'tensor'``) or per entry (``'coordinate'``)."""
    leaves, treedef = jax.tree.flatten(tree)
    if granularity == "tensor":
        bits = tensor_bits(key, tree, beta)
        masks = [jnp.broadcast_to(b, jnp.shape(x)).astype(jnp.float32) for b, x in zip(bits, leaves)]
    else:
        keys = jax.random.split(key, max(len(leaves), 1))
        masks = [jax.random.bernoulli(k, beta, jnp.shape(x)).astype(jnp.float32) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, masks)


class SWPConfig(NamedTuple):
    """What :func:`stochastic` was built with (read by :mod:`sam_optax.swp`)."""

    beta: float
    granularity: str
    normalize: str


_CONFIGS: weakref.WeakKeyDictionary[Any, SWPConfig] = weakref.WeakKeyDictionary()


def swp_config(geometry: Any) -> SWPConfig | None:
    """The :class:`SWPConfig` of a geometry made by :func:`stochastic`, else ``None``."""
    try:
        return _CONFIGS.get(geometry.update)
    except TypeError:  # not weak-referenceable: not ours
        return None


def keep_bits(state: StochasticState, params: optax.Params, beta: float) -> Any:
    """The per-tensor mask bits the next ``update`` of a ``granularity='tensor'``
    geometry will draw from ``state`` (same key split), as a tree of boolean
    scalars shaped like ``params``; known before the clean gradient pass."""
    _, sub = jax.random.split(state.key)
    return jax.tree.unflatten(jax.tree.structure(params), tensor_bits(sub, params, beta))


def _check_seed(seed: Any) -> Any:
    """``seed`` as a Python int in the int32 range; an integer tracer is kept
    (``PRNGKey`` accepts it). Without ``jax_enable_x64`` JAX folds a seed to 32
    bits, so larger seeds would silently collide (``2**32`` gives seed 0's masks)."""
    _utils.check_int("seed", seed, low=_utils.INT32_MIN, high=_utils.INT32_MAX, allow_array=True)
    if _utils.is_traced(seed):
        return seed
    return int(seed)


def stochastic(
    geometry: AscentGeometry,
    beta: float = 0.5,
    *,
    granularity: str = "tensor",
    normalize: str = "full",
    seed: int = 0,
) -> AscentGeometry:
    r"""ESAM's Stochastic Weight Perturbation around any ascent geometry.

    Each step draws a 0/1 mask :math:`m \sim \mathrm{Bernoulli}(\beta)` (per
    parameter tensor, as the official code, or per coordinate, as the paper)
    and perturbs only the selected weights, rescaled by :math:`1/\beta`:

    * ``normalize='full'`` (the paper, default): :math:`\epsilon = \frac{1}{\beta}\,
      m \odot G(g)`; for the L2 ball :math:`\frac{\rho}{\beta} \frac{m\odot
      g}{\lVert g\rVert}`, whose expectation over the mask is the wrapped
      geometry's (SAM's) perturbation exactly;
    * ``normalize='masked'`` (the official code): :math:`\epsilon =
      \frac{1}{\beta} G(m \odot g)`, the geometry applied to the masked
      gradient; for the L2 ball :math:`\frac{\rho}{\beta} \frac{m\odot
      g}{\lVert m\odot g\rVert}`, of norm :math:`\rho / \beta` whatever the
      mask (biased: its expectation is larger than SAM's perturbation).

    ``beta = 1`` is the wrapped geometry. The same mask is used by every
    m-sharpness shard of a step; the key lives in the state (reproducible from
    ``seed``, checkpointable).

    What it saves: the official PyTorch code skips the weight gradients of
    the masked tensors in the first (clean) backward pass
    (``requires_grad=False``). This geometry alone computes every gradient and
    masks it; :func:`sam_optax.swp.swp_step` (``normalize='masked'``,
    ``granularity='tensor'``, a rule that does not read the clean gradient,
    e.g. :func:`sam_optax.sam`) draws the same masks before the clean pass
    and skips the masked tensors' matmul / convolution kernel gradients there.

    Args:
      geometry: the ascent geometry to sparsify (e.g. ``l2(rho)``).
      beta: probability that a weight (tensor) is perturbed, ``0 < beta <= 1``.
      granularity: ``'tensor'`` or ``'coordinate'``.
      normalize: ``'full'`` (paper) or ``'masked'`` (official code), see above.
      seed: integer seed of the mask sequence, in ``[-2**31, 2**31 - 1]`` (a
        Python or numpy int, or an integer 0-d array, traced or not, as
        ``optax.inject_hyperparams`` passes it).

    Returns:
      The corresponding :class:`sam_optax.geometry.AscentGeometry`.

    Examples:
      Around ``l2(0.5)`` with ``beta = 0.5`` and one draw per tensor, for
      :math:`g = (3, 4)` in two tensors: each tensor's perturbation is 0 or
      :math:`(\rho / \beta)\, g / \lVert g\rVert`, i.e. 0 or 0.6 for the first,
      0 or 0.8 for the second (their mean over the mask, :math:`(0.3, 0.4)`, is
      SAM's); 40 steps show the four masks.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> geo = sam_optax.geometry.stochastic(sam_optax.geometry.l2(0.5), beta=0.5)
      >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
      >>> state, update, seen = geo.init(g), jax.jit(geo.update), set()
      >>> for _ in range(40):
      ...     eps, state = update(g, state)
      ...     seen.add((round(float(eps["a"][0]), 4), round(float(eps["b"][0]), 4)))
      >>> print(sorted(seen))
      [(0.0, 0.0), (0.0, 0.8), (0.6, 0.0), (0.6, 0.8)]

    References:
      Du et al, `Efficient Sharpness-aware Minimization for Improved Training of
      Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022
    """
    _utils.check_transformation("geometry", geometry, "an AscentGeometry")
    _utils.check_range("beta", beta, low=0.0, high=1.0, low_inclusive=False)
    if granularity not in ("tensor", "coordinate"):
        raise ValueError(f"granularity must be 'tensor' or 'coordinate', got {granularity!r}.")
    if normalize not in ("masked", "full"):
        raise ValueError(f"normalize must be 'masked' or 'full', got {normalize!r}.")
    seed = _check_seed(seed)

    def init_fn(params):
        return StochasticState(key=jax.random.PRNGKey(seed), inner_state=geometry.init(params))

    def update_fn(grads, state, params=None, **extra_args):
        key, sub = jax.random.split(state.key)
        mask = sample_mask(sub, grads, beta, granularity)
        if normalize == "masked":
            masked = jax.tree.map(lambda g, mk: g * mk.astype(jnp.asarray(g).dtype), grads, mask)
            eps, inner = geometry.update(masked, state.inner_state, params, **extra_args)
        else:
            eps, inner = geometry.update(grads, state.inner_state, params, **extra_args)
        eps = jax.tree.map(lambda e, mk: e * mk / beta, eps, mask)
        return eps, StochasticState(key=key, inner_state=inner)

    _CONFIGS[update_fn] = SWPConfig(beta, granularity, normalize)
    return AscentGeometry(init_fn, update_fn, geometry.norm)
