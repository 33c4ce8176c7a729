"""Curvature metrics of the loss: Hessian-vector products and what they give.

Everything here works on the Hessian of the *mean* loss over a batch, over
several stacked batches (:func:`stack_batches`) and over the devices of a mesh
axis (``axis_name``, inside ``jax.shard_map`` / ``jax.pmap``), by matrix-free
Hessian-vector products (forward-over-reverse differentiation). The parameters
may be any pytree; the iterations run on its flattened (at least float32) copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from sam_optax import _utils
from sam_optax.data import _shards

AxisName = str | Sequence[str] | None

# Lanczos declares an invariant subspace found (and restarts from a vector
# orthogonal to the basis) when the new residual is below this fraction
# of the largest |alpha| + beta seen so far.
_BREAKDOWN_TOL = 1e-4


class Batches(NamedTuple):
    """Several equally shaped batches stacked on a new leading axis.

    Every metric of :mod:`sam_optax.metrics` given a ``Batches`` uses the Hessian
    (or sharpness) of the mean loss over them, computed one batch at a time in a
    ``lax.scan`` (the activations of one batch are live at a time; the stacked
    data are on the device). Build it with :func:`stack_batches`.

    Attributes:
      stacked: a batch pytree whose leaves have shape ``[num_batches, ...]``.
    """

    stacked: Any


def stack_batches(batches: Iterable[Any]) -> Batches:
    """Stacks an iterable of equally shaped batches (e.g. a data iterator) into a
    :class:`Batches`; the metrics then average over them.

    Args:
      batches: an iterable (list, generator) of batch pytrees with the same
        structure and leaf shapes; drop a smaller last batch first.

    Returns:
      A :class:`Batches`.

    Examples:
      The loss of :func:`hessian_vector_product`'s example scales with the batch
      mean; batches of means 1 and 3 give the Hessian :math:`2\\,\\mathrm{diag}(4, 2, 1)`:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> batches = sam_optax.metrics.stack_batches([jnp.ones(4), jnp.full(4, 3.0)])
      >>> print(batches.stacked.shape)
      (2, 4)
      >>> v = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> hv = sam_optax.metrics.hessian_vector_product(loss_fn, w, v, batches)
      >>> print(float(hv["a"]), hv["b"].tolist())
      8.0 [4.0, 2.0]
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch, got an empty iterable.")
    first = jax.tree.structure(batches[0])
    shapes = [np.shape(x) for x in jax.tree.leaves(batches[0])]
    for i, b in enumerate(batches[1:], 1):
        # (mypy) jaxlib ships no stubs: PyTreeDef is unresolved
        if jax.tree.structure(b) != first or [np.shape(x) for x in jax.tree.leaves(b)] != shapes:  # type: ignore[operator]
            raise ValueError(
                f"batches must all have the structure and leaf shapes of the first one {shapes}; "
                f"batch {i} has {[np.shape(x) for x in jax.tree.leaves(b)]} (drop a smaller last batch)."
            )
    return Batches(jax.tree.map(lambda *xs: jnp.stack(xs), *batches))


class PowerIterationResult(NamedTuple):
    """What :func:`power_iteration` returns.

    Attributes:
      eigenvalue: the Rayleigh quotient :math:`v^\\top H v` of ``eigenvector``:
        the estimate of the Hessian eigenvalue of largest magnitude.
      eigenvector: the unit vector :math:`v` (a pytree like ``params``, float32).
      iterations: the number of Hessian-vector products made.
      converged: whether the relative change of the estimate fell below ``tol``
        within ``max_iterations``.
      residual: :math:`\\lVert H v - \\lambda v \\rVert_2` (zero for an exact
        eigenpair; it bounds the distance from ``eigenvalue`` to the spectrum).
    """

    eigenvalue: jax.Array
    eigenvector: optax.Updates
    iterations: jax.Array
    converged: jax.Array
    residual: jax.Array


