"""Filter grafting: K networks trained in parallel exchange weights layer by layer,
weighted by the entropy of each layer's weights."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import _utils
from sam_optax.averaging import _common

Layers = Any | Callable[[Any], Any] | None


def weight_entropy(x: jax.Array, num_bins: int = 10, *, exclusive_max: bool = False) -> jax.Array:
    r"""Entropy of the histogram of a weight tensor's values (the layer's "information").

    The values are split into ``n`` equal bins over :math:`[\min x, \max x]`, bin
    ``k`` holding :math:`[\min + k s, \min + (k+1)s)` with :math:`s = (\max -
    \min)/n`; :math:`p_k` is the fraction of values in bin ``k`` and

    .. math::

      H(x) = -\sum_{k:\,p_k > 0} p_k \log p_k \quad\text{(natural log)}.

    The maximum itself goes into the last bin (``exclusive_max=False``, as
    ``numpy.histogram``); the official code's bins are all half-open, so the
    maximum falls in no bin (its :math:`p_k` still divide by the full size):
    ``exclusive_max=True`` reproduces that. A constant tensor has entropy 0.

    Args:
      x: any array (flattened).
      num_bins: ``n >= 1`` (paper: 10).
      exclusive_max: drop the values equal to the maximum, as the official code.

    Returns:
      A float32 scalar.

    Examples:
      :math:`(0, 1, 2, 3)` in 4 bins of width 0.75 puts one value in each bin:
      :math:`H = \ln 4 \approx 1.3863`. Dropping the maximum (the official
      code's bins) leaves :math:`p = (1/4, 1/4, 1/4, 0)`, :math:`H = \frac34 \ln 4
      \approx 1.0397`; a constant tensor has :math:`H = 0`.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> x = jnp.array([0.0, 1.0, 2.0, 3.0])
      >>> print(f"{float(sam_optax.averaging.weight_entropy(x, num_bins=4)):.4f}")
      1.3863
      >>> print(f"{float(sam_optax.averaging.weight_entropy(x, num_bins=4, exclusive_max=True)):.4f}")
      1.0397
      >>> print(float(sam_optax.averaging.weight_entropy(jnp.ones(4))) == 0.0)
      True

    References:
      Meng et al, `Filter Grafting for Deep Neural Networks
      <https://arxiv.org/abs/2001.05868>`_, CVPR 2020
    """
    _common.check_int("num_bins", num_bins, low=1)
    if not isinstance(exclusive_max, bool):
        raise ValueError(f"exclusive_max must be a bool, got {exclusive_max!r}.")
    x = _utils.to_compute(jnp.ravel(x))
    lo, hi = jnp.min(x), jnp.max(x)
    width = (hi - lo) / num_bins
    safe = jnp.where(width > 0, width, 1.0)
    idx = jnp.clip(jnp.floor((x - lo) / safe), 0, num_bins - 1).astype(jnp.int32)
    weights = jnp.ones_like(x)
    if exclusive_max:
        weights = jnp.where((x >= hi) & (width > 0), 0.0, weights)
    counts = jnp.zeros((num_bins,), x.dtype).at[idx].add(weights)
    p = counts / x.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))


def grafting_coefficient(
    h_self: jax.Array,
    h_other: jax.Array,
    a: float = 0.4,
    c: float = 500.0,
    *,
    round_decimals: int | None = None,
) -> jax.Array:
    r"""The grafting weight of a network's own layer: :math:`\alpha = \frac{A}{\pi}\arctan(c(H_i - H_{i-1})) + \frac12`.

    The network with more information (higher entropy) keeps more of its own
    weights; :math:`\alpha \in (\frac12 - \frac A2, \frac12 + \frac A2)`.

    Args:
      h_self: :math:`H_i`, entropy of the receiving network's layer.
      h_other: :math:`H_{i-1}`, entropy of the giving network's layer.
      a: :math:`A \in [0, 1]` (paper default 0.4).
      c: :math:`c \ge 0` (paper default 500).
      round_decimals: ``None`` (the paper's formula) or the number of decimals to
        round to, ``0 <= round_decimals <= 38`` (``10**38`` is about the
        largest float32; the official code rounds to 2).

    Returns:
      :math:`\alpha`, broadcast over the inputs.

    Examples:
      With :math:`A = 0.4, c = 500`: equal entropies give :math:`\frac12`; an
      entropy difference of :math:`\pm 0.002` gives :math:`\arctan(\pm 1) =
      \pm\pi/4`, so :math:`\alpha = \frac12 \pm 0.1`.

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> alpha = sam_optax.averaging.grafting_coefficient(jnp.array([0.5, 0.502, 0.498]), 0.5)
      >>> print([round(float(x), 4) for x in alpha])
      [0.5, 0.6, 0.4]

    References:
      Meng et al, `Filter Grafting for Deep Neural Networks
      <https://arxiv.org/abs/2001.05868>`_, CVPR 2020
    """
    _utils.check_range("a", a, low=0.0, high=1.0)
    _utils.check_range("c", c, low=0.0)
    if round_decimals is not None:
        _common.check_int("round_decimals", round_decimals, low=0, high=38)
    alpha = a / jnp.pi * jnp.arctan(c * (jnp.asarray(h_self) - jnp.asarray(h_other))) + 0.5
    if round_decimals is not None:
        alpha = jnp.round(alpha, round_decimals)
    return alpha


def layers_by_module(params: optax.Params) -> Any:
    """Layer labels that group the leaves of one module (``kernel`` with ``bias``).

    The label of a leaf is its path without the last key, so e.g. a Flax
    ``Dense_0/{kernel, bias}`` is one layer. Pass it as ``layers=layers_by_module``.

    Args:
      params: a parameter pytree (of one network, or stacked).

    Returns:
      A pytree of hashable labels with the structure of ``params``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> params = {
      ...     "Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
      ...     "Dense_1": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)},
      ... }
      >>> print(jax.tree.leaves(sam_optax.averaging.layers_by_module(params)))
      ["['Dense_0']", "['Dense_0']", "['Dense_1']", "['Dense_1']"]
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path[:-1]), params)


