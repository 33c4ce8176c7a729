"""The data axis as a value: which examples share a perturbation, which enter the second pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from sam_optax import _utils
from sam_optax.data._selection import DataSelection

CHUNK_MODES = ("auto", "vmap", "unroll", "scan")


@dataclasses.dataclass(frozen=True)
class DataAxis:
    """How :func:`sam_optax.sharpness_aware_grad` lays the batch out (see :func:`shards`).

    Attributes:
      m: m-sharpness shard size (``None``: one shard per device).
      axis_name: the mesh axes of the devices, a tuple (empty: one device).
      mesh: the mesh the function maps itself over (``None``: the caller's
        ``shard_map`` / ``pmap``, or no devices).
      chunk_mode: ``'auto'`` (default), ``'vmap'``, ``'unroll'`` or ``'scan'``.
      microbatch_size: size of the micro-batches each pass accumulates over.
      selection: the second-pass data selection (e.g. ESAM's SDS), or ``None``.

    Examples:
      >>> import sam_optax
      >>> data = sam_optax.data.shards()
      >>> print(data.m, data.axis_name, data.chunk_mode, data.splits_batch)
      None () auto False
      >>> print(sam_optax.data.shards(4).splits_batch)  # shards of 4 examples split the batch
      True
    """

    m: int | None = None
    axis_name: tuple[str, ...] = ()
    mesh: jax.sharding.Mesh | None = None
    chunk_mode: str = "auto"
    microbatch_size: int | None = None
    selection: DataSelection | None = None

    @property
    def splits_batch(self) -> bool:
        """Whether the batch must be a pytree of arrays sharing a leading example axis."""
        return (
            self.m is not None
            or self.mesh is not None
            or self.microbatch_size is not None
            or self.selection is not None
        )


def _axis_tuple(axis_name: str | Sequence[str] | None) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else ()
    if not names or not all(isinstance(a, str) for a in names):
        raise ValueError(f"axis_name must be a string or a non-empty sequence of strings, got {axis_name!r}.")
    return names


def _mesh_axes(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {mesh!r}.")
    if not axes:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"axis_name is required with a mesh of several axes {mesh.axis_names}.")
        axes = tuple(mesh.axis_names)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"axis_name {unknown} not in the mesh axes {mesh.axis_names}.")
    return axes


def shards(
    m: int | None = None,
    *,
    axis_name: str | Sequence[str] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    chunk_mode: str = "auto",
    microbatch_size: int | None = None,
    selection: DataSelection | None = None,
) -> DataAxis:
    r"""The data axis of sharpness-aware training: m-sharpness shards and data selection.

    Every shard :math:`S` (a disjoint group of ``m`` examples) makes its own
    perturbation :math:`\epsilon_S` from its own gradient, and the gradients are
    averaged over the shards (SAM section 5.1). Shards live on two levels that
    compose:

    * **chunks** inside a device: ``m`` smaller than the local batch reshapes it
      to ``[B // m, m, ...]`` and runs the two passes per chunk, ``vmap``-ed
      (``chunk_mode='vmap'``: batched matmuls / grouped convolutions), unrolled
      in the program (``'unroll'``: one ordinary pass per chunk; compile time
      grows with the number of chunks) or in a ``lax.scan`` (``'scan'``: the
      memory of one chunk). All three give the same result. ``'auto'`` (the
      default) picks one when the program is traced: ``'unroll'`` on CPU when
      the loss has a convolution (XLA:CPU runs batched-kernel convolutions on a
      slow path) and there are at most 32 chunks, else ``'vmap'``.
    * **devices**: inside your own ``jax.shard_map`` / ``jax.pmap``, pass the
      mapped ``axis_name`` (each device perturbs with its local gradient, the
      results are ``pmean``-ed); or pass ``mesh=`` and the function maps itself
      over ``axis_name`` (default: the mesh's only axis) with ``jax.shard_map``,
      manual over those axes only, so parameters sharded over the other mesh
      axes (tensor parallel, FSDP) stay sharded.

    ``shards()`` (the default) is one shard: exactly SAM's gradient, and the
    batch may then be any pytree (e.g. a graph with nodes and edges of
    different lengths). Splitting the batch needs leaves sharing a leading
    example axis.

    Args:
      m: shard size, an integer ``>= 1`` dividing the local batch; ``None``: one
        shard per device.
      axis_name: mesh axis name(s) of the devices (inside your ``shard_map`` /
        ``pmap``, or of ``mesh``).
      mesh: a ``jax.sharding.Mesh``, Auto or Explicit axes: the function runs
        itself under ``jax.shard_map`` with the batch split over ``axis_name``.
      chunk_mode: ``'auto'``, ``'vmap'``, ``'unroll'`` or ``'scan'`` (see above).
      microbatch_size: each pass over a shard is accumulated over micro-batches
        of this size (a divisor of the shard size); the shard still shares one
        perturbation made from its full gradient.
      selection: which examples of a shard enter the second pass, e.g.
        :func:`sam_optax.data.sharpness_sensitive` (ESAM's SDS; ``loss_fn`` must
        then return per-example losses). Not combinable with ``microbatch_size``.

    Returns:
      A :class:`DataAxis`, the ``data`` argument of
      :func:`sam_optax.sharpness_aware_grad`.

    Examples:
      >>> import sam_optax
      >>> data = sam_optax.data.shards(16, chunk_mode="scan")
      >>> data.m, data.chunk_mode
      (16, 'scan')
    """
    _utils.check_positive_int("m", m, allow_none=True)
    _utils.check_positive_int("microbatch_size", microbatch_size, allow_none=True)
    if chunk_mode not in CHUNK_MODES:
        raise ValueError(f"chunk_mode must be 'auto', 'vmap', 'unroll' or 'scan', got {chunk_mode!r}.")
    axes = _axis_tuple(axis_name)
    if mesh is not None:
        axes = _mesh_axes(mesh, axes)
    if selection is not None:
        if not isinstance(selection, DataSelection):
            raise ValueError(f"selection must come from sam_optax.data.sharpness_sensitive, got {selection!r}.")
        if microbatch_size is not None:
            raise ValueError("selection and microbatch_size cannot be combined.")
        if selection.fraction >= 1.0:
            selection = None  # gamma = 1 keeps every example: plain SAM, no extra pass
    return DataAxis(m, axes, mesh, chunk_mode, microbatch_size, selection)