class LanczosResult(NamedTuple):
    """What :func:`lanczos` returns.

    Attributes:
      ritz_values: eigenvalues of the tridiagonal matrix :math:`T`, ascending
        (shape ``[num_steps]``); its extreme ones converge to the extreme Hessian
        eigenvalues, and with ``num_steps`` equal to the number of parameters they
        are the whole spectrum.
      weights: squared first components of :math:`T`'s eigenvectors, summing to 1:
        the Gauss quadrature weights of the spectral measure seen from the start
        vector (:math:`\\sum_i w_i f(\\theta_i) \\approx v_0^\\top f(H) v_0`).
      alphas: the diagonal of :math:`T`.
      betas: its off-diagonal (``betas[j]`` couples steps ``j`` and ``j + 1``;
        the last entry is the final residual norm, not part of :math:`T`).
    """

    ritz_values: jax.Array
    weights: jax.Array
    alphas: jax.Array
    betas: jax.Array


class SpectralDensity(NamedTuple):
    """What :func:`spectral_density` returns.

    Attributes:
      grid: the points :math:`t` where the density is evaluated.
      density: the Gaussian-smoothed density :math:`\\phi_\\sigma(t)` on ``grid``
        (integrates to 1 over the real line).
      ritz_values: Ritz values of each run, ``[num_runs, num_steps]``.
      weights: their quadrature weights, ``[num_runs, num_steps]``.
      sigma: the standard deviation of the Gaussian kernel used.
    """

    grid: jax.Array
    density: jax.Array
    ritz_values: jax.Array
    weights: jax.Array
    sigma: jax.Array


class TraceEstimate(NamedTuple):
    """What :func:`hutchinson_trace` returns.

    Attributes:
      trace: the mean of :math:`z^\\top H z` over the probes.
      stderr: its standard error (sample standard deviation over
        :math:`\\sqrt{N}`).
      num_probes: :math:`N` (an int32 array).
    """

    trace: jax.Array
    stderr: jax.Array
    num_probes: jax.Array


class EigenvalueRatio(NamedTuple):
    """What :func:`eigenvalue_ratio` returns.

    Attributes:
      lambda_max: the largest Hessian eigenvalue.
      lambda_k: the ``k``-th largest.
      ratio: ``lambda_max / lambda_k``.
    """

    lambda_max: jax.Array
    lambda_k: jax.Array
    ratio: jax.Array


# --------------------------------------------------------------------------
# The flattened Hessian-vector product every metric is built on.
# --------------------------------------------------------------------------


def _scalar_loss(loss_fn: Callable, has_aux: bool) -> Callable:
    def f(params, batch):
        out = loss_fn(params, batch)
        return out[0] if has_aux else out

    return f


def _flat_problem(loss_fn, params, batch, has_aux, axis_name):
    """``(flat_params, unravel, hvp)`` with ``hvp(v) = H v`` on flat float32 vectors.

    ``H`` is the Hessian of the mean loss over the stacked batches and the
    devices of ``axis_name``. Inside ``shard_map`` the params are cast to
    device-varying first, so that each device differentiates its local loss
    (with replicated, invariant params ``jax.grad`` would already sum over the
    devices); the local products are then ``pmean``-ed once.
    """
    f = _scalar_loss(loss_fn, has_aux)
    flat, unravel = ravel_pytree(_utils.to_compute(params))
    axes = _shards.axis_tuple(axis_name)

    def local_hvp(p, v, b):
        grad = jax.grad(lambda q: f(unravel(q), b))
        return jax.jvp(grad, (p,), (v,))[1]

    def hvp(v):
        p = _shards.as_device_varying(flat, axes)
        v = _shards.as_device_varying(v, axes)
        if isinstance(batch, Batches):
            num = _shards.batch_size(batch.stacked)

            def body(acc, b):
                return acc + local_hvp(p, v, b), None

            zeros = _shards.zeros_varying_like(jax.ShapeDtypeStruct(p.shape, p.dtype), p)
            total, _ = jax.lax.scan(body, zeros, batch.stacked)
            out = total / num
        else:
            out = local_hvp(p, v, batch)
        return _shards.shard_mean(out, axes)

    return flat, unravel, hvp


