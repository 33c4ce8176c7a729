r"""(Adaptive) random weight perturbation at 1x cost: the gradient at :math:`w+\epsilon` only.

ARWP (Li et al., TMLR 2024; official ``nblt/mARWP``, ``utils.py`` class
``ARWP`` driven by ``train_rwp_cos.py``) replaces SAM's ascent step by a
filter-wise Gaussian perturbation, so one step needs one gradient pass: sample
:math:`\epsilon`, take :math:`\tilde g = \nabla L_B(w+\epsilon)`, give it to the
base optimizer at :math:`w`. With ``eta=0`` it is the non-adaptive RWP noise.

Flax layouts: the filter (output unit) is the **last** axis of a kernel
(Dense ``[in, out]``, Conv ``[kh, kw, in, out]``), PyTorch's first; the norms
are taken over every other axis.

References:
  Li, Tao, Yan, Lei, Wu, Fang, He, Huang, `Revisiting Random Weight
  Perturbation for Efficiently Improving Generalization
  <https://arxiv.org/abs/2404.00357>`_, TMLR 2024;
  Li et al, `Efficient Generalization Improvement Guided by Random Weight
  Perturbation <https://arxiv.org/abs/2211.11489>`_, 2022.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

_ROW_EPS = 1e-16  # the official code's (std + 1e-16) and (||w|| + 1e-16)


class RWPState(NamedTuple):
    """State of the random weight perturbation.

    Attributes:
      count: number of steps so far (a ``sigma`` schedule is evaluated at it).
      key: the PRNG key of the next draw (split every step).
      fisher: :math:`F`, the accumulated squared perturbed gradients (zeros at
        init; ``None`` when not adaptive).
    """

    count: jax.Array  # type: ignore[assignment]  # field shadows tuple.count, as in optax
    key: jax.Array
    fisher: optax.Updates | None


class RWPTrainState(NamedTuple):
    """State of :func:`rwp_step`: the base optimizer's and the perturbation's."""

    opt_state: optax.OptState
    rwp: RWPState


def rwp_sigma_schedule(sigma: float, inc: float, total_steps: int) -> optax.Schedule:
    r"""The official cosine ramp of :math:`\sigma` (``train_rwp_cos.py``, ``CosineInc``).

    .. math:: \sigma_t = \sigma_0\,\bigl(1 + \mathrm{inc}\,(1 - \cos(\pi t / T))/2\bigr)

    from :math:`\sigma_0` at step 0 to :math:`\sigma_0(1+\mathrm{inc})` at
    :math:`t = T` (the official script: ``std=0.001, inc=10``, :math:`T` the
    total number of steps).

    Examples:
      >>> f = rwp_sigma_schedule(0.001, 10.0, 100)
      >>> [round(float(f(t)), 6) for t in (0, 50, 100)]
      [0.001, 0.006, 0.011]
    """
    _utils.check_range("sigma", sigma, low=0.0)
    _utils.check_range("inc", inc, low=0.0)
    _utils.check_positive_int("total_steps", total_steps)

    def schedule(count):
        t = jnp.asarray(count, _utils.hyper_dtype())
        return sigma * (1 + inc * (1 - jnp.cos(jnp.pi * t / total_steps)) / 2)

    return schedule


def rwp_init(params: optax.Params, key: jax.Array, *, adaptive: bool = True) -> RWPState:
    """The initial :class:`RWPState` of :func:`rwp_grad`.

    Args:
      params: the weights (for the shapes of :math:`F`).
      key: the PRNG key of the first draw (replicate it on every device).
      adaptive: keep :math:`F` (zeros, at least float32, one copy of the params);
        ``False`` saves that memory for ``eta=0`` (``rwp_grad`` raises if
        ``eta > 0`` meets a state without :math:`F`).

    Returns:
      ``RWPState(count=0, key=key, fisher=zeros or None)``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import sam_optax
      >>> params = {"w": jnp.ones(2)}
      >>> state = sam_optax.one_pass.rwp_init(params, jax.random.PRNGKey(0))
      >>> print(int(state.count), [float(x) for x in state.fisher["w"]])
      0 [0.0, 0.0]
      >>> print(sam_optax.one_pass.rwp_init(params, jax.random.PRNGKey(0), adaptive=False).fisher)
      None
    """
    fisher = None
    if adaptive:
        fisher = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _utils.compute_dtype(p)), params)
    return RWPState(count=jnp.zeros([], jnp.int32), key=key, fisher=fisher)


def _filter_sum(x: jax.Array) -> jax.Array:
    """Sum over every axis but the last (kept), for ndim >= 2; the whole array otherwise."""
    if x.ndim >= 2:
        return jnp.sum(x, axis=tuple(range(x.ndim - 1)), keepdims=True)
    return jnp.sum(x)


def _leaf_noise(p, key, sigma, fisher, eta):
    p32 = _utils.to_compute(p)
    z = jax.random.normal(key, p32.shape, p32.dtype)
    if p32.ndim >= 2:
        std = (sigma + _ROW_EPS) * jnp.sqrt(_filter_sum(p32 * p32))
    else:
        std = sigma * (jnp.sqrt(jnp.sum(p32 * p32)) + _ROW_EPS)
    eps = z * std.astype(p32.dtype)
    if fisher is not None:
        f_bar = _filter_sum(fisher) if p32.ndim >= 2 else fisher
        eps = eps / jnp.sqrt(1 + eta * f_bar).astype(p32.dtype)
    return eps


def rwp_noise(
    params: optax.Params, key: jax.Array, sigma: Any, fisher: optax.Updates | None = None, eta: Any = 0.0
) -> optax.Updates:
    r"""The (adaptive) filter-wise Gaussian perturbation :math:`\epsilon` (official ``ARWP.first_step``).

    For a leaf with ``ndim >= 2`` and filter (last-axis) index :math:`i`,
    :math:`\epsilon_{\cdot i} \sim \mathcal N\bigl(0, ((\sigma + 10^{-16})
    \lVert W_{\cdot i}\rVert_2)^2 I\bigr)`, the norm over every other axis,
    not divided by the filter size; for 1-D and 0-D leaves
    :math:`\epsilon \sim \mathcal N(0, (\sigma(\lVert w\rVert_2 + 10^{-16}))^2 I)`,
    the whole leaf's norm. Adaptive: :math:`\epsilon \leftarrow
    \epsilon/\sqrt{1 + \eta \bar F}` with :math:`\bar F` the filter sum of
    :math:`F` broadcast over the filter (``ndim >= 2``), :math:`F` itself
    otherwise. The norms are at the current (unperturbed) weights. Every leaf
    gets its own key (``jax.random.split(key, n_leaves)``).

    Args:
      params: the weights :math:`w`.
      key: a PRNG key.
      sigma: :math:`\sigma \ge 0` (a number or a 0-d array).
      fisher: :math:`F` (a tree like ``params``) or ``None`` (no scaling).
      eta: :math:`\eta \ge 0`.

    Returns:
      :math:`\epsilon`, a tree like ``params`` in at least float32.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"b": jnp.ones(3), "k": jnp.ones((10000, 2)) * jnp.array([1.0, 100.0])}
      >>> eps = rwp_noise(params, jax.random.PRNGKey(0), 0.0)   # sigma = 0
      >>> float(jnp.abs(eps["b"]).max())
      0.0
      >>> eps = rwp_noise(params, jax.random.PRNGKey(0), 0.1)   # filter norms 100 and 10000
      >>> [round(float(x), 1) for x in eps["k"].std(axis=0) / jnp.array([10.0, 1000.0])]
      [1.0, 1.0]
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = list(jax.random.split(key, max(len(leaves), 1)))[: len(leaves)]
    # (mypy) jaxlib ships no stubs: PyTreeDef is unresolved
    fishers = [None] * len(leaves) if fisher is None else treedef.flatten_up_to(fisher)  # type: ignore[attr-defined]
    sigma = jnp.asarray(sigma)
    noise = [_leaf_noise(p, k, sigma, f, eta) for p, k, f in zip(leaves, keys, fishers)]
    return jax.tree.unflatten(treedef, noise)


def rwp_grad(
    loss_fn: Callable[..., Any],
    sigma: _utils.ScalarOrSchedule = 0.01,
    eta: float = 1.0,
    beta: float = 0.9,
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, optax.Updates, RWPState]]:
    r"""The ARWP gradient at :math:`w+\epsilon` only (1 pass), and the new perturbation state.

    Returns ``grad_fn(params, state, *args) -> (value, grads, new_state)`` with
    (official ``ARWP.first_step`` / ``second_step``)

    .. math::

      \epsilon &\sim \texttt{rwp\_noise}(w, \sigma_t, F, \eta), \qquad
      \tilde g = \nabla_w L_B(w + \epsilon) \\
      F &\leftarrow \beta F + \tilde g \odot \tilde g
          \quad (\text{no } 1-\beta;\ F_0 = 0, \text{ so step 1 is not scaled})

    ``value`` is the loss at :math:`w+\epsilon` (``(loss, aux)`` with
    ``has_aux``). The params are never modified (the perturbation is removed
    exactly); give ``grads`` to any optax optimizer at :math:`w`, whose weight
    decay then acts at :math:`w` and stays out of :math:`F` (as in the official
    code, where the decay is inside ``torch.optim.SGD``). ``state`` comes from
    :func:`rwp_init` (``adaptive=False`` for ``eta=0``).

    Cost: 1 gradient pass. Memory: :math:`\epsilon` (transient) and :math:`F`
    (one copy of the params, adaptive only).

    Args:
      loss_fn: ``loss_fn(params, *args)`` (``-> (loss, aux)`` with ``has_aux``).
      sigma: :math:`\sigma \ge 0`, number or schedule of the step count, e.g.
        :func:`rwp_sigma_schedule` (official class default 0.01).
      eta: :math:`\eta \ge 0`, adaptive strength; 0 is plain RWP (official 1).
      beta: :math:`\beta \in [0, 1]` (official 0.9).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, x: jnp.sum((x @ p["k"]) ** 2)
      >>> params = {"k": jnp.ones((2, 3))}
      >>> grad_fn = rwp_grad(loss, sigma=0.0)
      >>> state = rwp_init(params, jax.random.PRNGKey(0))
      >>> value, grads, state = grad_fn(params, state, jnp.ones((1, 2)))
      >>> float(value), int(state.count)   # sigma = 0: the clean loss
      (12.0, 1)

    References:
      Li et al, `Revisiting Random Weight Perturbation for Efficiently
      Improving Generalization <https://arxiv.org/abs/2404.00357>`_, TMLR 2024
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
    _utils.check_range("sigma", sigma, low=0.0, allow_schedule=True)
    _utils.check_range("eta", eta, low=0.0)
    _utils.check_range("beta", beta, low=0.0, high=1.0)

    def grad_fn(params, state, *args, **kwargs):
        if not isinstance(state, RWPState):
            raise ValueError(f"state must be an RWPState (from rwp_init), got {type(state).__name__}.")
        if state.fisher is None and not _is_zero(eta):
            raise ValueError(
                f"state has no Fisher accumulator (rwp_init(adaptive=False)) but eta={eta!r} > 0: "
                "use rwp_init(params, key) (adaptive=True) or eta=0."
            )
        key, sub = jax.random.split(state.key)
        sigma_t = _utils.value_at(sigma, state.count)
        eps = jax.lax.stop_gradient(rwp_noise(params, sub, sigma_t, state.fisher, eta))
        perturbed = _utils.add_perturbation(params, eps)
        value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(perturbed, *args, **kwargs)
        fisher = state.fisher
        if fisher is not None:
            fisher = jax.tree.map(
                lambda f, g: beta * f + jnp.square(_utils.to_compute(g)).astype(f.dtype), fisher, grads
            )
        return value, grads, RWPState(count=optax.safe_increment(state.count), key=key, fisher=fisher)

    return grad_fn