def _labels(layers: Layers, params: optax.Params, treedef) -> list[Hashable]:
    n = treedef.num_leaves
    if layers is None:
        return list(range(n))
    tree = layers(params) if callable(layers) else layers
    labels = treedef.flatten_up_to(tree)
    return list(labels)


def graft(
    stacked_params: optax.Params,
    a: float = 0.4,
    c: float = 500.0,
    num_bins: int = 10,
    *,
    layers: Layers = None,
    round_decimals: int | None = None,
    exclusive_max: bool = False,
) -> optax.Params:
    r"""One ring grafting of K networks stacked on the leading axis.

    For network :math:`i` and layer :math:`l`, with network :math:`i-1` the
    previous one on the ring (network 0 receives from network K-1),

    .. math::

      \alpha_l = \frac{A}{\pi}\arctan\big(c\,(H(W_l^{i}) - H(W_l^{i-1}))\big) + \frac12,
      \qquad W_l^{i} \leftarrow \alpha_l W_l^{i} + (1 - \alpha_l) W_l^{i-1}

    with :math:`H` the :func:`weight_entropy` of the layer's values. All networks
    graft simultaneously from the pre-grafting weights, as in the official code
    (each network saves its weights, then reads its predecessor's).

    Args:
      stacked_params: params of K networks, every leaf with leading axis K.
      a: :math:`A \in [0, 1]` (default 0.4).
      c: :math:`c \ge 0` (default 500).
      num_bins: histogram bins ``n`` (default 10).
      layers: what a layer is: ``None`` (each leaf), a pytree of hashable labels
        with the structure of the params (leaves with one label form one layer,
        with one entropy over all their values and one :math:`\alpha`), or a
        function ``stacked_params -> labels`` such as :func:`layers_by_module`.
      round_decimals: round :math:`\alpha` (the official code: 2); ``None``: no.
      exclusive_max: histogram convention, see :func:`weight_entropy`.

    Returns:
      The grafted stacked params (same structure and dtypes).

    Examples:
      Two networks: network 0's layer :math:`(0, 1, 2, 3)` has entropy
      :math:`\ln 4` (4 bins), network 1's constant layer entropy 0. With
      :math:`c = 10^6` the arctan is :math:`\pm\pi/2` to float precision, so
      :math:`\alpha_0 = 0.7`, :math:`\alpha_1 = 0.3` and both networks become
      :math:`0.7\,(0, 1, 2, 3) + 0.3 \cdot 1 = (0.3, 1, 1.7, 2.4)` (with two
      networks and no rounding :math:`\alpha_1 = 1 - \alpha_0`: both end at the same mix).

      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> stacked = {"w": jnp.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])}
      >>> out = sam_optax.averaging.graft(stacked, c=1e6, num_bins=4)
      >>> print([[round(float(x), 4) for x in row] for row in out["w"]])
      [[0.3, 1.0, 1.7, 2.4], [0.3, 1.0, 1.7, 2.4]]

    References:
      Meng et al, `Filter Grafting for Deep Neural Networks
      <https://arxiv.org/abs/2001.05868>`_, CVPR 2020
    """
    _utils.check_range("a", a, low=0.0, high=1.0)
    _utils.check_range("c", c, low=0.0)
    _common.check_int("num_bins", num_bins, low=1)
    if round_decimals is not None:
        _common.check_int("round_decimals", round_decimals, low=0, high=38)
    if not isinstance(exclusive_max, bool):
        raise ValueError(f"exclusive_max must be a bool, got {exclusive_max!r}.")
    leaves, treedef = jax.tree.flatten(stacked_params)
    if not leaves:
        return stacked_params
    k = leaves[0].shape[0] if leaves[0].ndim else None
    if k is None or any(x.ndim == 0 or x.shape[0] != k for x in leaves):
        raise ValueError("graft needs every leaf stacked on a leading axis of the same size K.")
    labels = _labels(layers, stacked_params, treedef)
    groups: dict = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    out = _graft_groups(leaves, a, c, tuple(tuple(g) for g in groups.values()), num_bins, round_decimals, exclusive_max)
    return jax.tree.unflatten(treedef, out)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _graft_groups(leaves, a, c, groups, num_bins, round_decimals, exclusive_max):
    k = leaves[0].shape[0]
    entropy = jax.vmap(lambda v: weight_entropy(v, num_bins, exclusive_max=exclusive_max))
    out = list(leaves)
    for idx in groups:
        values = jnp.concatenate([jnp.reshape(_utils.to_compute(leaves[i]), (k, -1)) for i in idx], axis=1)
        h = entropy(values)  # (K,)
        alpha = grafting_coefficient(h, jnp.roll(h, 1), a, c, round_decimals=round_decimals)
        for i in idx:
            w = _utils.to_compute(leaves[i])
            al = jnp.reshape(alpha, (k,) + (1,) * (w.ndim - 1)).astype(w.dtype)
            out[i] = (al * w + (1 - al) * jnp.roll(w, 1, axis=0)).astype(leaves[i].dtype)
    return out


