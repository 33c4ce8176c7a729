r"""Momentum-SAM (MSAM): SGD and AdamW that store the perturbed point, one gradient pass.

MSAM perturbs the weights along the negative momentum direction instead of the
gradient's, so no extra pass is needed: the params the model trains with *are*
the perturbed point :math:`\tilde w_t = w_t - \rho\,v_t/\lVert v_t\rVert`
(exactly as the official code, which keeps the perturbed weights in the model
between steps). Each step undoes the stored perturbation, takes the base step
with the gradient :math:`g(\tilde w_t)` and perturbs again.

**The params are not the real weights.** Anything that reads the weights
(evaluation, EMA / SWA of the weights, checkpoints, weight norms, BatchNorm
statistics recompute) must first call :func:`msam_unperturbed`.

References:
  Becker, Altrock, Risse, `Momentum-SAM: Sharpness Aware Minimization without
  Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024; official
  code ``MarlonBecker/MSAM`` (``optimizer/msam.py``, ``optimizer/adamW_msam.py``,
  commit 780fa4f6).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _utils

_NORM_EPS = 1e-12  # the official code's 1 / (||v|| + 1e-12)

_NO_PARAMS = "MSAM needs the stored (perturbed) params: call tx.update(grads, opt_state, params)."


class MSAMState(NamedTuple):
    """State of :func:`msam_sgd`.

    Attributes:
      count: number of updates so far (schedules are evaluated at it).
      momentum: the PyTorch momentum buffer :math:`v_t` (zeros at init).
      inv_norm: :math:`s_t = 1/(\\lVert v_t\\rVert + 10^{-12})` of the last step (0 at init).
      rho: the :math:`\\rho` the stored perturbation was made with (0 at init);
        the params are :math:`w_t - \\rho\\, s_t\\, v_t`.
    """

    count: jax.Array  # type: ignore[assignment]  # field shadows tuple.count, as in optax
    momentum: optax.Updates
    inv_norm: jax.Array
    rho: jax.Array


class MSAMAdamWState(NamedTuple):
    """State of :func:`msam_adamw`.

    Attributes:
      count: number of updates so far.
      momentum: Adam's first moment :math:`m_t` (raw ``exp_avg``, not bias-corrected).
      nu: Adam's second moment :math:`v_t`.
      inv_norm: :math:`1/(\\lVert m_t\\rVert + 10^{-12})` of the last step (0 at init).
      rho: the :math:`\\rho` the stored perturbation was made with; the official
        code's ``norm_factor`` is ``rho * inv_norm``.
    """

    count: jax.Array  # type: ignore[assignment]  # field shadows tuple.count, as in optax
    momentum: optax.Updates
    nu: optax.Updates
    inv_norm: jax.Array
    rho: jax.Array


_States = (MSAMState, MSAMAdamWState)


def _scalar(x: Any, like: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(like.dtype)


def _zeros_state(params: optax.Params) -> tuple[jax.Array, optax.Updates, jax.Array]:
    dtype = _utils.tree_compute_dtype(params)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.asarray(p).dtype), params)
    return jnp.zeros([], jnp.int32), zeros, jnp.zeros([], dtype)


def msam_sgd(
    learning_rate: _utils.ScalarOrSchedule,
    momentum: float = 0.9,
    rho: _utils.ScalarOrSchedule = 0.3,
    weight_decay: _utils.ScalarOrSchedule = 1e-2,
    *,
    exact_undo: bool = False,
) -> optax.GradientTransformation:
    r"""SGD with Momentum-SAM, the official ``MSAM`` optimizer step by step (1 gradient pass).

    The params are the stored perturbed point :math:`\tilde w_t`; given
    :math:`g = \nabla L_B(\tilde w_t)` one step is (official ``optimizer/msam.py``)

    .. math::

      d &= g + \lambda\,\tilde w_t
          && \text{coupled L2, at the perturbed point} \\
      w_t &= \tilde w_t + \rho\, s_t\, v_t
          && \text{undo, } s_t \text{ stored, } s_0 = 0,\ v_0 = 0 \\
      v_{t+1} &= \mu\, v_t + d
          && \text{PyTorch momentum, no dampening} \\
      w_{t+1} &= w_t - \eta\, v_{t+1} \\
      s_{t+1} &= 1 / (\lVert v_{t+1}\rVert_2 + 10^{-12}), \quad
      \tilde w_{t+1} = w_{t+1} - \rho\, s_{t+1}\, v_{t+1}

    and the returned updates are :math:`\tilde w_{t+1} - \tilde w_t`. The norm
    is global over every leaf; weight decay hits every leaf (one param group in
    the official code). With ``rho=0`` this is exactly PyTorch's SGD with
    momentum and coupled L2, i.e. ``optax.chain(optax.add_decayed_weights(wd),
    optax.sgd(lr, momentum))``.

    A ``rho`` schedule: as in the official code the undo uses the *current*
    :math:`\rho`, so it is exact only when :math:`\rho` did not change since the
    last step; ``exact_undo=True`` (a deviation) undoes with the :math:`\rho` the
    stored perturbation was made with. The two agree for a constant ``rho``.

    Cost: 1 gradient pass, as SGD. Memory: the momentum buffer (as SGD) and two
    scalars.

    **The params are not the real weights**: use :func:`msam_unperturbed` for
    evaluation and checkpoints.

    Args:
      learning_rate: :math:`\eta \ge 0`, number or optax schedule of the step count
        (the official class default is 0.1).
      momentum: :math:`\mu \in [0, 1)` (official default 0.9).
      rho: :math:`\rho \ge 0`, number or schedule (official class default 0.3;
        the README's CIFAR / ImageNet commands use 3).
      weight_decay: :math:`\lambda \ge 0` (coupled L2), number or schedule
        (official default ``1e-2``).
      exact_undo: undo with the stored :math:`\rho` (see above).

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = msam_sgd(0.1, momentum=0.9, rho=0.5, weight_decay=0.0)
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)   # w~ = w - rho v/|v|
      >>> [round(float(x), 4) for x in params["w"]]
      [0.4, 1.2]
      >>> [round(float(x), 4) for x in msam_unperturbed(params, state)["w"]]
      [0.7, 1.6]

    References:
      Becker et al, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024
    """
    _utils.check_range("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _utils.check_range("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_range("rho", rho, low=0.0, allow_schedule=True)
    _utils.check_range("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _check_bool("exact_undo", exact_undo)

    def init_fn(params):
        count, zeros, scalar = _zeros_state(params)
        return MSAMState(count=count, momentum=zeros, inv_norm=scalar, rho=scalar)

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        return _sgd_update(grads, state, params, learning_rate, momentum, rho, weight_decay, exact_undo)

    return optax.GradientTransformation(init_fn, update_fn)


def msam_adamw(
    learning_rate: _utils.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: _utils.ScalarOrSchedule = 1e-2,
    rho: _utils.ScalarOrSchedule = 1.0,
) -> optax.GradientTransformation:
    r"""AdamW with Momentum-SAM, the official ``AdamW_MSAM`` step by step (1 gradient pass).

    The params are the stored perturbed point :math:`\tilde w`; with
    :math:`g = \nabla L_B(\tilde w)` and :math:`t` the 1-based step
    (official ``optimizer/adamW_msam.py``):

    .. math::

      w &= \tilde w + n\, m_{t-1}
          && n = \rho/(\lVert m_{t-1}\rVert_2 + 10^{-12}) \text{ stored, } 0 \text{ at init} \\
      m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2 \\
      w &\leftarrow w - \frac{\eta}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon} \\
      w &\leftarrow (1 - \eta\lambda)\, w
          && \text{decay after the Adam step} \\
      n &\leftarrow \rho/(\lVert m_t\rVert_2 + 10^{-12}), \quad \tilde w = w - n\, m_t

    The updates are the change of :math:`\tilde w`. The stored :math:`n`
    includes :math:`\rho`, so the undo is exact also under a ``rho`` schedule.
    The decay comes *after* the Adam step (PyTorch's AdamW decays before it;
    the difference is :math:`\eta\lambda` times the Adam step). With ``rho=0``
    this is that decay-after-step AdamW. :math:`m` is the raw first moment
    (not bias-corrected) in both the norm and the perturbation.

    Cost: 1 gradient pass, as AdamW. Memory: Adam's two moments and two scalars.

    **The params are not the real weights**: use :func:`msam_unperturbed`.

    Args:
      learning_rate: :math:`\eta \ge 0`, number or schedule (official default ``1e-3``).
      b1: :math:`\beta_1 \in [0, 1)` (official 0.9).
      b2: :math:`\beta_2 \in [0, 1)` (official 0.999).
      eps: :math:`\epsilon \ge 0`, added to the bias-corrected root (official ``1e-8``).
      weight_decay: :math:`\lambda \ge 0`, number or schedule (official ``1e-2``).
      rho: :math:`\rho \ge 0`, number or schedule (official class default 1; the
        README's ViT command uses 3).

    Returns:
      An :class:`optax.GradientTransformation` whose ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> tx = msam_adamw(0.1, weight_decay=0.0, rho=0.5)
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> [round(float(x), 4) for x in msam_unperturbed(params, state)["w"]]   # Adam step 0.1 sign(g)
      [2.9, 3.9]
      >>> [round(float(x), 4) for x in params["w"]]   # minus 0.5 m/|m|
      [2.6, 3.5]

    References:
      Becker et al, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024
    """
    _utils.check_range("learning_rate", learning_rate, low=0.0, allow_schedule=True)
    _utils.check_range("b1", b1, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_range("b2", b2, low=0.0, high=1.0, high_inclusive=False)
    _utils.check_range("eps", eps, low=0.0)
    _utils.check_range("weight_decay", weight_decay, low=0.0, allow_schedule=True)
    _utils.check_range("rho", rho, low=0.0, allow_schedule=True)

    def init_fn(params):
        count, zeros, scalar = _zeros_state(params)
        nu = jax.tree.map(jnp.zeros_like, zeros)
        return MSAMAdamWState(count=count, momentum=zeros, nu=nu, inv_norm=scalar, rho=scalar)

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError(_NO_PARAMS)
        return _adamw_update(grads, state, params, learning_rate, b1, b2, eps, weight_decay, rho)

    return optax.GradientTransformation(init_fn, update_fn)


def _sgd_update(grads, state, params, learning_rate, momentum, rho, weight_decay, exact_undo):
    """One :func:`msam_sgd` step: ``(updates, new_state)``."""
    s = state.inv_norm
    lr = _scalar(_utils.value_at(learning_rate, state.count), s)
    rho_now = _scalar(_utils.value_at(rho, state.count), s)
    wd = _scalar(_utils.value_at(weight_decay, state.count), s)
    undo = (state.rho if exact_undo else rho_now) * s
    mu = _scalar(momentum, s)

    def new_momentum(g, p, v):
        d = _utils.to_compute(g) + wd * _utils.to_compute(p)
        return (mu * _utils.to_compute(v) + d).astype(jnp.asarray(v).dtype)

    v_new = jax.tree.map(new_momentum, grads, params, state.momentum)
    s_new = (1.0 / (_utils.tree_norm(v_new) + _NORM_EPS)).astype(s.dtype)
    coef = rho_now * s_new

    def update(p, v, vn):
        v32, vn32 = _utils.to_compute(v), _utils.to_compute(vn)
        return (undo * v32 - lr * vn32 - coef * vn32).astype(jnp.asarray(p).dtype)

    updates = jax.tree.map(update, params, state.momentum, v_new)
    new_state = MSAMState(count=optax.safe_increment(state.count), momentum=v_new, inv_norm=s_new, rho=rho_now)
    return updates, new_state


def _adamw_update(grads, state, params, learning_rate, b1, b2, eps, weight_decay, rho):
    """One :func:`msam_adamw` step: ``(updates, new_state)``."""
    s = state.inv_norm
    t = (state.count + 1).astype(s.dtype)
    lr = _scalar(_utils.value_at(learning_rate, state.count), s)
    rho_now = _scalar(_utils.value_at(rho, state.count), s)
    wd = _scalar(_utils.value_at(weight_decay, state.count), s)
    beta1, beta2 = _scalar(b1, s), _scalar(b2, s)
    eps = _scalar(eps, s)
    undo = state.rho * s
    step_size = lr / (1 - beta1**t)
    root_bc2 = jnp.sqrt(1 - beta2**t)

    def first(g, m):
        return (beta1 * _utils.to_compute(m) + (1 - beta1) * _utils.to_compute(g)).astype(jnp.asarray(m).dtype)

    def second(g, v):
        g32 = _utils.to_compute(g)
        return (beta2 * _utils.to_compute(v) + (1 - beta2) * g32 * g32).astype(jnp.asarray(v).dtype)

    m_new = jax.tree.map(first, grads, state.momentum)
    v_new = jax.tree.map(second, grads, state.nu)
    s_new = (1.0 / (_utils.tree_norm(m_new) + _NORM_EPS)).astype(s.dtype)
    coef = rho_now * s_new

    def update(p, m, mn, vn):
        p32, m32, mn32 = map(_utils.to_compute, (p, m, mn))
        adam = step_size * mn32 / (jnp.sqrt(_utils.to_compute(vn)) / root_bc2 + eps)
        moved = undo * m32 - adam  # w_after_adam - w~
        return (moved - lr * wd * (p32 + moved) - coef * mn32).astype(jnp.asarray(p).dtype)

    updates = jax.tree.map(update, params, state.momentum, m_new, v_new)
    new_state = MSAMAdamWState(
        count=optax.safe_increment(state.count), momentum=m_new, nu=v_new, inv_norm=s_new, rho=rho_now
    )
    return updates, new_state


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}.")


def _find_state(opt_state: optax.OptState) -> MSAMState | MSAMAdamWState:
    """The one MSAM state inside ``opt_state`` (which may be a chain's tuple or a wrapper's state)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _States)) if isinstance(x, _States)]
    if len(found) != 1:
        raise ValueError(f"opt_state must contain exactly one msam_sgd / msam_adamw state, found {len(found)}.")
    return found[0]


