"""Method recipes: each name becomes (optimizer, geometry, two-pass options, eval params).

Every method shares the base optimizer: SGD with momentum 0.9, L2 weight decay
inside the base (so it does not enter the ascent direction), and a cosine
learning-rate schedule over the whole run (SWA uses its official schedule).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax import averaging, decay, geometry
from sam_optax.data import sharpness_sensitive, shards


@dataclasses.dataclass(frozen=True)
class Hyper:
    """Hyperparameters of the recipes (defaults: the papers' usual values where
    they transfer to a small model)."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05  # SAM / WSAM / GSAM (rho_max) / ESAM / LookSAM
    wsam_gamma: float = 0.9
    gsam_alpha: float = 0.3
    asam_rho: float = 0.5
    asam_eta: float = 0.01
    fisher_rho: float = 0.1
    fisher_eta: float = 1.0
    esam_beta: float = 0.5
    esam_gamma: float = 0.5
    looksam_k: int = 5
    looksam_alpha: float = 0.7
    swa_start: float = 0.75  # fraction of the epochs
    swa_lr: float = 0.5  # fraction of lr
    ema_decay: float = 0.99
    lookahead_k: int = 5
    lookahead_alpha: float = 0.8
    adamw_lr: float = 1e-3
    adamw_wd: float = 0.025  # normalized weight decay (App. B.1)
    m: Optional[int] = None  # m-sharpness shard size for the sharpness methods


class Recipe(NamedTuple):
    """How to train with one method.

    Attributes:
      tx: the optimizer (a sam_optax rule when ``geometry`` is not None).
      geometry: the ascent geometry, or None for a one-pass method.
      sa_kwargs: keyword arguments of ``sharpness_aware_step`` (``data``).
      per_example: whether the loss must return per-example losses (ESAM's SDS).
      eval_params: ``(params, opt_state) -> params`` to evaluate (SWA / EMA / slow weights).
    """

    tx: optax.GradientTransformation
    geometry: Optional[Any]
    sa_kwargs: dict
    per_example: bool
    eval_params: Callable[[Any, Any], Any]


def _last(params, opt_state):
    del opt_state
    return params


def _swa_eval(params, opt_state):
    """The SWA average once it holds a snapshot, the current weights before."""
    n = optax.tree.get(opt_state, "n_averaged")
    return jax.tree.map(lambda a, w: jnp.where(n > 0, a, w), averaging.swa_params(opt_state), params)


def build_method(name: str, hp: Hyper, *, steps_per_epoch: int, epochs: int) -> Recipe:
    total = steps_per_epoch * epochs
    lr = optax.cosine_decay_schedule(hp.lr, total)

    def base(schedule=lr):
        return optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.sgd(schedule, momentum=hp.momentum))

    sa = {"data": shards(hp.m)}
    if name == "sgd":
        return Recipe(base(), None, {}, False, _last)
    if name == "sam":
        return Recipe(sam_optax.sam(base()), geometry.l2(hp.rho), sa, False, _last)
    if name == "wsam":
        tx = sam_optax.wsam(base(), hp.wsam_gamma, learning_rate=lr)
        return Recipe(tx, geometry.l2(hp.rho), sa, False, _last)
    if name == "wsam_coupled":
        tx = sam_optax.wsam(base(), hp.wsam_gamma, decouple=False)
        return Recipe(tx, geometry.l2(hp.rho), sa, False, _last)
    if name == "gsam":
        rho = sam_optax.gsam_rho_schedule(lr, rho_max=hp.rho, rho_min=hp.rho / 2, lr_max=hp.lr, lr_min=0.0)
        return Recipe(sam_optax.gsam(base(), hp.gsam_alpha), geometry.l2(rho), sa, False, _last)
    if name == "asam":
        return Recipe(sam_optax.sam(base()), geometry.adaptive(hp.asam_rho, hp.asam_eta), sa, False, _last)
    if name == "fisher":
        return Recipe(sam_optax.sam(base()), geometry.fisher(hp.fisher_rho, hp.fisher_eta), sa, False, _last)
    if name == "esam":
        # as the official code, whose settings gave the paper's results: a mask per tensor,
        # the masked gradient normalized (benchmarks/claims.py's ESAM runs used this)
        geo = geometry.stochastic(geometry.l2(hp.rho), hp.esam_beta, granularity="tensor", normalize="masked")
        return Recipe(sam_optax.sam(base()), geo, {"data": shards(hp.m, selection=sharpness_sensitive(hp.esam_gamma))},
                      True, _last)
    if name == "looksam":
        tx = sam_optax.looksam(base(), k=hp.looksam_k, alpha=hp.looksam_alpha)
        return Recipe(tx, geometry.l2(hp.rho), sa, False, _last)
    if name == "swa":
        start_epoch = max(1, int(round(hp.swa_start * epochs)))
        schedule = averaging.swa_official_schedule(hp.lr, hp.swa_lr * hp.lr, start_epoch, steps_per_epoch)
        tx = averaging.swa(base(schedule), start_step=start_epoch * steps_per_epoch, period=steps_per_epoch)
        return Recipe(tx, None, {}, False, _swa_eval)
    if name == "sam_swa":
        start_epoch = max(1, int(round(hp.swa_start * epochs)))
        schedule = averaging.swa_official_schedule(hp.lr, hp.swa_lr * hp.lr, start_epoch, steps_per_epoch)
        tx = averaging.swa(sam_optax.sam(base(schedule)), start_step=start_epoch * steps_per_epoch,
                           period=steps_per_epoch)
        return Recipe(tx, geometry.l2(hp.rho), sa, False, _swa_eval)
    if name == "ema":
        tx = averaging.weight_ema(base(), hp.ema_decay, debias=True)
        return Recipe(tx, None, {}, False, lambda p, s: averaging.ema_params(s))
    if name == "lookahead":
        tx = averaging.lookahead(base(), hp.lookahead_k, hp.lookahead_alpha)
        return Recipe(tx, None, {}, False, lambda p, s: averaging.lookahead_slow_params(s))
    if name == "adamw":
        mult = optax.cosine_decay_schedule(1.0, total)
        wd = decay.normalized_weight_decay(hp.adamw_wd, 1, steps_per_epoch, epochs)
        tx = decay.adamw(hp.adamw_lr, weight_decay=wd, schedule_multiplier=mult)
        return Recipe(tx, None, {}, False, _last)
    if name == "adam_l2":
        mult = optax.cosine_decay_schedule(1.0, total)
        wd = decay.normalized_weight_decay(hp.adamw_wd, 1, steps_per_epoch, epochs)
        tx = optax.chain(optax.add_decayed_weights(wd), optax.adam(lambda c: hp.adamw_lr * mult(c)))
        return Recipe(tx, None, {}, False, _last)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")


METHODS = ("sgd", "sam", "wsam", "wsam_coupled", "gsam", "asam", "fisher", "esam", "looksam", "swa", "sam_swa",
           "ema", "lookahead", "adamw", "adam_l2")
DEFAULT_METHODS = ("sgd", "sam", "wsam", "esam", "gsam", "asam", "swa")
