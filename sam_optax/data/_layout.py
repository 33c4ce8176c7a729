"""Chunk layouts inside one device: running a per-shard function over ``[C, m, ...]`` chunks.

Every layout returns the mean over the chunks of the floating leaves (in at
least float32, returned in their dtype) and the max of the other leaves
(counters, flags), so ``'vmap'``, ``'unroll'``, ``'scan'`` and micro-batch
accumulation agree on every leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jax_core

from sam_optax.data import _shards


def _lowest(dtype: Any) -> Any:
    """The identity of ``max`` for a non-floating dtype."""
    if dtype == jnp.bool_:
        return False
    return jnp.iinfo(dtype).min


def _accumulate(total: jax.Array, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return total + x.astype(total.dtype)
    return jnp.maximum(total, x)


def _initial(shapes: Any, like: jax.Array) -> Any:
    """The carry of a running mean/max: zeros (floats, widened) or the lowest value."""
    zeros = _shards.zeros_varying_like(shapes, like)
    return jax.tree.map(
        lambda z, s: z if jnp.issubdtype(s.dtype, jnp.inexact) else jnp.full_like(z, _lowest(s.dtype)),
        zeros,
        shapes,
    )


def _finish(total: jax.Array, n: int, dtype: Any) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.inexact):
        return (total / n).astype(dtype)
    return total


def scan_mean(fn: Callable[[Any], tuple[Any, Any]], stacked: Any, side: Any, like: jax.Array):
    """``fn(x) -> (result, side)`` over the leading axis of ``stacked`` in a ``lax.scan``
    (memory of one element): the mean (floats) / max (others) of the results and
    the last ``side`` value (``side``: its initial value). ``like``: an array whose
    manual mesh axes the carry must vary over (e.g. a parameter)."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    shapes, _ = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], stacked))

    def step(carry, x):
        res, new_side = fn(x)
        return (jax.tree.map(_accumulate, carry[0], res), new_side), None

    (total, side), _ = jax.lax.scan(step, (_initial(shapes, like), side), stacked)
    return jax.tree.map(lambda t, s: _finish(t, n, s.dtype), total, shapes), side


def _local_chunks(
    body: Callable[[Any], tuple[Any, Any]], batch: Any, n: int, mode: str, state: optax.OptState, like: jax.Array
):
    """``body`` over ``n`` contiguous chunks of ``batch`` (one device's), laid out by ``mode``."""
    if n == 1:
        return body(batch)
    chunks = _shards.split(batch, n)
    if mode == "auto":
        mode = auto_mode(body, chunks)
    if mode == "vmap":
        stacked, new_state = jax.vmap(body, out_axes=(0, None))(chunks)
        return _shards.chunk_mean(stacked), new_state
    if mode == "unroll":
        outs = [body(jax.tree.map(lambda x, i=i: x[i], chunks)) for i in range(n)]
        return _shards.list_mean([o[0] for o in outs]), outs[0][1]
    return scan_mean(body, chunks, state, like)


