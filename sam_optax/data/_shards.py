"""The data axis: splitting a batch into m-sharpness shards, and averaging over them.

A *shard* is a disjoint group of ``m`` examples that computes its own
perturbation (SAM section 5.1). Shards live on two levels that compose:

* **devices**: under ``jax.shard_map`` / ``jax.pmap`` (a named mesh axis), each
  device's local batch is one shard or is split further;
* **chunks**: inside one device the local batch is reshaped to ``[C, m, ...]``
  and the two-pass body is ``vmap``-ed (or ``scan``-ned) over ``C``.

Results are averaged over the chunks of a device (:func:`chunk_mean`), then
over devices with ``lax.pmean`` (:func:`shard_mean`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

def batch_size(batch: Any) -> int:
    """Leading dimension shared by every leaf of ``batch``; ValueError otherwise."""
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in jax.tree.leaves(batch)}
    if not sizes:
        raise ValueError("batch has no array leaves: nothing to split into shards.")
    if -1 in sizes or len(sizes) != 1:
        shapes = [np.shape(x) for x in jax.tree.leaves(batch)]
        raise ValueError(
            f"every leaf of batch must have the same leading (batch) dimension; got shapes {shapes}."
        )
    return sizes.pop()


def num_chunks(local_batch: int, m: int | None, *, where: str = "batch") -> int:
    """Number of m-sharpness chunks in a local batch; ValueError if not divisible."""
    if m is None:
        return 1
    if local_batch % m:
        raise ValueError(
            f"m={m} must divide the {where} size {local_batch} "
            f"(each shard of m examples computes its own perturbation)."
        )
    return local_batch // m


def split(batch: Any, num: int) -> Any:
    """Reshapes every leaf ``[B, ...] -> [num, B // num, ...]`` (contiguous shards)."""
    return jax.tree.map(lambda x: x.reshape((num, x.shape[0] // num) + x.shape[1:]), batch)


def axis_tuple(axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    return tuple(axis_name)


def manual_axes() -> tuple[str, ...]:
    """Mesh axes that are manual here (inside ``shard_map`` or ``pmap``)."""
    try:
        return tuple(jax.sharding.get_abstract_mesh().manual_axes)
    except Exception:  # pragma: no cover - outside any mesh context
        return ()


def as_device_varying(tree: Any, axis_names: Sequence[str]) -> Any:
    """Marks replicated values as varying over the manual axes in ``axis_names``.

    Inside ``jax.shard_map`` with ``check_vma=True``, ``jax.grad`` with respect to
    device-invariant params comes back already summed over the devices, which
    would silently turn per-device m-sharpness into ``n_devices x`` global SAM.
    Casting the params to *varying* first gives each device its own local
    gradient. A no-op outside ``shard_map``/``pmap`` and under ``vmap``.
    """
    manual = set(manual_axes())
    names = tuple(a for a in axis_names if a in manual)
    if not names:
        return tree

    def leaf(x):
        varying = jax.typeof(x).manual_axis_type.varying
        missing = tuple(a for a in names if a not in varying)
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(leaf, tree)


def zeros_varying_like(shapes: Any, like: Any) -> Any:
    """Zeros of ``shapes`` (ShapeDtypeStructs; floats widened to float32), varying
    over the same manual mesh axes as the array ``like``: the initial carry of a
    ``lax.scan`` whose body mixes in values derived from ``like``."""
    varying = tuple(sorted(jax.typeof(like).manual_axis_type.varying))

    def leaf(s):
        dtype = jnp.promote_types(s.dtype, jnp.float32) if jnp.issubdtype(s.dtype, jnp.inexact) else s.dtype
        z = jnp.zeros(s.shape, dtype)
        return jax.lax.pcast(z, varying, to="varying") if varying else z

    return jax.tree.map(leaf, shapes)


def shard_mean(tree: Any, axis_names: Sequence[str]) -> Any:
    """Mean over the shards of the named axes; floating leaves are averaged in
    (at least) float32 and returned in their dtype, other leaves take the max."""
    names = tuple(axis_names)
    if not names:
        return tree

    def leaf(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            for name in names:
                wide = jax.lax.pmean(wide, name)
            return wide.astype(x.dtype)
        for name in names:
            x = jax.lax.pmax(x, name)
        return x

    return jax.tree.map(leaf, tree)


def chunk_mean(stacked: Any) -> Any:
    """Mean over the leading (chunk) axis, in at least float32 for floating leaves
    (returned in their dtype); other leaves take the max.

    The mean is a contraction with a vector of ``1/C`` at the highest matmul
    precision: XLA:CPU runs a reduction over a short leading axis of a wide array
    (``[C, N].mean(0)``) up to 100x slower than this.
    """

    def leaf(x):
        if jnp.issubdtype(x.dtype, jnp.inexact):
            wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
            weights = jnp.full((x.shape[0],), 1.0 / x.shape[0], wide.dtype)
            mean = jnp.tensordot(weights, wide, axes=1, precision=jax.lax.Precision.HIGHEST)
            return mean.astype(x.dtype)
        return jnp.max(x, axis=0)

    return jax.tree.map(leaf, stacked)


def list_mean(results: Any) -> Any:
    """Mean of a list of equally structured pytrees (unrolled adds in at least
    float32 for floating leaves, returned in their dtype); other leaves: max."""

    def leaf(*xs):
        x0 = jnp.asarray(xs[0])
        if jnp.issubdtype(x0.dtype, jnp.inexact):
            wide = jnp.promote_types(x0.dtype, jnp.float32)
            return (sum(jnp.asarray(x, wide) for x in xs) / len(xs)).astype(x0.dtype)
        out = xs[0]
        for x in xs[1:]:
            out = jnp.maximum(out, x)
        return out

    return jax.tree.map(leaf, *results)