def _unit(v: jax.Array) -> jax.Array:
    n = jnp.linalg.norm(v)
    return v / jnp.where(n > 0, n, 1.0)


def _start_vector(key, flat, init_vector):
    if init_vector is not None:
        v, _ = ravel_pytree(_utils.to_compute(init_vector))
        if v.shape != flat.shape:
            raise ValueError(
                f"init_vector must have the structure and sizes of params ({flat.size} entries), got {v.size} entries."
            )
        return _unit(v.astype(flat.dtype))
    return _unit(jax.random.normal(key, flat.shape, flat.dtype))


def _check_key(key):
    if key is None:
        raise ValueError("key must be a jax PRNG key (jax.random.key(0) or PRNGKey(0)), got None.")


def _num_params(params) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))


@functools.partial(jax.jit, static_argnames=("loss_fn", "has_aux", "axis_name"))
def _hvp_jit(loss_fn, params, vector, batch, has_aux, axis_name):
    _, unravel, hvp = _flat_problem(loss_fn, params, batch, has_aux, axis_name)
    v, _ = ravel_pytree(_utils.to_compute(vector))
    return unravel(hvp(v))


def hessian_vector_product(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    vector: optax.Updates,
    batch: Any,
    *,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> optax.Updates:
    r"""Hessian-vector product of the loss, by forward-over-reverse differentiation.

    .. math::

      H v = \frac{\partial}{\partial t} \nabla L(w + t v) \Big|_{t=0}
      \quad\text{(a JVP of the gradient: one forward and one backward pass)}

    where :math:`L` is the mean loss over ``batch`` (over every batch of a
    :class:`Batches`, and over the devices of ``axis_name``).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``; the aux is ignored). Keep the same function object between
        calls: it is a static argument of the compiled function.
      params: the point :math:`w`, any pytree of float arrays.
      vector: :math:`v`, a pytree like ``params``.
      batch: one batch, or a :class:`Batches` (the Hessian of the mean loss over
        them).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s) over which the batch is sharded, when called
        inside ``jax.shard_map`` / ``jax.pmap``: the product is ``pmean``-ed over
        them (each device differentiating its local loss).

    Returns:
      :math:`H v` as a pytree like ``params`` (at least float32).

    Examples:
      A quadratic with Hessian :math:`\mathrm{diag}(4, 2, 1)` (``a`` first, then
      ``b``), so :math:`H (1, 1, 1) = (4, 2, 1)`:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> v = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> hv = sam_optax.metrics.hessian_vector_product(loss_fn, w, v, jnp.ones(8))
      >>> print(float(hv["a"]), hv["b"].tolist())
      4.0 [2.0, 1.0]

    References:
      Pearlmutter, `Fast Exact Multiplication by the Hessian
      <https://doi.org/10.1162/neco.1994.6.1.147>`_, 1994
    """
    return _hvp_jit(loss_fn, params, vector, batch, has_aux, _axis_key(axis_name))


def _axis_key(axis_name):
    return axis_name if axis_name is None or isinstance(axis_name, str) else tuple(axis_name)


# --------------------------------------------------------------------------
# Power iteration.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "has_aux", "axis_name"))
def _power_jit(loss_fn, params, batch, key, init_vector, tol, max_iterations, has_aux, axis_name):
    flat, unravel, hvp = _flat_problem(loss_fn, params, batch, has_aux, axis_name)
    v0 = _start_vector(key, flat, init_vector)
    zero = jnp.zeros((), flat.dtype)

    def cond(c):
        k, _, _, _, _, _, done = c
        return jnp.logical_and(jnp.logical_not(done), k < max_iterations)

    def body(c):
        k, v, lam, _, _, _, _ = c
        w = hvp(v)
        lam_new = jnp.vdot(v, w)
        res = jnp.linalg.norm(w - lam_new * v)
        done = jnp.logical_and(k >= 1, jnp.abs(lam_new - lam) <= tol * jnp.abs(lam_new))
        nw = jnp.linalg.norm(w)
        v_next = jnp.where(nw > 0, w / jnp.where(nw > 0, nw, 1.0), v)
        return k + 1, v_next, lam_new, res, v, zero, done

    init = (jnp.zeros((), jnp.int32), v0, zero, zero, v0, zero, jnp.zeros((), bool))
    k, _, lam, res, v, _, done = jax.lax.while_loop(cond, body, init)
    return PowerIterationResult(eigenvalue=lam, eigenvector=unravel(v), iterations=k, converged=done, residual=res)


def power_iteration(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    *,
    key: jax.Array,
    tol: float = 1e-4,
    max_iterations: int = 100,
    init_vector: optax.Updates | None = None,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> PowerIterationResult:
    r"""Hessian eigenvalue of largest magnitude by power iteration.

    .. math::

      w_k = H v_k, \quad \lambda_k = v_k^\top w_k, \quad
      v_{k+1} = \frac{w_k}{\lVert w_k \rVert_2}

    stopping at the first :math:`k \ge 1` with
    :math:`|\lambda_k - \lambda_{k-1}| \le \mathrm{tol}\,|\lambda_k|` (the
    criterion of PyHessian) or after ``max_iterations`` products. It converges
    at rate :math:`|\lambda_2 / \lambda_1|` to the eigenvalue of largest
    *magnitude* (the top eigenvalue at a minimum, where the Hessian is nearly
    positive semi-definite). The whole loop is one compiled ``lax.while_loop``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``). A static argument: keep the same function object.
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches` (Hessian of the mean loss over them).
      key: PRNG key of the random (Gaussian) start vector.
      tol: relative tolerance on the change of the estimate, ``> 0``.
      max_iterations: the most Hessian-vector products, ``>= 1``.
      init_vector: optional start vector (a pytree like ``params``) instead of a
        random one.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s) the batch is sharded over, inside
        ``jax.shard_map`` / ``jax.pmap`` (see :func:`hessian_vector_product`).

    Returns:
      A :class:`PowerIterationResult` (eigenvalue, eigenvector, iterations,
      converged, residual).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax import metrics
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 1, 1)
      ...   return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + jnp.sum(w["b"] ** 2))
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> res = metrics.power_iteration(loss_fn, w, jnp.ones(8), key=jax.random.PRNGKey(0), tol=1e-6)
      >>> print(f"{res.eigenvalue:.4f}", bool(res.converged))
      4.0000 True

    References:
      Yao et al, `PyHessian: Neural Networks Through the Lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020

      Yue et al, `Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
      Regularization Term <https://arxiv.org/abs/2305.15817>`_, 2023 (Table 9)
    """
    _utils.check_range("tol", tol, low=0.0, low_inclusive=False)
    _utils.check_positive_int("max_iterations", max_iterations)
    if init_vector is None:
        _check_key(key)
    else:
        key = jax.random.PRNGKey(0) if key is None else key
    return _power_jit(
        loss_fn,
        params,
        batch,
        key,
        init_vector,
        jnp.asarray(tol, jnp.float32),
        jnp.asarray(max_iterations, jnp.int32),
        has_aux,
        _axis_key(axis_name),
    )


# --------------------------------------------------------------------------
# Lanczos: top-k eigenvalues, spectral density.
# --------------------------------------------------------------------------


def _lanczos_flat(hvp, v0, num_steps):
    """``num_steps`` Lanczos steps with full reorthogonalization, on flat vectors."""
    n = v0.shape[0]
    dtype = v0.dtype

    def orthogonalize(w, basis):
        for _ in range(2):  # "twice is enough" (Kahan-Parlett)
            w = w - basis.T @ (basis @ w)
        return w

    def body(j, c):
        basis, alphas, betas, v, v_prev, beta_prev, scale = c
        basis = basis.at[j].set(v)
        w = hvp(v)
        alpha = jnp.vdot(v, w)
        w = orthogonalize(w - alpha * v - beta_prev * v_prev, basis)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        breakdown = beta <= _BREAKDOWN_TOL * scale
        # Invariant subspace found: continue from the coordinate vector e_i least
        # represented in the basis (its component orthogonal to the basis has
        # squared norm >= 1/n, since the projections of all e_i sum to dim < n).
        # T becomes block diagonal; its eigenvalues stay Ritz values.
        i = jnp.argmin(jnp.sum(jnp.square(basis), axis=0))
        r = _unit(orthogonalize(jax.nn.one_hot(i, n, dtype=dtype), basis))
        v_next = jnp.where(breakdown, r, w / jnp.where(breakdown, 1.0, beta))
        beta = jnp.where(breakdown, jnp.zeros((), dtype), beta)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next, v, beta, scale

    zero = jnp.zeros((), dtype)
    init = (
        jnp.zeros((num_steps, n), dtype),
        jnp.zeros((num_steps,), dtype),
        jnp.zeros((num_steps,), dtype),
        v0,
        jnp.zeros_like(v0),
        zero,
        zero,
    )
    _, alphas, betas, *_ = jax.lax.fori_loop(0, num_steps, body, init)
    off = betas[:-1]
    tri = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    ritz, vecs = jnp.linalg.eigh(tri, symmetrize_input=False)
    return LanczosResult(ritz_values=ritz, weights=jnp.square(vecs[0]), alphas=alphas, betas=betas)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "has_aux", "axis_name"))