def _device_chunks(body, batch, n, mode, state, like, axes: tuple[str, ...], groups: int):
    """The ``n`` chunks of a batch whose leading axis is sharded over the mesh
    axes ``axes`` (``groups`` devices): a ``[groups, n // groups, m, ...]`` view,
    ``vmap``-ed over the device axis with ``spmd_axis_name`` and laid out by
    ``mode`` inside each device, so no device needs another's examples (no
    all-gather, no collective-permute); chunk ``i`` is still examples
    ``i*m .. (i+1)*m - 1``."""
    if n % groups:
        size = _shards.batch_size(batch)
        raise ValueError(
            f"m={size // n} chunks would straddle devices: the batch's leading axis is sharded over "
            f"{groups} devices (mesh axes {axes}), so m must divide the per-device batch size {size // groups}."
        )
    view = jax.tree.map(lambda x: x.reshape((groups, x.shape[0] // groups) + x.shape[1:]), batch)
    per_device = lambda b: _local_chunks(body, b, n // groups, mode, state, like)  # noqa: E731
    stacked, new_state = jax.vmap(per_device, out_axes=(0, None), spmd_axis_name=axes or None)(view)
    return _shards.device_mean(stacked), new_state


# The layout 'auto' picks, per backend. XLA:CPU runs a convolution whose kernel
# is batched over chunks (vmap: a grouped convolution) on a slow path, and a
# convolution inside a loop (scan) slower still; one ordinary convolution per
# chunk (unroll) runs at SAM's speed there (benchmarks/results/step_cost_cpu.json).
# Matmul-only models: batched matmuls (vmap) are as fast as unrolled ones and
# compile once. Accelerators: vmap (batched matmuls, grouped convolutions).
MAX_UNROLL = 32  # more chunks than this: 'vmap' (unrolled programs compile too slowly)
_CONVOLUTIONS = ("conv_general_dilated",)


def _primitives(jaxpr: Any) -> set:
    """Names of the primitives of ``jaxpr`` and of every jaxpr nested in it."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def auto_mode(body: Callable[[Any], Any], chunks: Any) -> str:
    """The layout of ``chunk_mode='auto'`` for ``chunks`` (``[n, m, ...]``; a
    trace-time choice, from the backend and the primitives of ``body``):
    ``'unroll'`` on CPU when ``body`` has a convolution and ``n <= MAX_UNROLL``,
    else ``'vmap'``."""
    if jax.default_backend() != "cpu" or _shards.batch_size(chunks) > MAX_UNROLL:
        return "vmap"
    first = lambda c: body(jax.tree.map(lambda x: x[0], c))  # noqa: E731 (sliced in the inner trace only)
    names = _primitives(jax.make_jaxpr(first)(chunks).jaxpr)
    return "unroll" if any(c in names for c in _CONVOLUTIONS) else "vmap"


def over_chunks(
    body: Callable[[Any], tuple[Any, Any]], batch: Any, n: int, mode: str, state: optax.OptState, like: jax.Array
):
    """Runs ``body(shard) -> (result, new_state)`` on ``n`` contiguous chunks of
    ``batch`` laid out by ``mode``; returns ``(chunk mean of result, new_state)``.

    When the batch's leading axis is sharded over devices by ``jit`` (e.g.
    ``P('data')``: visible on Explicit mesh axes, and assumed under
    ``jax.set_mesh`` of an Auto mesh; see :func:`_shards.device_groups`), the
    chunks are first grouped by device (:func:`_device_chunks`). ``new_state`` (the
    geometry's; ``state`` is its value before the step) must not depend on the
    shard's data: one chunk's is returned.
    """
    if n == 1:
        return body(batch)
    axes, groups = _shards.device_groups(batch, n)
    if groups > 1:
        return _device_chunks(body, batch, n, mode, state, like, axes, groups)
    return _local_chunks(body, batch, n, mode, state, like)


def micro_batched(vg: Callable[[Any], Any], shard: Any, microbatch_size: Any, like: jax.Array) -> Any:
    """``vg(shard)`` (``((loss, aux), grads)``), accumulated over micro-batches of
    ``microbatch_size`` examples when given: means of the floating leaves (exact
    for a loss that is a mean over examples), max of the others; only one
    micro-batch's activations are live at a time."""
    if microbatch_size is None:
        return vg(shard)
    size = _shards.batch_size(shard)
    if size == 0:
        raise ValueError(f"the shard has 0 examples: nothing to split into micro-batches of {microbatch_size}.")
    if size % microbatch_size:
        raise ValueError(f"microbatch_size={microbatch_size} must divide the m-sharpness shard size {size}.")
    n = size // microbatch_size
    if n == 1:
        return vg(shard)
    res, _ = scan_mean(lambda mb: (vg(mb), None), _shards.split(shard, n), None, like)
    return res
