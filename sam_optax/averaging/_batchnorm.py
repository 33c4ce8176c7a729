"""BatchNorm statistics recomputed for averaged weights (the SWA code's ``bn_update``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax import _utils
from sam_optax.averaging import _common

VARIANCES = ("batch_average", "total")


def _flax(what: str):
    """``flax`` with ``flax.linen`` and ``flax.nnx`` loaded; without it an ImportError that names the extra."""
    try:
        import flax.linen  # noqa: F401
        import flax.nnx  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{what} needs Flax, an optional dependency ({e}): pip install sam-optax[flax]") from e
    import flax

    return flax


def _default_batch_size(batch: Any) -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ValueError("cannot read the batch size from this batch: pass batch_size=.")
    return int(jnp.shape(leaves[0])[0])


def _check_variance(variance: str) -> None:
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}.")


class _Accumulator:
    """Sample-weighted cumulative average of per-batch (mean, var) pairs.

    ``bn_update`` sets each BatchNorm's momentum to ``b / (n + b)`` (``n`` examples
    seen so far): the running statistic becomes the average of the per-batch
    statistics weighted by batch size. With ``variance="total"`` the second moment
    ``var + mean**2`` is averaged instead, giving the variance over all examples.
    """

    def __init__(self, variance: str):
        self.variance = variance
        self.seen = 0
        self.acc: list | None = None

    def add(self, means: list, variances: list, size: int) -> None:
        if size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {size}.")
        if self.variance == "total":
            variances = [v + m * m for m, v in zip(means, variances)]
        self.seen += size
        w = jnp.asarray(size / self.seen, _utils.hyper_dtype())
        new = list(means) + list(variances)
        if self.acc is None:
            self.acc = new
        else:
            self.acc = _common.interpolate(self.acc, new, w, jnp.asarray(True))

    def result(self) -> tuple[list, list]:
        if self.acc is None:
            raise ValueError("batches is empty: BatchNorm statistics need at least one batch.")
        k = len(self.acc) // 2
        means, second = self.acc[:k], self.acc[k:]
        if self.variance == "total":
            second = [jnp.maximum(s - m * m, 0.0) for m, s in zip(means, second)]
        return means, second


def recompute_batch_stats(
    forward: Callable[[Any, Any], tuple[Any, Any]],
    variables: Any,
    batches: Iterable[Any],
    *,
    variance: str = "batch_average",
    batch_size: Callable[[Any], int] | None = None,
) -> Any:
    r"""Flax Linen: BatchNorm statistics of (averaged) weights over an iterable of batches.

    The equivalent of the SWA code's ``bn_update`` (reset the statistics, set each
    BatchNorm's momentum to ``b / (n + b)``, one pass over the data in train
    mode): for every ``flax.linen.BatchNorm`` layer, with :math:`\mu_j, \sigma^2_j`
    the statistics of batch :math:`j` (size :math:`b_j`) as the layer computes them
    in train mode,

    .. math::

      \text{mean} = \frac{\sum_j b_j \mu_j}{\sum_j b_j},\qquad
      \text{var} = \frac{\sum_j b_j \sigma_j^2}{\sum_j b_j}\ \ (\texttt{"batch\_average"})
      \quad\text{or}\quad
      \frac{\sum_j b_j(\sigma_j^2 + \mu_j^2)}{\sum_j b_j} - \text{mean}^2\ \ (\texttt{"total"}).

    For equal-size batches the mean is the exact mean of the layer's inputs over
    all the data. Flax stores the *biased* batch variance (divided by the batch
    size; PyTorch stores the unbiased one): ``"batch_average"`` (the default,
    ``bn_update``'s semantics) is the average of the per-batch biased variances,
    ``"total"`` the biased variance over all the examples (it also counts the
    spread of the batch means). Statistics of deeper layers are those of the
    network as it runs in train mode (each layer normalized by batch statistics).

    The per-batch statistics are recovered to float rounding: the pass starts from
    zero statistics, so a layer returns ``(1 - momentum) * batch_stat``, divided here
    by ``(1 - momentum)`` (the momenta are read from the modules with
    ``flax.linen.intercept_methods``). Each BatchNorm module must run once per
    forward pass and have ``momentum < 1``.

    Args:
      forward: ``forward(variables, batch) -> (output, mutated)`` running the model
        in train mode with ``mutable=["batch_stats"]``, e.g.
        ``lambda v, b: model.apply(v, b["x"], train=True, mutable=["batch_stats"])``.
      variables: ``{"params": averaged_params, "batch_stats": any_stats, ...}``; the
        values of ``batch_stats`` are ignored (only their structure and dtypes).
      batches: an iterable of batches (e.g. one epoch of training data).
      variance: ``"batch_average"`` or ``"total"`` (see above).
      batch_size: ``batch -> int``; default: the leading size of the batch's
        first leaf.

    Returns:
      The new ``batch_stats`` collection, in the dtypes of the given one.

    Examples:
      Two batches :math:`(1, 3)` and :math:`(5, 7)` of one feature: batch means 2
      and 6, biased batch variances 1 and 1; so mean 4 and ``"batch_average"``
      variance 1 (``"total"`` would give :math:`(1 + 9 + 25 + 49)/4 - 4^2 = 5`).

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import sam_optax
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train):
      ...         return nn.BatchNorm(use_running_average=not train)(x)
      >>> net = Net()
      >>> variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)), train=False)
      >>> forward = lambda v, b: net.apply(v, b, train=True, mutable=["batch_stats"])
      >>> batches = [jnp.array([[1.0], [3.0]]), jnp.array([[5.0], [7.0]])]
      >>> stats = sam_optax.averaging.recompute_batch_stats(forward, variables, batches)
      >>> print(float(stats["BatchNorm_0"]["mean"][0]), float(stats["BatchNorm_0"]["var"][0]))
      4.0 1.0

    References:
      Izmailov et al, `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018
    """
    nn = _flax("recompute_batch_stats").linen

    _check_variance(variance)
    size_of = batch_size or _default_batch_size
    template = variables["batch_stats"]
    if not jax.tree.leaves(template):
        return template
    zeros = jax.tree.map(jnp.zeros_like, template)
    with_zeros = {**variables, "batch_stats": zeros}
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("batches is empty: BatchNorm statistics need at least one batch.") from None

    momenta: dict = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            momenta[tuple(context.module.path)] = float(context.module.momentum)
        return next_fun(*args, **kwargs)

    # The interceptor runs only while forward is traced: a fresh closure (eval_shape caches by
    # function) with jit disabled (a jitted forward would reuse its own trace) traces it anew.
    with nn.intercept_methods(interceptor), jax.disable_jit():
        jax.eval_shape(lambda v, b: forward(v, b), with_zeros, first)

    def module_path(path):
        return tuple(str(getattr(k, "key", k)) for k in path[:-1])

    for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        m = momenta.get(module_path(path))
        if m is None:
            raise ValueError(
                f"batch_stats entry {jax.tree_util.keystr(path)} is not written by a "
                "flax.linen.BatchNorm during forward(variables, batch)."
            )
        if not m < 1.0:
            raise ValueError(f"BatchNorm at {module_path(path)} has momentum {m}: must be < 1.")

    @jax.jit
    def batch_statistics(variables, batch):
        _, mutated = forward(variables, batch)
        return jax.tree_util.tree_map_with_path(
            lambda p, s: _utils.to_compute(s) / (1 - momenta[module_path(p)]), mutated["batch_stats"]
        )

    template_leaves = jax.tree.leaves(template)
    acc = _Accumulator(variance)
    for batch in _chain(first, iterator):
        flat, treedef = jax.tree_util.tree_flatten_with_path(batch_statistics(with_zeros, batch))
        pairs = _mean_var_pairs([p for p, _ in flat], module_path)
        acc.add([flat[i][1] for i, _ in pairs], [flat[j][1] for _, j in pairs], size_of(batch))
    means, variances = acc.result()
    leaves: list[Any] = [None] * len(flat)
    for (i, j), m, v in zip(pairs, means, variances):
        leaves[i], leaves[j] = m, v
    leaves = [x.astype(t.dtype) for x, t in zip(leaves, template_leaves)]
    return jax.tree.unflatten(treedef, leaves)


def _mean_var_pairs(paths: list, module_path: Callable) -> list[tuple[int, int]]:
    """``[(index of mean, index of var), ...]``, one pair per BatchNorm module."""
    index: dict = {}
    for i, path in enumerate(paths):
        index.setdefault(module_path(path), {})[str(getattr(path[-1], "key", path[-1]))] = i
    for module, entries in index.items():
        if set(entries) != {"mean", "var"}:
            raise ValueError(f"batch_stats of {module} has entries {sorted(entries)}: expected exactly mean and var.")
    return [(e["mean"], e["var"]) for e in index.values()]


def _chain(first, rest):
    yield first
    yield from rest


def recompute_batch_stats_nnx(
    model: Any,
    batches: Iterable[Any],
    forward: Callable[[Any, Any], Any] | None = None,
    *,
    variance: str = "batch_average",
    batch_size: Callable[[Any], int] | None = None,
) -> Any:
    r"""Flax NNX: recompute every ``nnx.BatchNorm``'s ``mean`` / ``var`` in place over batches.

    Same statistics as :func:`recompute_batch_stats` (see there for the formulas
    and ``variance``). Each ``nnx.BatchNorm`` of ``model`` is switched to train
    mode with momentum 0 for the pass (so after each batch it holds exactly that
    batch's statistics), then its momentum and ``use_running_average`` are
    restored and its ``mean`` / ``var`` set to the cumulative averages. Only the
    BatchNorm layers change mode: other layers (e.g. ``nnx.Dropout``) run as
    ``forward`` runs them. Put the averaged weights into the model first, e.g.
    ``nnx.update(model, swa_params(opt_state))``.

    Args:
      model: an ``nnx.Module`` (modified in place).
      batches: an iterable of batches.
      forward: ``forward(model, batch)`` calling the model (default
        ``model(batch)``); it must not pass ``use_running_average=True``.
      variance: ``"batch_average"`` (``bn_update``'s) or ``"total"``.
      batch_size: ``batch -> int``; default: the leading size of the first leaf.

    Returns:
      ``model``.

    Examples:
      The batches of :func:`recompute_batch_stats`' example (mean 4, variance 1),
      written into the model:

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import sam_optax
      >>> model = nnx.BatchNorm(1, rngs=nnx.Rngs(0))
      >>> batches = [jnp.array([[1.0], [3.0]]), jnp.array([[5.0], [7.0]])]
      >>> model = sam_optax.averaging.recompute_batch_stats_nnx(model, batches)
      >>> print(float(model.mean[...][0]), float(model.var[...][0]))
      4.0 1.0

    References:
      Izmailov et al, `Averaging Weights Leads to Wider Optima and Better
      Generalization <https://arxiv.org/abs/1803.05407>`_, 2018
    """
    nnx = _flax("recompute_batch_stats_nnx").nnx

    _check_variance(variance)
    size_of = batch_size or _default_batch_size
    call = forward or (lambda m, b: m(b))

    def batch_norms(m):
        return [mod for _, mod in nnx.iter_modules(m) if isinstance(mod, nnx.BatchNorm)]

    layers = batch_norms(model)
    if not layers:
        return model

    @nnx.jit
    def batch_statistics(m, batch):
        call(m, batch)
        bns = batch_norms(m)
        return [_utils.to_compute(b.mean[...]) for b in bns], [_utils.to_compute(b.var[...]) for b in bns]

    saved = [(bn.momentum, bn.use_running_average) for bn in layers]
    acc = _Accumulator(variance)
    try:
        for bn in layers:
            bn.momentum = 0.0
            bn.use_running_average = False
        for batch in batches:
            means, variances = batch_statistics(model, batch)
            acc.add(means, variances, size_of(batch))
    finally:
        for bn, (momentum, use_running_average) in zip(layers, saved):
            bn.momentum = momentum
            bn.use_running_average = use_running_average
    means, variances = acc.result()
    for bn, m, v in zip(layers, means, variances):
        bn.mean[...] = m.astype(bn.mean[...].dtype)
        bn.var[...] = v.astype(bn.var[...].dtype)
    return model
