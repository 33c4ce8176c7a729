r"""m-RWP: the clean gradient on one batch mixed with the randomly perturbed gradient on another.

Mixed random weight perturbation (Li et al., TMLR 2024, reference sheet
section 6.2): two independent gradient passes on two *different* batches,

.. math::

  g = \lambda\, \nabla L_{B_1}(w + \epsilon) + (1 - \lambda)\, \nabla L_{B_0}(w),

given to any base optimizer at :math:`w`, with :math:`\epsilon` the
filter-wise Gaussian noise of :func:`sam_optax.one_pass.rwp_noise`. Neither
pass needs the other's result, unlike SAM's ascent.

References:
  Li, Tao, Yan, Lei, Wu, Fang, He, Huang, `Revisiting Random Weight
  Perturbation for Efficiently Improving Generalization
  <https://arxiv.org/abs/2404.00357>`_, TMLR 2024 (official ``nblt/mARWP``);
  Li et al, `Efficient Generalization Improvement Guided by Random Weight
  Perturbation <https://arxiv.org/abs/2211.11489>`_, 2022 (official ``nblt/RWP``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax import _utils
from sam_optax.one_pass._rwp import RWPState, RWPTrainState, _is_zero, rwp_grad, rwp_init


def mrwp_grad(
    loss_fn: Callable[..., Any],
    lam: float = 0.5,
    sigma: _utils.ScalarOrSchedule = 0.01,
    eta: float = 0.0,
    beta: float = 0.9,
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[tuple[Any, Any], optax.Updates, RWPState]]:
    r"""The m-RWP gradient: :math:`\lambda g_1 + (1-\lambda) g_0` from two batches, two independent passes.

    Returns ``grad_fn(params, state, batch0, batch1, *args) -> ((value0, value1),
    grads, new_state)`` with

    .. math::

      g_0 = \nabla_w L_{B_0}(w), \qquad
      (g_1, F) = \texttt{rwp\_grad}: \ \epsilon \sim \texttt{rwp\_noise}(w, \sigma_t, F, \eta),\
        g_1 = \nabla_w L_{B_1}(w + \epsilon),\ F \leftarrow \beta F + g_1 \odot g_1 \\
      \text{grads} = \lambda\, g_1 + (1 - \lambda)\, g_0

    ``value0`` is the clean loss on ``batch0`` at :math:`w`, ``value1`` the loss
    on ``batch1`` at :math:`w + \epsilon` (each ``(loss, aux)`` with
    ``has_aux``); ``loss_fn(params, batch, *args)``. The perturbed pass is
    :func:`sam_optax.one_pass.rwp_grad` itself (same noise, key handling and
    :math:`F`, filters on Flax's **last** axis). ``state`` comes from
    :func:`sam_optax.one_pass.rwp_init` (``adaptive=False`` for ``eta=0``).

    The two batches: the official single-GPU script takes consecutive
    mini-batches :math:`B_0 \ne B_1` of size :math:`B` for one update (so an
    epoch has half as many updates; it doubles the epochs); its DDP scripts put
    the clean pass on even ranks and the perturbed pass on odd ranks, each with
    its own per-device batch, and let the gradient mean form the mixture. Here
    the caller passes both batches; to split one batch of :math:`2B`, pass
    ``jax.tree.map(lambda x: x[:B], batch)`` and ``x[B:]``. In one jitted
    program the two gradient computations share no data, so XLA may overlap
    them; on a data-parallel mesh they could run on different devices (not
    built here: both run on every device, on that device's shard of each batch).

    Cost: 2 gradient passes, independent. Memory: :math:`\epsilon` (transient),
    :math:`g_0` while :math:`g_1` is computed, :math:`F` (adaptive only).

    Args:
      loss_fn: ``loss_fn(params, batch, *args)`` (``-> (loss, aux)`` with ``has_aux``).
      lam: :math:`\lambda \in [0, 1]`, the weight of the perturbed gradient
        (official 0.5). 0 is the base optimizer on ``batch0``; 1 is RWP on ``batch1``.
      sigma: :math:`\sigma \ge 0`, number or schedule of the step count (official
        DDP CIFAR recipe 0.01, ImageNet 0.005; m-ARWP script 0.015).
      eta: :math:`\eta \ge 0`, adaptive strength; default 0: the non-adaptive
        noise of the DDP scripts (m-ARWP: 1 in its argparse, 0.1 in its script).
      beta: :math:`\beta \in [0, 1]`, decay of :math:`F` (m-ARWP: 0.9 argparse,
        0.99 script); unused for ``eta=0``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sam_optax.one_pass import mrwp_grad, rwp_init
      >>> loss = lambda p, x: jnp.mean((x @ p["k"]) ** 2)
      >>> params = {"k": jnp.ones((2, 3))}
      >>> grad_fn = mrwp_grad(loss, lam=0.5, sigma=0.0)
      >>> state = rwp_init(params, jax.random.PRNGKey(0), adaptive=False)
      >>> (v0, v1), grads, state = grad_fn(params, state, jnp.ones((4, 2)), 2 * jnp.ones((4, 2)))
      >>> float(v0), float(v1), int(state.count)   # sigma = 0: both clean losses
      (4.0, 16.0, 1)
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {loss_fn!r}.")
    _utils.check_range("lam", lam, low=0.0, high=1.0)
    perturbed_fn = rwp_grad(loss_fn, sigma, eta, beta, has_aux=has_aux)  # validates sigma, eta, beta
    clean_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def grad_fn(params, state, batch0, batch1, *args, **kwargs):
        value0, g0 = clean_fn(params, batch0, *args, **kwargs)
        value1, g1, new_state = perturbed_fn(params, state, batch1, *args, **kwargs)
        grads = jax.tree.map(
            lambda a, b: (lam * _utils.to_compute(b) + (1 - lam) * _utils.to_compute(a)).astype(a.dtype), g0, g1
        )
        return (value0, value1), grads, new_state

    return grad_fn


def mrwp_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    lam: float = 0.5,
    sigma: _utils.ScalarOrSchedule = 0.01,
    eta: float = 0.0,
    beta: float = 0.9,
    *,
    has_aux: bool = False,
) -> tuple[Callable[..., RWPTrainState], Callable[..., tuple[optax.Params, RWPTrainState, Any]]]:
    r"""``(init, step)`` for m-RWP with any optax base optimizer ``tx``.

    ``init(params, key) -> RWPTrainState``; ``step(params, state, batch0, batch1,
    *args) -> (params, state, (loss, aux))``: the gradient of :func:`mrwp_grad`,
    then ``tx`` at :math:`w`: :math:`w \leftarrow w + \mathrm{tx}(\lambda g_1 +
    (1-\lambda) g_0, w)`. ``loss`` and ``aux`` are the clean pass's, on
    ``batch0`` at :math:`w` (the perturbed pass's aux, e.g. BatchNorm statistics,
    is dropped, as the official single-GPU script freezes the running statistics
    there). Weight decay inside ``tx`` acts at :math:`w` on the mixture (the
    official scripts' coupled decay in ``torch.optim.SGD``). Jit the step.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from sam_optax.one_pass import mrwp_step
      >>> loss = lambda p, x: jnp.mean((x @ p["k"]) ** 2)
      >>> init, step = mrwp_step(loss, optax.sgd(0.1, momentum=0.9))   # lam 0.5, sigma 0.01
      >>> params = {"k": jnp.ones((2, 3))}
      >>> state = init(params, jax.random.PRNGKey(0))
      >>> params, state, (loss_value, _) = jax.jit(step)(params, state, jnp.ones((4, 2)), jnp.ones((4, 2)))
      >>> float(loss_value), state.rwp.fisher is None
      (4.0, True)
    """
    _utils.check_transformation("tx", tx)
    grad_fn = mrwp_grad(loss_fn, lam, sigma, eta, beta, has_aux=has_aux)
    adaptive = not _is_zero(eta)

    def init(params, key):
        return RWPTrainState(opt_state=tx.init(params), rwp=rwp_init(params, key, adaptive=adaptive))

    def step(params, state, batch0, batch1, *args, **kwargs):
        (value0, _), grads, rwp = grad_fn(params, state.rwp, batch0, batch1, *args, **kwargs)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        loss, aux = value0 if has_aux else (value0, None)
        return optax.apply_updates(params, updates), RWPTrainState(opt_state, rwp), (loss, aux)

    return init, step
