"""Lookahead: k fast steps, then the slow weights move a fraction alpha towards them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils
from sam_optax.averaging import _common

MOMENTUM_MODES = ("none", "reset", "pullback")


class LookaheadState(NamedTuple):
    """State of :func:`lookahead` (``sam_optax``'s; not ``optax.LookaheadState``).

    Attributes:
      count: number of fast steps so far.
      slow: the slow weights :math:`\\phi` (a copy of the initial weights at init).
      inner_state: the inner (fast) optimizer's state.
      cached_momentum: for ``momentum="pullback"``, the momentum buffers saved at
        the previous synchronization (zeros at init), as a tuple in the order of
        the selected inner-state leaves; ``None`` otherwise.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax; shape=(), int32.
    slow: optax.Params
    inner_state: optax.OptState
    cached_momentum: tuple | None = None


def _is_momentum_leaf(path, leaf, fields) -> bool:
    names = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)}
    return bool(names & set(fields)) and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)


def momentum_leaves(inner_state: optax.OptState, fields: Sequence[str] = ("trace", "mu")) -> list:
    """The inner-state leaves :func:`lookahead` treats as momentum buffers.

    A leaf is selected when its path goes through a ``NamedTuple`` field named in
    ``fields`` (e.g. ``TraceState.trace`` of ``optax.sgd(momentum=...)`` /
    :func:`sam_optax.decay.sgdw`, ``ScaleByAdamState.mu`` of Adam/AdamW/Lion
    ...), also inside chains, ``optax.inject_hyperparams`` and SAM-family rules.

    Args:
      inner_state: an optimizer state.
      fields: field names.

    Returns:
      ``[(path, leaf), ...]`` of the selected leaves, in flattening order.

    Examples:
      SGD's trace and Adam's first moment are selected (Adam's ``nu`` is not):

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> params = {"w": jnp.zeros(2)}
      >>> for tx in (optax.sgd(0.1, momentum=0.9), optax.adam(0.1)):
      ...     leaves = sam_optax.averaging.momentum_leaves(tx.init(params))
      ...     print([jax.tree_util.keystr(path) for path, _ in leaves])
      ["[0].trace['w']"]
      ["[0].mu['w']"]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(inner_state)
    return [(p, x) for p, x in flat if _is_momentum_leaf(p, x, fields)]


def lookahead(
    inner: optax.GradientTransformation,
    sync_period: int = 5,
    slow_step_size: float = 0.8,
    *,
    momentum: str = "none",
    momentum_fields: Sequence[str] = ("trace", "mu"),
) -> optax.GradientTransformationExtraArgs:
    r"""Lookahead around any optimizer, with the fast weights as the params.

    ``params`` are the fast weights :math:`\theta`; the slow weights :math:`\phi`
    live in the state. Every step is a step of the inner optimizer :math:`A`;
    every ``k``-th step additionally synchronizes:

    .. math::

      \theta &\leftarrow \theta + A(\theta) \\
      \text{every } k \text{ steps:}\quad
      \phi &\leftarrow \phi + \alpha(\theta - \phi),\qquad \theta \leftarrow \phi

    (the returned updates move the fast weights onto the new slow weights). The
    inner optimizer's momentum at a synchronization follows the official PyTorch
    code's ``pullback_momentum``:

    * ``"none"``: left as it is;
    * ``"reset"``: set to zero;
    * ``"pullback"``: :math:`m \leftarrow \alpha m + (1 - \alpha) m_{cached}`, then
      :math:`m_{cached} \leftarrow m`, where :math:`m_{cached}` is the buffer saved
      at the previous synchronization (zeros at first).

      The cache is a copy. (The official code caches a reference to the live
      torch buffer, which SGD then updates in place, so from the second
      synchronization on its ``m_cached`` is the current ``m`` and its pullback
      only scales the momentum by :math:`\alpha(2-\alpha)`; this is the rule as
      the code's comments and the option's name describe it.)

    "Momentum" means the inner-state leaves under a ``NamedTuple`` field named in
    ``momentum_fields`` (default ``trace`` of SGD momentum and ``mu`` of Adam-type
    first moments; see :func:`momentum_leaves`). The official code only handles
    SGD's ``momentum_buffer``; applying it to Adam's ``mu`` is our extension, and
    second moments are never touched.

    **Which to use:** this one when the inner optimizer needs extra arguments (a
    SAM-family rule: ``lookahead(sam_optax.sam(optax.sgd(0.1, momentum=0.9)))``
    called with ``perturbed_grads=``; ``optax.lookahead`` rejects extra
    arguments), when the model code expects plain params, or for the momentum
    options. ``optax.lookahead`` (params are ``LookaheadParams(fast, slow)``) when
    the slow weights must travel with the params, or to reset the *whole* inner
    state at a synchronization (``reset_state=True``). With ``momentum="none"`` the
    two give the same trajectory (tested). Read the slow weights (evaluate on
    them, as the official README recommends) with :func:`lookahead_slow_params`.
    ``lookahead`` must be the last transformation.

    Args:
      inner: the fast optimizer :math:`A`, e.g. a SAM-family rule.
      sync_period: :math:`k \ge 1` (official default 5; the paper uses 5 or 10).
      slow_step_size: :math:`\alpha \in [0, 1]` (official default 0.8; the paper
        also uses 0.5). ``k = 1, alpha = 1`` is the inner optimizer (with
        ``momentum="none"`` or ``"pullback"``; ``"reset"`` zeroes the momentum
        at every step then).
      momentum: ``"none"``, ``"reset"`` or ``"pullback"``.
      momentum_fields: names of the inner-state fields holding momentum.

    Returns:
      The corresponding :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from sam_optax import averaging
      >>> tx = averaging.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.5)
      >>> w = jnp.zeros(2)
      >>> state = tx.init(w)
      >>> for _ in range(4):  # fast: -1, -2 -> sync: slow -1, fast -1; then -2, -3 -> slow -2
      ...     u, state = tx.update(jnp.ones(2), state, w)
      ...     w = optax.apply_updates(w, u)
      >>> print(w, averaging.lookahead_slow_params(state))
      [-2. -2.] [-2. -2.]

    References:
      Zhang et al, `Lookahead Optimizer: k steps forward, 1 step back
      <https://arxiv.org/abs/1907.08610>`_, 2019
    """
    _utils.check_transformation("inner", inner)
    _common.check_int("sync_period", sync_period, low=1)
    _utils.check_range("slow_step_size", slow_step_size, low=0.0, high=1.0)
    if not isinstance(momentum, str) or momentum not in MOMENTUM_MODES:
        raise ValueError(f"momentum must be one of {MOMENTUM_MODES}, got {momentum!r}.")
    if not isinstance(momentum_fields, (list, tuple)) or not all(isinstance(f, str) for f in momentum_fields):
        raise ValueError(f"momentum_fields must be a list or tuple of field names, got {momentum_fields!r}.")
    fields = tuple(momentum_fields)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        inner_state = inner.init(params)
        cached = None
        if momentum != "none":
            selected = momentum_leaves(inner_state, fields)
            if not selected:
                raise ValueError(
                    f"momentum={momentum!r} needs momentum buffers in the inner optimizer's "
                    f"state, but no leaf lies under a field named in momentum_fields={fields}."
                )
            if momentum == "pullback":
                cached = tuple(jnp.zeros_like(x) for _, x in selected)
        return LookaheadState(
            count=jnp.zeros([], jnp.int32),
            slow=_common.copy_tree(params),
            inner_state=inner_state,
            cached_momentum=cached,
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(_common.NO_PARAMS.format(name="lookahead"))
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = optax.safe_increment(state.count)
        sync = count % sync_period == 0
        alpha = jnp.asarray(slow_step_size, _utils.hyper_dtype())  # cast to each leaf's compute dtype

        def diff_leaf(p, u, s):  # fast weights after this step minus slow weights
            fast = _utils.to_compute(optax.apply_updates(p, u))
            return fast - _utils.to_compute(s)

        diff = jax.tree.map(diff_leaf, params, updates, state.slow)
        slow = jax.tree.map(
            lambda s, d: jnp.where(sync, _utils.to_compute(s) + alpha.astype(d.dtype) * d, s).astype(s.dtype),
            state.slow,
            diff,
        )
        updates = jax.tree.map(
            lambda u, d: jnp.where(sync, _utils.to_compute(u) - (1.0 - alpha).astype(d.dtype) * d, u).astype(u.dtype),
            updates,
            diff,
        )

        cached = state.cached_momentum
        if momentum != "none":
            flat, treedef = jax.tree_util.tree_flatten_with_path(inner_state)
            leaves, new_cached, j = [], [], 0
            for path, x in flat:
                if _is_momentum_leaf(path, x, fields):
                    if momentum == "reset":
                        x = jnp.where(sync, jnp.zeros_like(x), x)
                    else:
                        pulled = (alpha * _utils.to_compute(x) + (1.0 - alpha) * _utils.to_compute(cached[j])).astype(
                            x.dtype
                        )
                        x = jnp.where(sync, pulled, x)
                        new_cached.append(jnp.where(sync, x, cached[j]))
                    j += 1
                leaves.append(x)
            inner_state = jax.tree.unflatten(treedef, leaves)
            if momentum == "pullback":
                cached = tuple(new_cached)
        return updates, LookaheadState(count, slow, inner_state, cached)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lookahead_slow_params(opt_state: optax.OptState) -> optax.Params:
    """The slow weights held in an optimizer state built with :func:`lookahead`.

    Works on the state of ``lookahead(...)`` or of any chain / wrapper containing
    exactly one of it. Right after a synchronization they equal the fast weights.

    Args:
      opt_state: the optimizer state.

    Returns:
      The slow weights :math:`\\phi`.

    Examples:
      SGD with rate 1 and gradient 1, :math:`k = 2`, :math:`\\alpha = 0.5`: after
      step 1 the fast weights are -1 and the slow ones still 0; after step 2 the
      fast weights reach -2, the slow ones move to :math:`0 + 0.5(-2 - 0) = -1`
      and the fast weights are reset to them.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.averaging.lookahead(optax.sgd(1.0), sync_period=2, slow_step_size=0.5)
      >>> w = jnp.zeros(1)
      >>> state = tx.init(w)
      >>> for _ in range(2):
      ...     updates, state = tx.update(jnp.ones(1), state, w)
      ...     w = optax.apply_updates(w, updates)
      ...     print(float(w[0]), float(sam_optax.averaging.lookahead_slow_params(state)[0]))
      -1.0 0.0
      -1.0 -1.0
    """
    return _common.find_state(opt_state, LookaheadState, "sam_optax.averaging.lookahead").slow
