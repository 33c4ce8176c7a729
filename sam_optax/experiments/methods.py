"""Method recipes: each name becomes (optimizer, geometry, two-pass options, eval params).

Every method shares the base optimizer: SGD with momentum 0.9, L2 weight decay
inside the base (so it does not enter the ascent direction), and a cosine
learning-rate schedule over the whole run (SWA uses its official schedule).

The efficient methods and where their defaults come from (as read for the
library's own docstrings: :func:`sam_optax.periodic`, :func:`sam_optax.randomized`,
:func:`sam_optax.adaptive_policy`, :func:`sam_optax.msam_sgd`, :func:`sam_optax.rwp_step`):

* ``periodic``: MosaicML Composer's periodic SAM, a SAM step every
  ``periodic_every = 10`` steps (the interval its authors used). Composer's
  README advises scaling ``rho`` proportionally to the interval (they used
  interval 10 with rho 0.5 = 10 x SAM's 0.05), so ``periodic_rho=None`` means
  ``periodic_every * rho``; set ``periodic_rho`` to tune it on its own.
* ``rst``: RST (randomized SAM), a SAM step with probability ``rst_p = 0.5``
  (constant; the paper's schedule formulas were not read), at SAM's ``rho``;
  the Bernoulli draws are seeded by the run's seed.
* ``ae_sam``: AE-SAM's adaptive policy. Its constants are required arguments
  of :func:`sam_optax.adaptive_policy` because the paper's values were not
  read; the recipe takes a third-party port's values (``ae_delta = 0.2``, the
  low end of its 0.2-0.3; ``c`` from ``ae_c_start = 0.4`` to ``ae_c_end = 0.2``
  over the run; ``mu_0 = 0``, ``sigma_0^2 = 1e-10``). They are **not the
  authors' values**.
* ``msam``: Momentum-SAM (:func:`sam_optax.msam_sgd`) with the shared base's
  lr schedule, momentum and L2 (coupled at the stored perturbed point, as the
  official code), ``msam_rho = 0.3`` (the official class default; the README's
  CIFAR commands use 3, for their setup); evaluated at
  :func:`sam_optax.msam_unperturbed`.
* ``late_sam``: late-phase SAM (:func:`sam_optax.late_phase`): the base
  optimizer for the first ``late_start = 0.8`` of the run, SAM after (the
  paper's Fig. 1 switches at epoch 175 of 200).
* ``ae_looksam``: AE-LookSAM (:func:`sam_optax.adaptive_looksam`): the AE-SAM
  recipe's policy, LookSAM's reuse update (``looksam_alpha``) on the others.
* ``saf`` / ``mesa``: :func:`sam_optax.trajectory.saf` / ``mesa`` with the
  paper's values (tau 5, delay 3 epochs, start epoch 5, lambda 0.3 / 0.8, the
  code's tau^2 scale); MESA's teacher decay is ``mesa_decay = 0.99`` (timm's
  0.9998 averages over ~5000 steps, longer than these runs: the paper allows
  beta in (0.9, 1)).
* ``mrwp``: m-RWP (:func:`sam_optax.mrwp_step`, non-adaptive, lambda 0.5,
  sigma 0.01): each batch is split in halves, the clean gradient on the first,
  the perturbed one on the second, so an update sees as many examples as the
  others' (the official single-GPU code takes two batches per update and
  doubles the epochs).
* ``rwp``: ARWP at 1x cost (:func:`sam_optax.rwp_step`) around the shared base,
  with the official 1x script's values: the cosine sigma ramp
  :func:`sam_optax.one_pass.rwp_sigma_schedule` from ``rwp_sigma = 0.001`` by
  ``rwp_inc = 10``, ``rwp_eta = 0.1``, ``rwp_beta = 0.99``.

A recipe may bring its own step builder (``Recipe.make_step``), called with the
model's functions (:class:`StepContext`); the training loop hands every step a
batch ``{"x", "y", "index"}`` (``index``: the examples' ids in the training
set) and, with ``Recipe.needs_key``, a PRNG key to ``init``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sam_optax
from sam_optax import averaging, decay, geometry, one_pass, rules
from sam_optax.data import shards, sharpness_sensitive


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
    m: int | None = None  # m-sharpness shard size for the sharpness methods
    periodic_every: int = 10  # Composer's interval
    periodic_rho: float | None = None  # None: periodic_every * rho (Composer: rho proportional to the interval)
    rst_p: float = 0.5  # RST's SAM probability (constant)
    ae_delta: float = 0.2  # AE-SAM: a third-party port's values, not the authors'
    ae_c_start: float = 0.4
    ae_c_end: float = 0.2
    ae_mu_init: float = 0.0
    ae_var_init: float = 1e-10
    msam_rho: float = 0.3  # official MSAM class default (README CIFAR: 3)
    rwp_sigma: float = 0.001  # ARWP 1x script: sigma_0, ramped by 1 + inc (1 - cos(pi t / T)) / 2
    rwp_inc: float = 10.0
    rwp_eta: float = 0.1
    rwp_beta: float = 0.99
    late_start: float = 0.8  # late-phase SAM from this fraction of the run (paper Fig. 1: 175 of 200 epochs)
    saf_weight: float = 0.3  # SAF: lambda (code scale: lambda tau^2 on the KL), tau 5, delay 3, start epoch 5
    saf_temperature: float = 5.0
    saf_delay: int = 3
    saf_start: int = 5
    mesa_weight: float = 0.8  # MESA: lambda (paper 0.8)
    mesa_decay: float = 0.99  # EMA decay of the teacher (timm's 0.9998 spans 5000 steps: longer than these runs)
    mrwp_lam: float = 0.5  # m-RWP: lambda, sigma (m-ARWP argparse), non-adaptive
    mrwp_sigma: float = 0.01


class StepContext(NamedTuple):
    """What the training loop gives a recipe's own step builder (``Recipe.make_step``).

    Attributes:
      loss_fn: ``(params, batch) -> mean cross-entropy``.
      per_example_loss: ``(params, batch) -> [n]`` cross-entropies.
      logits_fn: ``(params, batch) -> [n, num_classes]`` logits of ``batch["x"]``.
      logits_loss: ``(logits, batch) -> mean cross-entropy`` against ``batch["y"]``.
      num_examples: size of the training set (``batch["index"]`` is in ``[0, num_examples)``).
      num_classes: number of classes.
    """

    loss_fn: Callable[[Any, Any], Any]
    per_example_loss: Callable[[Any, Any], Any]
    logits_fn: Callable[[Any, Any], Any]
    logits_loss: Callable[[Any, Any], Any]
    num_examples: int
    num_classes: int


class Recipe(NamedTuple):
    """How to train with one method.

    Attributes:
      tx: the optimizer (a sam_optax rule when ``geometry`` is not None; the base
        optimizer of a method with its own ``make_step``).
      geometry: the ascent geometry, or None for a one-pass method.
      sa_kwargs: keyword arguments of ``sharpness_aware_step`` (``data``).
      per_example: whether the loss must return per-example losses (ESAM's SDS).
      eval_params: ``(params, opt_state) -> params`` to evaluate (SWA / EMA / slow
        weights / MSAM's unperturbed weights); ``opt_state`` is what the step's
        ``get_opt_state`` returns.
      make_step: ``None`` (a plain or a sharpness-aware step from ``tx`` and
        ``geometry``), or the method's own builder ``make_step(ctx: StepContext)
        -> (init, step, get_opt_state)`` with ``init(params)`` (``init(params,
        key)`` with ``needs_key``), ``step(params, state, batch) -> (params,
        state, (loss, aux))`` (the shape of :func:`sam_optax.plain_step`,
        :func:`sam_optax.rwp_step`) and ``get_opt_state(state)`` the state
        ``eval_params`` reads. ``step`` is jitted by the loop (state donated) and
        must not recompile after step 1; its step count is the state's own (the
        epoch is ``count // steps_per_epoch``, which ``build_method`` knows).
      needs_index: the step reads ``batch["index"]``, the ids of the batch's
        examples in the training set (e.g. a per-example table); the loop always
        passes it, and the step raises ``ValueError`` at trace time without it.
      needs_key: ``init`` takes a PRNG key (random perturbations).
      host_schedule: ``opt_state -> iterator of bools``, the literal ``second_pass``
        of each coming step known ahead (``sam_optax.looksam_schedule``,
        ``rules.periodic_schedule``, ``rules.late_phase_schedule``: a Python counter;
        ``rules.randomized_schedule``: RST's draws, a block at a time): on CPU the
        loop then picks one of two programs per step without reading the device each step.
    """

    tx: optax.GradientTransformation
    geometry: Any | None
    sa_kwargs: dict
    per_example: bool
    eval_params: Callable[[Any, Any], Any]
    make_step: Callable[[StepContext], tuple] | None = None
    needs_index: bool = False
    needs_key: bool = False
    host_schedule: Callable[[Any], Any] | None = None


def _last(params, opt_state):
    del opt_state
    return params


def _swa_eval(params, opt_state):
    """The SWA average once it holds a snapshot, the current weights before."""
    n = optax.tree.get(opt_state, "n_averaged")
    return jax.tree.map(lambda a, w: jnp.where(n > 0, a, w), averaging.swa_params(opt_state), params)


def _msam_eval(params, opt_state):
    """MSAM's params are the perturbed point: evaluate the real weights."""
    return one_pass.msam_unperturbed(params, opt_state)


def _rwp_builder(tx, sigma, eta, beta):
    """``Recipe.make_step`` of ARWP: :func:`sam_optax.rwp_step` around ``tx`` on the mean loss."""

    def make_step(ctx: StepContext):
        init, step = one_pass.rwp_step(ctx.loss_fn, tx, sigma, eta, beta)
        return init, step, lambda state: state.opt_state

    return make_step


def _mrwp_builder(tx, lam, sigma):
    """``Recipe.make_step`` of m-RWP: :func:`sam_optax.mrwp_step`, the batch split in halves."""

    def make_step(ctx: StepContext):
        init, step = one_pass.mrwp_step(ctx.loss_fn, tx, lam, sigma)

        def split_step(params, state, batch):
            half = batch["y"].shape[0] // 2
            return step(
                params,
                state,
                jax.tree.map(lambda a: a[:half], batch),
                jax.tree.map(lambda a: a[half : 2 * half], batch),
            )

        return init, split_step, lambda state: state.opt_state

    return make_step


def _trajectory_builder(make_regularizer, tx):
    """``Recipe.make_step`` of SAF / MESA: :func:`sam_optax.trajectory.trajectory_step`."""

    def make_step(ctx: StepContext):
        reg = make_regularizer(ctx)
        init, step = sam_optax.trajectory.trajectory_step(ctx.logits_fn, ctx.logits_loss, tx, reg)
        return init, step, lambda state: state.opt_state

    return make_step


def _efficient(name, hp, base, sa, steps_per_epoch, total) -> Recipe:
    """Late-phase SAM, AE-LookSAM, SAF, MESA and m-RWP (see the module docstring)."""
    if name == "late_sam":
        start = int(round(hp.late_start * total))
        return Recipe(
            sam_optax.late_phase(sam_optax.sam(base), start),
            geometry.l2(hp.rho),
            sa,
            False,
            _last,
            host_schedule=functools.partial(rules.late_phase_schedule, start),
        )
    if name == "ae_looksam":
        tx = sam_optax.adaptive_looksam(
            base,
            hp.ae_delta,
            hp.ae_c_start,
            hp.ae_c_end,
            total,
            mu_init=hp.ae_mu_init,
            var_init=hp.ae_var_init,
            alpha=hp.looksam_alpha,
        )
        return Recipe(tx, geometry.l2(hp.rho), sa, False, _last)
    if name == "mrwp":
        return Recipe(
            base, None, {}, False, _last, make_step=_mrwp_builder(base, hp.mrwp_lam, hp.mrwp_sigma), needs_key=True
        )
    if name == "saf":
        reg = lambda ctx: sam_optax.trajectory.saf(  # noqa: E731
            ctx.num_examples,
            ctx.num_classes,
            steps_per_epoch=steps_per_epoch,
            weight=hp.saf_weight,
            temperature=hp.saf_temperature,
            delay_epochs=hp.saf_delay,
            start_epoch=hp.saf_start,
        )
    else:
        reg = lambda ctx: sam_optax.trajectory.mesa(  # noqa: E731
            steps_per_epoch=steps_per_epoch,
            weight=hp.mesa_weight,
            temperature=hp.saf_temperature,
            decay=hp.mesa_decay,
            start_epoch=hp.saf_start,
        )
    return Recipe(base, None, {}, False, _last, make_step=_trajectory_builder(reg, base), needs_index=name == "saf")


def build_method(name: str, hp: Hyper, *, steps_per_epoch: int, epochs: int, seed: int = 0) -> Recipe:
    """The :class:`Recipe` of method ``name`` (one of :data:`METHODS`) for a run of
    ``epochs`` x ``steps_per_epoch`` steps; ``seed`` seeds RST's Bernoulli draws."""
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
        return Recipe(
            sam_optax.sam(base()),
            geo,
            {"data": shards(hp.m, selection=sharpness_sensitive(hp.esam_gamma))},
            True,
            _last,
        )
    if name == "looksam":
        tx = sam_optax.looksam(base(), k=hp.looksam_k, alpha=hp.looksam_alpha)
        return Recipe(
            tx,
            geometry.l2(hp.rho),
            sa,
            False,
            _last,
            host_schedule=functools.partial(sam_optax.looksam_schedule, hp.looksam_k),
        )
    if name in ("periodic", "rst", "ae_sam"):
        return _scheduled(name, hp, sam_optax.sam(base()), sa, total, seed)
    if name in ("late_sam", "ae_looksam", "mrwp", "saf", "mesa"):
        return _efficient(name, hp, base(), sa, steps_per_epoch, total)
    if name == "msam":
        tx = one_pass.msam_sgd(lr, momentum=hp.momentum, rho=hp.msam_rho, weight_decay=hp.weight_decay)
        return Recipe(tx, None, {}, False, _msam_eval)
    if name == "rwp":
        tx = base()
        sigma = one_pass.rwp_sigma_schedule(hp.rwp_sigma, hp.rwp_inc, total)
        return Recipe(
            tx, None, {}, False, _last, make_step=_rwp_builder(tx, sigma, hp.rwp_eta, hp.rwp_beta), needs_key=True
        )
    if name == "swa":
        start_epoch = max(1, int(round(hp.swa_start * epochs)))
        schedule = averaging.swa_official_schedule(hp.lr, hp.swa_lr * hp.lr, start_epoch, steps_per_epoch)
        tx = averaging.swa(base(schedule), start_step=start_epoch * steps_per_epoch, period=steps_per_epoch)
        return Recipe(tx, None, {}, False, _swa_eval)
    if name == "sam_swa":
        start_epoch = max(1, int(round(hp.swa_start * epochs)))
        schedule = averaging.swa_official_schedule(hp.lr, hp.swa_lr * hp.lr, start_epoch, steps_per_epoch)
        tx = averaging.swa(
            sam_optax.sam(base(schedule)), start_step=start_epoch * steps_per_epoch, period=steps_per_epoch
        )
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


def _scheduled(name, hp, rule, sa, total, seed) -> Recipe:
    """The second-pass schedulers around SAM (``sharpness_aware_step``'s ``second_pass="auto"``
    skips the second pass on their base steps)."""
    if name == "periodic":
        rho = hp.periodic_every * hp.rho if hp.periodic_rho is None else hp.periodic_rho
        return Recipe(
            sam_optax.periodic(rule, hp.periodic_every),
            geometry.l2(rho),
            sa,
            False,
            _last,
            host_schedule=functools.partial(rules.periodic_schedule, hp.periodic_every),
        )
    if name == "rst":
        return Recipe(
            sam_optax.randomized(rule, hp.rst_p, seed=seed),
            geometry.l2(hp.rho),
            sa,
            False,
            _last,
            host_schedule=functools.partial(rules.randomized_schedule, hp.rst_p),
        )
    tx = sam_optax.adaptive_policy(
        rule, hp.ae_delta, hp.ae_c_start, hp.ae_c_end, total, mu_init=hp.ae_mu_init, var_init=hp.ae_var_init
    )
    return Recipe(tx, geometry.l2(hp.rho), sa, False, _last)


#: The method names that :func:`build_method` (and ``sam-optax compare --methods``) accept.
METHODS = (
    "sgd",
    "sam",
    "wsam",
    "wsam_coupled",
    "gsam",
    "asam",
    "fisher",
    "esam",
    "looksam",
    "periodic",
    "rst",
    "ae_sam",
    "late_sam",
    "ae_looksam",
    "msam",
    "rwp",
    "mrwp",
    "saf",
    "mesa",
    "swa",
    "sam_swa",
    "ema",
    "lookahead",
    "adamw",
    "adam_l2",
)
DEFAULT_METHODS = ("sgd", "sam", "wsam", "esam", "gsam", "asam", "swa")