def grafting_learning_rates(learning_rate: float, num_networks: int) -> np.ndarray:
    r"""The official code's learning-rate diversity (``difflr``): network ``i = 1..K`` uses
    ``learning_rate * (1 + cos(pi (K - i) / K)) / 2``.

    Use the result as the per-network learning rate of a vmapped
    ``optax.inject_hyperparams`` optimizer inside :func:`filter_grafting` (set
    ``opt_state.inner_state.hyperparams["learning_rate"]`` after ``init``).

    Args:
      learning_rate: the base rate ``>= 0``.
      num_networks: ``K >= 1``.

    Returns:
      A float32 numpy array of shape ``(K,)``.

    Examples:
      With :math:`K = 4`: :math:`0.1\,(1 + \cos(\pi (4 - i)/4))/2` for
      :math:`i = 1..4`, i.e. :math:`\cos = -0.7071, 0, 0.7071, 1`.

      >>> import sam_optax
      >>> rates = sam_optax.averaging.grafting_learning_rates(0.1, 4)
      >>> print([round(float(x), 4) for x in rates])
      [0.0146, 0.05, 0.0854, 0.1]
    """
    _utils.check_range("learning_rate", learning_rate, low=0.0)
    _common.check_int("num_networks", num_networks, low=1)
    i = np.arange(1, num_networks + 1)
    return (learning_rate * (1 + np.cos(np.pi * (num_networks - i) / num_networks)) / 2).astype(np.float32)