def _shift(params: optax.Params, opt_state: optax.OptState, sign: float) -> optax.Params:
    state = _find_state(opt_state)
    # (mypy) jaxlib ships no stubs: PyTreeDef is unresolved
    if jax.tree.structure(params) != jax.tree.structure(state.momentum):  # type: ignore[operator]
        raise ValueError(
            "params must have the tree structure of the MSAM state's momentum "
            f"({jax.tree.structure(state.momentum)}), got {jax.tree.structure(params)}."
        )
    coef = sign * state.rho * state.inv_norm
    return jax.tree.map(
        lambda p, v: (_utils.to_compute(p) + coef * _utils.to_compute(v)).astype(jnp.asarray(p).dtype),
        params,
        state.momentum,
    )


def msam_unperturbed(params: optax.Params, opt_state: optax.OptState) -> optax.Params:
    r"""The real weights :math:`w = \tilde w + \rho\, s\, m` from MSAM's stored params.

    :func:`msam_sgd` and :func:`msam_adamw` keep the *perturbed* point
    :math:`\tilde w = w - \rho\, m/(\lVert m\rVert + 10^{-12})` in the params
    (:math:`m` the momentum buffer, resp. Adam's first moment). Evaluate, average
    (EMA / SWA), checkpoint or recompute BatchNorm statistics at the weights this
    function returns, as the official code's ``move_back_from_momentumAscent``
    before every evaluation and at the end of training. Pure and jit-able; the
    :math:`\rho` is the one the stored perturbation was made with, so the
    result is exact also under a ``rho`` schedule.

    Args:
      params: the params trained with MSAM (the perturbed point).
      opt_state: the optimizer state: an MSAM state, or any state tree (a
        chain's tuple) holding exactly one.

    Returns:
      The unperturbed weights, with the params' structure and dtypes.

    Raises:
      ValueError: if ``opt_state`` holds no MSAM state or several, or the
        params' structure differs from the state's.

    Examples:
      >>> import jax.numpy as jnp
      >>> tx = msam_sgd(0.1, rho=1.0, weight_decay=0.0)
      >>> params = {"w": jnp.array([1.0])}
      >>> state = tx.init(params)
      >>> msam_unperturbed(params, state)["w"].tolist()   # no perturbation before step 1
      [1.0]
    """
    return _shift(params, opt_state, 1.0)