def _is_zero(value: Any) -> bool:
    """Whether a (validated) hyperparameter is a concrete 0 (a tracer is not)."""
    return _utils.real_scalar("eta", value) == 0


def rwp_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    sigma: _utils.ScalarOrSchedule = 0.01,
    eta: float = 1.0,
    beta: float = 0.9,
    *,
    has_aux: bool = False,
) -> tuple[Callable[..., RWPTrainState], Callable[..., tuple[optax.Params, RWPTrainState, Any]]]:
    r"""``(init, step)`` for ARWP at 1x cost with any optax base optimizer ``tx``.

    ``init(params, key) -> RWPTrainState``; ``step(params, state, *args) ->
    (params, state, (loss, aux))`` (``plain_step``'s shape): the gradient of
    :func:`rwp_grad` at :math:`w+\epsilon`, then ``tx`` at :math:`w`:
    :math:`w \leftarrow w + \mathrm{tx}(\tilde g, w)`. Jit the step; one
    gradient pass. ``eta=0`` keeps no :math:`F`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> loss = lambda p, x: jnp.mean((x @ p["k"]) ** 2)
      >>> init, step = rwp_step(loss, optax.sgd(0.1), sigma=0.01)
      >>> params = {"k": jnp.ones((2, 3))}
      >>> state = init(params, jax.random.PRNGKey(0))
      >>> params, state, (loss_value, _) = jax.jit(step)(params, state, jnp.ones((4, 2)))
      >>> int(state.rwp.count)
      1
    """
    _utils.check_transformation("tx", tx)
    grad_fn = rwp_grad(loss_fn, sigma, eta, beta, has_aux=has_aux)
    adaptive = not _is_zero(eta)

    def init(params, key):
        return RWPTrainState(opt_state=tx.init(params), rwp=rwp_init(params, key, adaptive=adaptive))

    def step(params, state, *args, **kwargs):
        value, grads, rwp = grad_fn(params, state.rwp, *args, **kwargs)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        loss, aux = value if has_aux else (value, None)
        return optax.apply_updates(params, updates), RWPTrainState(opt_state, rwp), (loss, aux)

    return init, step