class GraftingState(NamedTuple):
    """State of :func:`filter_grafting`.

    Attributes:
      count: number of updates so far.
      inner_state: the inner optimizer's state, stacked over the K networks.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.
    inner_state: optax.OptState


def filter_grafting(
    inner: optax.GradientTransformation,
    every: int,
    a: float = 0.4,
    c: float = 500.0,
    num_bins: int = 10,
    *,
    layers: Layers = None,
    round_decimals: int | None = None,
    exclusive_max: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Trains K networks stacked on a leading axis and ring-grafts them every ``every`` steps.

    ``params`` and gradients carry a leading axis of size K, and so do the extra
    arguments meant per network (e.g. ``perturbed_grads`` from a vmapped
    :func:`sam_optax.sharpness_aware_grad`): an extra argument whose leaves are all
    arrays with leading axis K is split over the networks, any other (a callable,
    a scalar) is passed to every network as it is. Each network has its own copy of the inner optimizer's state
    (``jax.vmap(inner.init)``) and is updated by ``jax.vmap(inner.update)``; after
    every ``every``-th step the new weights of all networks are replaced by
    :func:`graft` of them (optimizer states are not touched, as in the official
    code). ``every`` = steps per epoch grafts once per epoch, as the paper.

    Give the networks different data orders (and, as the official code's
    ``difflr``, different learning rates: :func:`grafting_learning_rates`) so
    that they diverge; with identical networks grafting is the identity.

    Args:
      inner: the per-network optimizer (any; SAM-family rules included).
      every: grafting period in steps, ``>= 1``.
      a: :math:`A` (default 0.4).
      c: :math:`c` (default 500).
      num_bins: histogram bins (default 10).
      layers: layer grouping, see :func:`graft`.
      round_decimals: see :func:`graft` (``None``: the paper's formula).
      exclusive_max: see :func:`weight_entropy`.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      The two networks of :func:`graft`'s example with zero gradients, grafted
      every 2 steps: unchanged after step 1, grafted after step 2.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.averaging.filter_grafting(optax.sgd(0.1), every=2, c=1e6, num_bins=4)
      >>> w = jnp.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
      >>> state = tx.init(w)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.zeros_like(w), state, w)
      ...     w = optax.apply_updates(w, updates)
      ...     print([round(float(x), 4) for x in w[0]])
      [0.0, 1.0, 2.0, 3.0]
      [0.3, 1.0, 1.7, 2.4]

    References:
      Meng et al, `Filter Grafting for Deep Neural Networks
      <https://arxiv.org/abs/2001.05868>`_, CVPR 2020
    """
    _utils.check_transformation("inner", inner)
    _common.check_int("every", every, low=1)
    _utils.check_range("a", a, low=0.0, high=1.0)
    _utils.check_range("c", c, low=0.0)
    _common.check_int("num_bins", num_bins, low=1)
    if round_decimals is not None:
        _common.check_int("round_decimals", round_decimals, low=0, high=38)
    if not isinstance(exclusive_max, bool):
        raise ValueError(f"exclusive_max must be a bool, got {exclusive_max!r}.")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return GraftingState(count=jnp.zeros([], jnp.int32), inner_state=jax.vmap(inner.init)(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(_common.NO_PARAMS.format(name="filter_grafting"))
        k = jax.tree.leaves(params)[0].shape[0]

        def stacked(value):  # every leaf an array with the networks' leading axis
            leaves = jax.tree.leaves(value)
            return bool(leaves) and all(
                isinstance(x, (jax.Array, np.ndarray)) and x.ndim >= 1 and x.shape[0] == k for x in leaves
            )

        mapped = {name: v for name, v in extra_args.items() if stacked(v)}
        static = {name: v for name, v in extra_args.items() if not stacked(v)}

        def one(u, s, p, kw):
            return inner.update(u, s, p, **kw, **static)

        updates, inner_state = jax.vmap(one)(updates, state.inner_state, params, mapped)
        count = optax.safe_increment(state.count)

        def grafted():
            new = optax.apply_updates(params, updates)
            new = graft(new, a, c, num_bins, layers=layers, round_decimals=round_decimals, exclusive_max=exclusive_max)
            return jax.tree.map(
                lambda n, p, u: (_utils.to_compute(n) - _utils.to_compute(p)).astype(u.dtype),
                new,
                params,
                updates,
            )

        updates = jax.lax.cond(count % every == 0, grafted, lambda: updates)
        return updates, GraftingState(count, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