def _lanczos_jit(loss_fn, params, batch, key, init_vector, num_steps, has_aux, axis_name):
    flat, _, hvp = _flat_problem(loss_fn, params, batch, has_aux, axis_name)
    return _lanczos_flat(hvp, _start_vector(key, flat, init_vector), num_steps)


def _check_num_steps(num_steps, params):
    _utils.check_positive_int("num_steps", num_steps)
    n = _num_params(params)
    if num_steps > n:
        raise ValueError(f"num_steps must be in [1, {n}] (the number of parameters), got {num_steps}.")


def lanczos(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    *,
    key: jax.Array,
    num_steps: int,
    init_vector: optax.Updates | None = None,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> LanczosResult:
    r"""The Lanczos tridiagonalization of the Hessian from a random start vector.

    From a unit :math:`v_0`, ``num_steps`` steps build an orthonormal basis
    :math:`V` of the Krylov space and the tridiagonal :math:`T = V^\top H V`:

    .. math::

      \alpha_j = v_j^\top H v_j, \quad
      \beta_j v_{j+1} = H v_j - \alpha_j v_j - \beta_{j-1} v_{j-1}

    with full reorthogonalization against :math:`V` (so the Ritz values do not
    repeat in floating point). The eigenvalues :math:`\theta_i` of :math:`T`
    (Ritz values) approximate the extreme Hessian eigenvalues first; the squared
    first components :math:`w_i` of its eigenvectors are the weights of the Gauss
    quadrature :math:`v_0^\top f(H) v_0 \approx \sum_i w_i f(\theta_i)`
    (stochastic Lanczos quadrature). If the Krylov space is exhausted the
    iteration continues from a coordinate vector orthogonalized against
    :math:`V` (:math:`T` becomes block diagonal), so with
    ``num_steps`` equal to the number of parameters the Ritz values are the
    exact spectrum. Memory: ``num_steps`` vectors of the size of ``params``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``). A static argument: keep the same function object.
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches`.
      key: PRNG key of the (Gaussian) start vector.
      num_steps: number of Lanczos steps (Hessian-vector products), in
        ``[1, number of parameters]``.
      init_vector: optional start vector (a pytree like ``params``).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s) the batch is sharded over, inside
        ``jax.shard_map`` / ``jax.pmap``.

    Returns:
      A :class:`LanczosResult` (ascending Ritz values, quadrature weights, and
      the diagonals of :math:`T`).

    Examples:
      Three steps on the Hessian :math:`\mathrm{diag}(4, 2, 1)` (3 parameters)
      give its whole spectrum, and the weights sum to 1:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> res = sam_optax.metrics.lanczos(loss_fn, w, jnp.ones(8), key=jax.random.PRNGKey(0), num_steps=3)
      >>> print([round(float(x), 4) for x in res.ritz_values], round(float(res.weights.sum()), 4))
      [1.0, 2.0, 4.0] 1.0

    References:
      Ghorbani et al, `An Investigation into Neural Net Optimization via Hessian
      Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, 2019

      Golub and Meurant, `Matrices, Moments and Quadrature
      <https://doi.org/10.1515/9781400833887>`_, 2010
    """
    _check_key(key)
    _check_num_steps(num_steps, params)
    return _lanczos_jit(loss_fn, params, batch, key, init_vector, num_steps, has_aux, _axis_key(axis_name))


def top_k_eigenvalues(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    k: int,
    *,
    key: jax.Array,
    num_steps: int | None = None,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> jax.Array:
    r"""The ``k`` largest Hessian eigenvalues, as the top Ritz values of :func:`lanczos`.

    .. math::

      \lambda_1 \ge \dots \ge \lambda_k \approx
      \theta_{s}, \dots, \theta_{s-k+1} \quad (\theta\ \text{the ascending Ritz
      values of}\ s\ \text{Lanczos steps})

    Exact when ``num_steps`` is the number of parameters; the extreme Ritz
    values converge first, so a few tens of steps usually suffice for a
    network (Ghorbani et al. use 90).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches`.
      k: how many eigenvalues, in ``[1, num_steps]``.
      key: PRNG key of the start vector.
      num_steps: Lanczos steps, in ``[k, number of parameters]``; default
        ``min(max(2 k, 20), number of parameters)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s) the batch is sharded over, inside
        ``jax.shard_map`` / ``jax.pmap``.

    Returns:
      The ``k`` largest Ritz values, descending, shape ``[k]``.

    Examples:
      The two largest eigenvalues of :math:`\mathrm{diag}(4, 2, 1)`:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> top = sam_optax.metrics.top_k_eigenvalues(loss_fn, w, jnp.ones(8), 2, key=jax.random.PRNGKey(0))
      >>> print([round(float(x), 4) for x in top])
      [4.0, 2.0]

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (section 5.2)
    """
    _utils.check_positive_int("k", k)
    n = _num_params(params)
    if num_steps is None:
        num_steps = min(max(2 * k, 20), n)
    _check_num_steps(num_steps, params)
    if k > num_steps:
        raise ValueError(f"k must be in [1, num_steps={num_steps}], got {k}.")
    res = lanczos(loss_fn, params, batch, key=key, num_steps=num_steps, has_aux=has_aux, axis_name=axis_name)
    return res.ritz_values[::-1][:k]


def eigenvalue_ratio(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    *,
    key: jax.Array,
    k: int = 5,
    num_steps: int | None = None,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> EigenvalueRatio:
    r"""The ratio :math:`\lambda_{\max} / \lambda_k` of the Hessian (SAM section 5.2
    reports :math:`\lambda_{\max}` and :math:`\lambda_{\max}/\lambda_5`).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches`.
      key: PRNG key of the Lanczos start vector.
      k: which eigenvalue divides, ``>= 1`` (default 5).
      num_steps: Lanczos steps (see :func:`top_k_eigenvalues`).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s), inside ``jax.shard_map`` / ``jax.pmap``.

    Returns:
      An :class:`EigenvalueRatio` (lambda_max, lambda_k, ratio).

    Examples:
      :math:`\lambda_{\max}/\lambda_3 = 4/1` for :math:`\mathrm{diag}(4, 2, 1)`:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> res = sam_optax.metrics.eigenvalue_ratio(loss_fn, w, jnp.ones(8), key=jax.random.PRNGKey(0), k=3)
      >>> print(round(float(res.lambda_max), 4), round(float(res.lambda_k), 4), round(float(res.ratio), 4))
      4.0 1.0 4.0

    References:
      Foret et al, `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, 2021 (section 5.2)
    """
    top = top_k_eigenvalues(
        loss_fn, params, batch, k, key=key, num_steps=num_steps, has_aux=has_aux, axis_name=axis_name
    )
    return EigenvalueRatio(lambda_max=top[0], lambda_k=top[k - 1], ratio=top[0] / top[k - 1])


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "num_runs", "num_points", "has_aux", "axis_name"))
def _density_jit(loss_fn, params, batch, key, grid, sigma, num_steps, num_runs, num_points, has_aux, axis_name):
    flat, _, hvp = _flat_problem(loss_fn, params, batch, has_aux, axis_name)

    def run(k):
        return _lanczos_flat(hvp, _start_vector(k, flat, None), num_steps)

    res = jax.lax.map(run, jax.random.split(key, num_runs))
    ritz, weights = res.ritz_values, res.weights
    lo, hi = jnp.min(ritz), jnp.max(ritz)
    if sigma is None:
        sigma = jnp.maximum(0.01 * (hi - lo), 1e-6 * jnp.maximum(jnp.abs(lo), jnp.abs(hi)) + 1e-12)
    sigma = jnp.asarray(sigma, flat.dtype)
    if grid is None:
        pad = 0.05 * (hi - lo) + 3.0 * sigma
        grid = jnp.linspace(lo - pad, hi + pad, num_points)
    grid = jnp.asarray(grid, flat.dtype)
    z = (grid[:, None, None] - ritz[None]) / sigma
    kernel = jnp.exp(-0.5 * jnp.square(z)) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    density = jnp.sum(kernel * weights[None], axis=(1, 2)) / num_runs
    return SpectralDensity(grid=grid, density=density, ritz_values=ritz, weights=weights, sigma=sigma)


def spectral_density(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    *,
    key: jax.Array,
    num_steps: int = 90,
    num_runs: int = 1,
    grid: jax.Array | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> SpectralDensity:
    r"""Gaussian-smoothed Hessian eigenvalue density by stochastic Lanczos quadrature.

    .. math::

      \phi_\sigma(t) = \frac{1}{R} \sum_{r=1}^{R} \sum_{i=1}^{s} w_i^{(r)}
      \frac{1}{\sigma\sqrt{2\pi}} \exp\!\Big(-\frac{(t - \theta_i^{(r)})^2}{2\sigma^2}\Big)

    where :math:`(\theta^{(r)}, w^{(r)})` are the Ritz values and quadrature
    weights of :func:`lanczos` from the :math:`r`-th random start
    (:math:`R` = ``num_runs``, :math:`s` = ``num_steps``). In expectation over
    the start vector it is the spectral density
    :math:`\frac{1}{n}\sum_j \mathcal N(t; \lambda_j, \sigma^2)` of the
    :math:`n \times n` Hessian.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches`.
      key: PRNG key of the start vectors.
      num_steps: Lanczos steps per run, in ``[1, number of parameters]``
        (default 90 as Ghorbani et al., capped at the number of parameters).
      num_runs: independent random starts averaged, ``>= 1``.
      grid: points where the density is evaluated; default ``num_points`` evenly
        spaced points covering the Ritz values with a margin.
      num_points: size of the default grid, ``>= 2``.
      sigma: standard deviation of the Gaussian kernel, ``> 0``; default 1% of the
        spread of the Ritz values.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s), inside ``jax.shard_map`` / ``jax.pmap``.

    Returns:
      A :class:`SpectralDensity` (grid, density, ritz_values, weights, sigma).

    Examples:
      On :math:`\mathrm{diag}(4, 2, 1)` with :math:`\sigma = 0.1` the density is
      three narrow Gaussians at 1, 2 and 4 whose weights sum to 1, so its
      integral over :math:`[0, 5]` (step 0.01) is 1:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> grid = jnp.linspace(0.0, 5.0, 501)
      >>> res = sam_optax.metrics.spectral_density(
      ...     loss_fn, w, jnp.ones(8), key=jax.random.PRNGKey(0), num_steps=3, grid=grid, sigma=0.1)
      >>> print([round(float(x), 4) for x in res.ritz_values[0]], round(float(res.density.sum() * 0.01), 4))
      [1.0, 2.0, 4.0] 1.0

    References:
      Ghorbani et al, `An Investigation into Neural Net Optimization via Hessian
      Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, 2019
    """
    _check_key(key)
    num_steps = min(num_steps, _num_params(params)) if isinstance(num_steps, int) else num_steps
    _check_num_steps(num_steps, params)
    _utils.check_positive_int("num_runs", num_runs)
    _utils.check_positive_int("num_points", num_points)
    if num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points}.")
    if sigma is not None:
        _utils.check_range("sigma", sigma, low=0.0, low_inclusive=False)
    return _density_jit(
        loss_fn, params, batch, key, grid, sigma, num_steps, num_runs, num_points, has_aux, _axis_key(axis_name)
    )


# --------------------------------------------------------------------------
# Hutchinson's trace estimator.
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes", "has_aux", "axis_name"))
def _trace_jit(loss_fn, params, batch, key, num_probes, has_aux, axis_name):
    flat, _, hvp = _flat_problem(loss_fn, params, batch, has_aux, axis_name)

    def body(j, c):
        mean, m2 = c
        z = jax.random.rademacher(jax.random.fold_in(key, j), flat.shape, flat.dtype)
        s = jnp.vdot(z, hvp(z))
        delta = s - mean  # Welford's running mean and sum of squared deviations
        mean = mean + delta / (j + 1)
        return mean, m2 + delta * (s - mean)

    zero = jnp.zeros((), flat.dtype)
    mean, m2 = jax.lax.fori_loop(0, num_probes, body, (zero, zero))
    stderr = jnp.sqrt(m2 / (num_probes - 1) / num_probes)
    return mean, stderr


def hutchinson_trace(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batch: Any,
    *,
    key: jax.Array,
    num_probes: int = 100,
    has_aux: bool = False,
    axis_name: AxisName = None,
) -> TraceEstimate:
    r"""Hessian trace by Hutchinson's estimator with Rademacher probes.

    .. math::

      \operatorname{tr}(H) \approx \frac{1}{N} \sum_{i=1}^{N} z_i^\top H z_i,
      \qquad z_i \in \{-1, +1\}^n \ \text{uniform}

    unbiased, with variance :math:`2 \sum_{j \ne l} H_{jl}^2 / N` (exact for a
    diagonal Hessian). The probes run one after the other (one
    Hessian-vector product each) in a ``fori_loop``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)``).
      params: the point :math:`w`, any pytree of float arrays.
      batch: one batch, or a :class:`Batches`.
      key: PRNG key of the probes.
      num_probes: :math:`N`, ``>= 2`` (for the standard error).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      axis_name: mesh axis name(s), inside ``jax.shard_map`` / ``jax.pmap``.

    Returns:
      A :class:`TraceEstimate` (trace, stderr, num_probes).

    Examples:
      For a diagonal Hessian every probe gives :math:`z^\top H z = \mathrm{tr}(H)`
      exactly (:math:`z_j^2 = 1`): :math:`4 + 2 + 1 = 7` with standard error 0.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> def loss_fn(w, batch):  # Hessian: mean(batch) * diag(4, 2, 1)
      ...     return 0.5 * jnp.mean(batch) * (4.0 * w["a"] ** 2 + 2.0 * w["b"][0] ** 2 + w["b"][1] ** 2)
      >>> w = {"a": jnp.array(1.0), "b": jnp.ones(2)}
      >>> res = sam_optax.metrics.hutchinson_trace(loss_fn, w, jnp.ones(8), key=jax.random.PRNGKey(0), num_probes=10)
      >>> print(round(float(res.trace), 4), round(float(res.stderr), 4), int(res.num_probes))
      7.0 0.0 10

    References:
      Hutchinson, `A Stochastic Estimator of the Trace of the Influence Matrix for
      Laplacian Smoothing Splines <https://doi.org/10.1080/03610918908812806>`_, 1989

      Yao et al, `PyHessian: Neural Networks Through the Lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020
    """
    _check_key(key)
    _utils.check_positive_int("num_probes", num_probes)
    if num_probes < 2:
        raise ValueError(f"num_probes must be an integer >= 2, got {num_probes}.")
    trace, stderr = _trace_jit(loss_fn, params, batch, key, num_probes, has_aux, _axis_key(axis_name))
    return TraceEstimate(trace=trace, stderr=stderr, num_probes=jnp.asarray(num_probes, jnp.int32))