def msam_perturbed(weights: optax.Params, opt_state: optax.OptState) -> optax.Params:
    r"""The inverse of :func:`msam_unperturbed`: :math:`\tilde w = w - \rho\, s\, m`.

    Use it to go back to the stored point after evaluating or modifying the
    real weights (the official ``move_up_to_momentumAscent``).

    Args:
      weights: the real weights :math:`w`.
      opt_state: the optimizer state holding exactly one MSAM state.

    Returns:
      The params to train on.

    Examples:
      One step of :func:`msam_sgd` from :math:`w = (1, 2)` with :math:`g = (3, 4)`:
      :math:`v = g`, the real weights are :math:`w - 0.1\,v = (0.7, 1.6)` and the
      stored point is :math:`w - \rho\, v/\lVert v\rVert = w - (0.3, 0.4) = (0.4, 1.2)`.

      >>> import jax.numpy as jnp
      >>> import optax
      >>> import sam_optax
      >>> tx = sam_optax.one_pass.msam_sgd(0.1, momentum=0.9, rho=0.5, weight_decay=0.0)
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> weights = sam_optax.one_pass.msam_unperturbed(params, state)
      >>> print([round(float(x), 4) for x in weights["w"]])
      [0.7, 1.6]
      >>> back = sam_optax.one_pass.msam_perturbed(weights, state)
      >>> print([round(float(x), 4) for x in back["w"]])
      [0.4, 1.2]
    """
    return _shift(weights, opt_state, -1.0)
