"""Shared by the Linen and NNX helpers: per-shard random keys, a cache of the
two-pass functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sam_optax.data import _shards


def example_index(batch: Any, data: Any) -> jax.Array:
    """Index of every example of the (local) batch in the global batch, ``int32 [B]``.

    It travels with the batch as an extra leaf, so that every m-sharpness shard
    (chunk, device, micro-batch) sees the index of its first example and derives
    its own random key from it. Under ``axis_name`` (inside the user's
    ``shard_map`` / ``pmap``) the local indices are offset by the device's
    position; with ``mesh`` the batch is still global here. ``data``: the
    :class:`~sam_optax.data.DataAxis` (``None``: one shard).
    """
    axes = () if data is None else data.axis_name
    if not axes and (data is None or not data.splits_batch):
        return jnp.zeros((1,), jnp.int32)  # one shard: any batch pytree, first example 0
    size = _shards.batch_size(batch)
    index = jnp.arange(size, dtype=jnp.int32)
    if axes and data.mesh is None:
        index = index + size * jax.lax.axis_index(axes).astype(jnp.int32)
    return index


def shard_key(key: jax.Array, index: jax.Array) -> jax.Array:
    """The key of a shard: ``fold_in(key, index of its first example)``."""
    return jax.random.fold_in(key, index[0])


def cached(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Memoizes ``builder(*hashable_args)`` so that the jitted two-pass function
    (and hence its compilation) is made once per geometry / graph."""
    cache: dict = {}

    def get(*args):
        if args not in cache:
            if len(cache) >= 16:  # bounded: geometries made afresh in a loop
                cache.pop(next(iter(cache)))
            cache[args] = builder(*args)
        return cache[args]

    return get


def placing(jitted: Callable[..., Any], mesh: Any, params_of: Callable[[Any], Any]) -> Callable[..., Any]:
    """``jitted(state, ...)``, with a ``state`` not yet on ``mesh`` first placed
    where the step leaves it (:func:`sam_optax.distributed.place`, parameter-shaped
    leaves like ``params_of(state)``): the step then compiles once. A state
    already on the mesh (every step's output) passes through untouched."""
    from sam_optax import distributed

    def run(state, *args, **kwargs):
        if not distributed.is_placed(state, mesh):
            state = distributed.place(state, mesh, like=params_of(state))
        return jitted(state, *args, **kwargs)

    for name in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):
        if hasattr(jitted, name):
            setattr(run, name, getattr(jitted, name))
    # (mypy) an attribute set on a function
    run.__doc__, run.__wrapped__ = jitted.__doc__, jitted  # type: ignore[attr-defined]
    return run


def jit_with_flag(step: Callable[..., Any], jit: Callable[..., Any] = jax.jit, **jit_kwargs: Any) -> Callable[..., Any]:
    """``step(..., second_pass=...)`` jitted (by ``jit``: ``jax.jit`` or ``nnx.jit``):
    ``"auto"``, ``True`` and ``False`` are static (each compiles once; a literal
    ``False`` compiles the one-pass program), a boolean array is traced (one
    program with the ``lax.cond``)."""
    static = jit(step, static_argnames=("second_pass",), **jit_kwargs)
    traced = jit(step, **jit_kwargs)

    used: dict = {}  # the jitted functions called (jax shares one cache size between two jits of a function)

    def run(*args: Any, second_pass: Any = "auto", **kwargs: Any) -> Any:
        literal = isinstance(second_pass, (bool, str)) or second_pass is None
        jitted = static if literal else traced
        used[literal] = jitted
        return jitted(*args, second_pass=second_pass, **kwargs)

    if hasattr(static, "_cache_size"):
        run._cache_size = lambda: sum(f._cache_size() for f in used.values())  # type: ignore[attr-defined]
    for name in ("lower", "trace", "eval_shape"):
        if hasattr(static, name):
            setattr(run, name, getattr(static, name))
    run.__doc__, run.__wrapped__ = step.__doc__, step  # type: ignore[attr-defined]
    return run
