"""Step-cost benchmark: time of a training step of each method, as ratios in one run.

Run it with ``sam-optax bench`` or ``python benchmarks/step_cost.py`` (both
start ``python -m sam_optax.benchmarking`` in a fresh process). For each model
(a small MLP, a small 1-D CNN and a 2-D ResNet-style convnet, Flax Linen) and a
fixed batch (128 for the MLP and the CNN, 64 for the convnet unless
``--batch-size`` is given), every method's
jitted training step (two-pass helper + rule + ``optax.apply_updates``, params
and optimizer state donated) is compiled, warmed up, and then timed in
interleaved rounds (in a new random order each round), so that all methods see the same machine
state. A ratio
is the median over rounds of the ratio of the two methods' times within a
round (paired, so slow drifts of the machine cancel); ratios are to the base
optimizer's step, to SAM and to ``optax.contrib.sam`` per SAM update.

Memory, two measures. XLA's compiled memory analysis of each step, on every
backend: inputs + temporaries + non-aliased outputs (``peak_bytes``, and its
ratio to SAM's). On a device with ``memory_stats()`` (GPU, TPU), also the
allocator's high-water mark: it cannot be reset, so for each method the
benchmark reads ``bytes_in_use`` before making its state and
``peak_bytes_in_use`` after its warm-up; when the high-water mark rose, the
difference is the method's own peak above what was resident before
(``device_peak_bytes``: its parameters, optimizer state and step
temporaries); when it did not rise, only an upper bound is known and
``device_peak_bytes`` is ``None``.

On CPU the benchmark runs XLA single-threaded and pinned to one core by
default (``--threads one``): on a small shared machine, multi-threaded XLA
makes ratios between identical programs drift by 10%; one pinned thread keeps
them within a few percent. ``--threads all`` measures the default setting.

``--max-seconds S`` bounds a model's run: once 60% of ``S`` is spent compiling,
the remaining methods (beyond base, SAM and ``optax.contrib.sam``) are skipped
(listed in ``"skipped"``), and the timed rounds stop after the round that
passes ``S`` (``rounds_done``).

Ctrl-C stops at the next safe point (after a compilation or a round), saves the
models whose timed rounds had started (from the rounds done, ``"complete":
false``) and exits with status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import geometry
from sam_optax._argtypes import positive_int as _positive_int
from sam_optax.experiments import _interrupt, _io


class Target(NamedTuple):
    """A pass/fail limit: ``table[row][field of ref] <= limit``.

    ``ref`` is ``"base"``, ``"sam"`` or ``"contrib_opaque"`` (a step-time ratio) or
    ``"param_bytes"`` (the extra peak memory over the base step, in parameter
    bytes); ``row`` defaults to the target's key. ``cpu_models``: on the CPU
    backend the target applies only to these models (the others are reported
    with ``"applies": false``); on other backends it applies to all.
    """

    limit: float
    ref: str
    row: str | None = None
    cpu_models: tuple[str, ...] | None = None


# One line per target (issue 12 and the earlier ones). A method added below gets a target here.
TARGETS = {
    "sam": Target(2.03, "base"),
    "wsam": Target(1.03, "sam"),
    "gsam": Target(1.03, "sam"),
    "asam": Target(1.03, "sam"),
    "esam": Target(1.50, "base"),
    "esam_skip": Target(1.50, "base"),
    # lax.cond on XLA:CPU runs a convolution's gradient on a slow path (jax-ml/jax#12868): MLP only there
    "looksam": Target(1.23, "base", cpu_models=("mlp",)),
    "looksam_host": Target(1.23, "base"),
    "looksam_reuse": Target(1.05, "base"),
    "sam_chunks": Target(1.10, "sam"),
    "sam_chunks_b4": Target(1.10, "sam"),
    "sam_vs_contrib": Target(0.95, "contrib_opaque", row="sam"),
    "sam_extra_memory": Target(1.2, "param_bytes", row="sam"),
}
_REF_FIELD = {
    "base": "ratio_to_base",
    "sam": "ratio_to_sam",
    "contrib_opaque": "ratio_to_contrib_opaque",
    "param_bytes": "extra_peak_over_base_in_param_bytes",
}
DEFAULT_BATCH = {"mlp": 128, "cnn": 128, "convnet": 64}
MODELS = tuple(DEFAULT_BATCH)
CONVNET_CPU: dict[str, Any] = {"widths": (16, 32, 64), "blocks": 1}
RESNET18: dict[str, Any] = {"widths": (64, 128, 256, 512), "blocks": 2}
REQUIRED = ("base", "sam", "contrib_opaque")  # the references of the ratios: never skipped


class Method(NamedTuple):
    name: str
    step: Callable  # (params, opt_state, batch) -> (params, opt_state, loss); jitted unless `jitted` given
    init: Callable  # params -> opt_state
    steps_per_call: int = 1  # updates per timed call (LookSAM: a whole period)
    updates_per_sam: float = 1.0  # calls that make one SAM update (contrib transparent: 2)
    jitted: Callable | None = None  # the jitted step to compile (when `step` is a host loop)


def resnet(widths: Sequence[int] = CONVNET_CPU["widths"], blocks: int = CONVNET_CPU["blocks"], num_classes: int = 10):
    r"""A ResNet-style 2-D convnet (Flax Linen) with GroupNorm, for 32x32x3 inputs.

    A stem (conv 3x3, GroupNorm, relu), then one stage per width of ``blocks``
    residual blocks each,

    .. math::

      y = \mathrm{relu}\big(\mathrm{GN}(\mathrm{conv}(\mathrm{relu}(\mathrm{GN}(\mathrm{conv}_s(x))))) + P(x)\big),

    with stride :math:`s = 2` in the first block of every stage but the first,
    and :math:`P` the identity or, when the shape changes, a 1x1 conv with
    stride :math:`s` (He et al. 2016, option B); then a global average pool
    and a Dense layer. GroupNorm (Wu & He 2018) has no mutable state; its
    groups are ``min(32, width // 4)`` (at least 1). ``widths=(64, 128, 256,
    512), blocks=2`` is ResNet-18's CIFAR layout (about 11.2M parameters).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> net = resnet((8, 16), 1)
      >>> shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
      >>> sum(x.size for x in jax.tree.leaves(shapes))  # stem 232, blocks 1184 + 3680, dense 170
      5266
      >>> jax.eval_shape(net.apply, shapes, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)

    References:
      He, Zhang, Ren, Sun, *Deep Residual Learning for Image Recognition*, CVPR 2016.
      Wu & He, *Group Normalization*, ECCV 2018.
    """
    import flax.linen as nn

    widths = tuple(int(w) for w in widths)
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of integers >= 1, got {widths}")
    if int(blocks) < 1:
        raise ValueError(f"blocks must be an integer >= 1, got {blocks}")

    def norm(width):
        return nn.GroupNorm(num_groups=max(1, min(32, width // 4)))

    class Block(nn.Module):
        width: int
        stride: int

        @nn.compact
        def __call__(self, x):
            s = (self.stride, self.stride)
            y = nn.relu(norm(self.width)(nn.Conv(self.width, (3, 3), s, use_bias=False)(x)))
            y = norm(self.width)(nn.Conv(self.width, (3, 3), use_bias=False)(y))
            if self.stride != 1 or x.shape[-1] != self.width:
                x = norm(self.width)(nn.Conv(self.width, (1, 1), s, use_bias=False)(x))
            return nn.relu(y + x)

    class ResNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(norm(widths[0])(nn.Conv(widths[0], (3, 3), use_bias=False)(x)))
            for i, width in enumerate(widths):
                for b in range(int(blocks)):
                    x = Block(width, 2 if i > 0 and b == 0 else 1)(x)
            return nn.Dense(num_classes)(jnp.mean(x, axis=(1, 2)))

    return ResNet()


def _models(batch_sizes: dict, seed: int, convnet: dict | None = None):
    """``{name: (model, batch)}`` for the models in ``batch_sizes``; synthetic data from ``seed``."""
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(256)(x))
            x = nn.relu(nn.Dense(256)(x))
            return nn.Dense(10)(x)

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (5,))(x))
            x = nn.relu(nn.Conv(32, (5,), strides=(2,))(x))
            x = nn.relu(nn.Conv(64, (3,), strides=(2,))(x))
            return nn.Dense(10)(x.reshape((x.shape[0], -1)))

    shapes = {"mlp": (40,), "cnn": (40, 1), "convnet": (32, 32, 3)}
    nets = {"mlp": MLP, "cnn": CNN, "convnet": lambda: resnet(**(convnet or CONVNET_CPU))}
    out = {}
    for name, batch_size in batch_sizes.items():
        rng = np.random.default_rng(seed)  # the same labels for every model of one batch size
        y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
        x = jnp.asarray(rng.normal(size=(batch_size, *shapes[name])), jnp.float32)
        out[name] = (nets[name](), {"x": x, "y": y})
    return out


def _methods(model, lr: float, rho: float, batch_size: int) -> list[Method]:
    """Every method's step; the SAM family one line each (``add(name, rule, geometry, **step kwargs)``)."""

    def per_example(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def loss(params, batch):
        return jnp.mean(per_example(params, batch))

    base = optax.sgd(lr, momentum=0.9)

    def plain(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = base.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    methods = [Method("base", jax.jit(plain, donate_argnums=(0, 1)), base.init)]

    def make(name, tx, geo, lossf=loss, second_pass="auto", maker=sam_optax.sharpness_aware_step, **kwargs):
        init, step = maker(lossf, tx, geo, **kwargs)
        pass_kw = {} if maker is not sam_optax.sharpness_aware_step else {"second_pass": second_pass}

        def timed(params, state, batch):
            params, state, out = step(params, state, batch, **pass_kw)
            return params, state, out.loss

        return Method(name, jax.jit(timed, donate_argnums=(0, 1)), init)

    def add(*args, **kwargs):
        methods.append(make(*args, **kwargs))

    shards, l2, sam = sam_optax.data.shards, geometry.l2, sam_optax.sam
    sds = shards(selection=sam_optax.data.sharpness_sensitive(0.5))
    add("sam", sam(base), l2(rho))
    methods += _contrib_methods(loss, base, rho)[:1]  # a reference of the ratios: compiled early
    add("wsam", sam_optax.wsam(base, 0.9, learning_rate=lr), l2(rho))
    add("gsam", sam_optax.gsam(base, 0.3), l2(rho))
    add("asam", sam(base), geometry.adaptive(10 * rho))
    add("esam", sam(base), geometry.stochastic(l2(rho), 0.5), lossf=per_example, data=sds)
    # the official code's SWP (normalize='masked'), its clean pass skipping the masked kernels' gradients
    swp_masked = geometry.stochastic(l2(rho), 0.5, normalize="masked")
    add("esam_skip", sam(base), swp_masked, lossf=per_example, data=sds, maker=sam_optax.swp.swp_step)
    add("esam_swp", sam(base), geometry.stochastic(l2(rho), 0.5))  # SWP alone (beta 0.5)
    add("esam_sds", sam(base), l2(rho), lossf=per_example, data=sds)  # SDS alone (gamma 0.5)
    add("sam_chunks", sam(base), l2(rho), data=shards(batch_size // 8))  # the default chunk_mode
    add("sam_chunks_b4", sam(base), l2(rho), data=shards(batch_size // 4))
    add("sam_chunks_vmap", sam(base), l2(rho), data=shards(batch_size // 8, chunk_mode="vmap"))
    add("sam_chunks_unroll", sam(base), l2(rho), data=shards(batch_size // 8, chunk_mode="unroll"))
    # ---- more methods here: one line each, add(name, rule, geometry, **sharpness_aware_step kwargs) ----
    # (and a line in TARGETS, and the name in benchmarks/summarize.py's ROWS for the README order)
    methods += _looksam_methods(make, base, rho)
    methods += _contrib_methods(loss, base, rho)[1:]
    return methods


def _looksam_methods(make, base, rho, k: int = 5) -> list[Method]:
    """LookSAM k=5, three rows: ``looksam`` (the kind of step chosen inside jit by
    ``lax.cond``) and ``looksam_host`` (two jitted programs chosen on the host)
    each time a whole period (1 full step + k-1 reuse steps) per call;
    ``looksam_reuse`` times the reuse program alone (its cost does not depend on
    the stored direction, so it runs from the initial state)."""
    look = sam_optax.looksam(base, k=k, alpha=0.7)
    cond = make("looksam", look, geometry.l2(rho))

    def period(params, opt_state, batch):
        for _ in range(k):
            params, opt_state, value = cond.step(params, opt_state, batch)
        return params, opt_state, value

    full_step = make("looksam_full", look, geometry.l2(rho), second_pass=True).step
    reuse = make("looksam_reuse", look, geometry.l2(rho), second_pass=False)

    def host_period(params, opt_state, batch):
        params, opt_state, value = full_step(params, opt_state, batch)
        for _ in range(k - 1):
            params, opt_state, value = reuse.step(params, opt_state, batch)
        return params, opt_state, value

    return [
        cond._replace(step=period, steps_per_call=k, jitted=cond.step),
        Method("looksam_host", host_period, cond.init, steps_per_call=k, jitted=full_step),
        reuse,
    ]


def _contrib_methods(loss, base, rho) -> list[Method]:
    """``optax.contrib.sam`` (opaque mode, and transparent mode counted per SAM update: two calls)."""
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    opaque = optax.contrib.sam(base, adv, sync_period=2, opaque_mode=True)

    def contrib_opaque(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = opaque.update(grads, opt_state, params, grad_fn=lambda p, _: jax.grad(loss)(p, batch))
        return optax.apply_updates(params, updates), opt_state, value

    transparent = optax.contrib.sam(base, adv, sync_period=2, opaque_mode=False)

    def contrib_transparent(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = transparent.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # its state caches the params themselves: copy them, or donation would donate a buffer twice
    return [
        Method("contrib_opaque", jax.jit(contrib_opaque, donate_argnums=(0, 1)), opaque.init),
        Method(
            "contrib_transparent",
            jax.jit(contrib_transparent, donate_argnums=(0, 1)),
            lambda p: jax.tree.map(jnp.copy, transparent.init(p)),
            updates_per_sam=0.5,
        ),
    ]


def _memory(compiled) -> dict:
    ma = compiled.memory_analysis()
    if ma is None:  # pragma: no cover - backend without memory analysis
        return {}
    out = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
    }
    # Live memory of one step: inputs + XLA's temporary buffers + outputs that do
    # not reuse (donated) input buffers.
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _device_memory() -> dict | None:
    """``{'bytes_in_use', 'peak_bytes_in_use'}`` of the first device, or ``None`` (CPU: no ``memory_stats``)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pragma: no cover - some backends raise instead of returning None
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return {"bytes_in_use": int(stats.get("bytes_in_use", 0)), "peak_bytes_in_use": int(stats["peak_bytes_in_use"])}


def device_step_peak(before: dict | None, after: dict | None) -> dict | None:
    r"""A method's own device peak from the allocator's high-water mark, read around its state and warm-up.

    With :math:`u_0` the bytes in use before the method's state was made,
    :math:`h_0` the high-water mark then and :math:`h_1` after its warm-up:
    ``device_peak_bytes`` is :math:`h_1 - u_0` when :math:`h_1 > h_0` (the
    method set the mark, so that is exact), else ``None`` (the mark cannot be
    reset: only :math:`\le h_0 - u_0` is known, given as ``upper_bound_bytes``).

    Examples:
      >>> device_step_peak({"bytes_in_use": 10, "peak_bytes_in_use": 50}, {"bytes_in_use": 30, "peak_bytes_in_use": 80})
      {'device_peak_bytes': 70, 'upper_bound_bytes': 70, 'high_water_mark_bytes': 80}
      >>> device_step_peak({"bytes_in_use": 10, "peak_bytes_in_use": 50}, {"bytes_in_use": 30, "peak_bytes_in_use": 50})
      {'device_peak_bytes': None, 'upper_bound_bytes': 40, 'high_water_mark_bytes': 50}
      >>> device_step_peak(None, None) is None
      True
    """
    if before is None or after is None:
        return None
    rose = after["peak_bytes_in_use"] > before["peak_bytes_in_use"]
    bound = after["peak_bytes_in_use"] - before["bytes_in_use"]
    return {
        "device_peak_bytes": bound if rose else None,
        "upper_bound_bytes": bound,
        "high_water_mark_bytes": after["peak_bytes_in_use"],
    }


def _machine() -> dict:
    dev = jax.devices()[0]
    stats = _device_memory()
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "backend": jax.default_backend(),
        "device": str(dev.device_kind),
        "devices": jax.device_count(),
        "device_memory_limit_bytes": (dev.memory_stats() or {}).get("bytes_limit") if stats else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "sam_optax": sam_optax.__version__,
    }


def batch_sizes(models: Sequence[str], batch_size: int | None = None) -> dict:
    """The batch of each model: ``batch_size`` for all, or each model's default (:data:`DEFAULT_BATCH`).

    Examples:
      >>> batch_sizes(["mlp", "convnet"])
      {'mlp': 128, 'convnet': 64}
      >>> batch_sizes(["convnet"], 256)
      {'convnet': 256}
    """
    unknown = [m for m in models if m not in DEFAULT_BATCH]
    if unknown:
        raise ValueError(f"models must be among {', '.join(MODELS)}, got {unknown}")
    out = {m: DEFAULT_BATCH[m] if batch_size is None else int(batch_size) for m in models}
    bad = {m: b for m, b in out.items() if b < 8 or b % 8}
    if bad:
        raise ValueError(f"batch_size must be a positive multiple of 8 (m-sharpness with m = batch / 8), got {bad}")
    return out


def run(
    *,
    batch_size: int | None = None,
    rounds: int = 15,
    steps_per_round: int = 10,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    convnet: dict | None = None,
    max_seconds: float | None = None,
    out_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Runs the benchmark and returns (and optionally saves) the results dict.

    ``batch_size=None`` gives each model its default batch (:data:`DEFAULT_BATCH`);
    ``convnet`` is ``resnet``'s keywords (default :data:`CONVNET_CPU`;
    :data:`RESNET18` for the GPU run); ``max_seconds`` bounds each model's run
    (see the module docstring).

    Inside ``experiments._interrupt.sigint_sets_flag`` (``sam-optax bench``),
    Ctrl-C stops the benchmark at the next safe point: during compilation the
    model in progress is dropped; during the timed rounds its table is made
    from the rounds already finished (``rounds_done``). Then ``"complete"`` is
    false and the remaining models are skipped.
    """
    lr, rho = 0.05, 0.05
    sizes = batch_sizes(models, batch_size)
    convnet = dict(convnet or CONVNET_CPU)
    results: dict[str, Any] = {
        "machine": _machine(),
        "settings": {
            "batch_size": batch_size,
            "batch_sizes": sizes,
            "rounds": rounds,
            "steps_per_round": steps_per_round,
            "seed": seed,
            "max_seconds": max_seconds,
            "convnet": {"widths": list(convnet["widths"]), "blocks": int(convnet["blocks"])},
        },
        "complete": False,  # every model, every round or the time budget (set at the end)
        "models": {},
    }
    all_models = _models(sizes, seed, convnet)
    interrupted = False
    try:
        for model_name in models:
            _interrupt.check()
            model, batch = all_models[model_name]
            results["models"][model_name] = _bench_model(
                model_name,
                model,
                batch,
                lr=lr,
                rho=rho,
                seed=seed,
                rounds=rounds,
                steps_per_round=steps_per_round,
                max_seconds=max_seconds,
                progress=progress,
            )
            interrupted = _interrupt.requested()
    except _interrupt.Interrupted:
        interrupted = True
    done = results["models"]
    results["complete"] = not interrupted and list(done) == list(models)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"step_cost_{results['machine']['backend']}.json")
        _io.write_json(path, results)  # a temporary file renamed over the old one
        results["saved_to"] = path
    return results


def _compile_all(model_name, methods, params0, batch, progress, deadline=None):
    """Compiles and warms up every method: ``(state, info)``; checks for Ctrl-C after each.
    Past ``deadline`` (``time.perf_counter()``) only the methods in :data:`REQUIRED` are compiled."""
    state, info = {}, {}
    for mth in methods:
        if deadline is not None and time.perf_counter() > deadline and mth.name not in REQUIRED:
            continue
        before = _device_memory()
        params = jax.tree.map(jnp.copy, params0)
        opt_state = mth.init(params)
        t0 = time.perf_counter()
        compiled = (mth.jitted or mth.step).lower(params, opt_state, batch).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(3):  # warm-up (the first calls also run the jit cache path)
            params, opt_state, value = mth.step(params, opt_state, batch)
        jax.block_until_ready(value)
        state[mth.name] = (params, opt_state)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
        info[mth.name] = {
            "compile_s": compile_s,
            "memory": _memory(compiled),
            "times": [],
            "device_memory": device_step_peak(before, _device_memory()),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        }
        if progress:
            print(f"[{model_name}] compiled {mth.name:<20} {compile_s:6.2f} s", flush=True)
        _interrupt.check()
    return state, info


def _time_rounds(
    model_name, methods, state, info, batch, *, rounds, steps_per_round, seed, progress, deadline=None
) -> int:
    """Interleaved timed rounds (times appended to ``info``); returns the rounds done
    (fewer than ``rounds`` after Ctrl-C, which is checked after each round, or once a
    round ends past ``deadline``)."""
    order_rng = np.random.default_rng(seed)
    for r in range(rounds):
        # a new order every round: no method always runs right after the same other one
        for i in order_rng.permutation(len(methods)):
            mth = methods[i]
            params, opt_state = state[mth.name]
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                params, opt_state, value = mth.step(params, opt_state, batch)
            jax.block_until_ready((params, value))
            dt = (time.perf_counter() - t0) / (steps_per_round * mth.steps_per_call)
            info[mth.name]["times"].append(dt / mth.updates_per_sam if mth.name.startswith("contrib") else dt)
            state[mth.name] = (params, opt_state)
        if progress:
            print(f"[{model_name}] round {r + 1}/{rounds}", flush=True)
        if _interrupt.requested() or (deadline is not None and time.perf_counter() > deadline):
            return r + 1
    return rounds


def _bench_model(
    model_name, model, batch, *, lr, rho, seed, rounds, steps_per_round, progress, max_seconds=None
) -> dict:
    """One model's results: ``batch_size``, ``param_bytes``, ``rounds_done``, ``skipped`` (time budget),
    the table of ``methods`` and ``targets``."""
    t0 = time.perf_counter()
    params0 = model.init(jax.random.PRNGKey(seed), batch["x"][:1])["params"]
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params0))
    methods = _methods(model, lr, rho, batch["x"].shape[0])
    compile_deadline = None if max_seconds is None else t0 + 0.6 * max_seconds
    state, info = _compile_all(model_name, methods, params0, batch, progress, deadline=compile_deadline)
    skipped = [m.name for m in methods if m.name not in info]
    methods = [m for m in methods if m.name in info]
    done = _time_rounds(
        model_name,
        methods,
        state,
        info,
        batch,
        rounds=rounds,
        steps_per_round=steps_per_round,
        seed=seed,
        progress=progress,
        deadline=None if max_seconds is None else t0 + max_seconds,
    )
    table = _summarize(methods, info, param_bytes)
    return {
        "batch_size": int(batch["x"].shape[0]),
        "param_bytes": param_bytes,
        "param_count": sum(x.size for x in jax.tree.leaves(params0)),
        "rounds_done": done,
        "skipped": skipped,
        "methods": table,
        "targets": targets(table, model_name, jax.default_backend()),
    }


def _summarize(methods, info, param_bytes) -> dict:
    def paired(name, ref):
        """Median over rounds of the ratio within each round (cancels drift between rounds)."""
        return statistics.median(a / b for a, b in zip(info[name]["times"], info[ref]["times"]))

    base_peak = info["base"]["memory"].get("peak_bytes")
    sam_peak = info["sam"]["memory"].get("peak_bytes")
    table = {}
    for mth in methods:
        peak = info[mth.name]["memory"].get("peak_bytes")
        dev = info[mth.name].get("device_memory")
        table[mth.name] = {
            "median_step_ms": 1e3 * statistics.median(info[mth.name]["times"]),
            "ratio_to_base": paired(mth.name, "base"),
            "ratio_to_sam": paired(mth.name, "sam"),
            "ratio_to_contrib_opaque": paired(mth.name, "contrib_opaque"),
            "compile_s": info[mth.name]["compile_s"],
            "flops": info[mth.name]["flops"],
            "bytes_accessed": info[mth.name]["bytes_accessed"],
            "peak_bytes": peak,
            "peak_ratio_to_sam": None if peak is None or not sam_peak else peak / sam_peak,
            "extra_peak_over_base_in_param_bytes": None
            if peak is None or base_peak is None
            else (peak - base_peak) / param_bytes,
            "device_memory": dev,
            "times_ms": [1e3 * t for t in info[mth.name]["times"]],
        }
    return table


def targets(table: dict, model_name: str, backend: str) -> dict:
    """The pass/fail table: ``{key: {value, target, applies, met}}`` for every entry of :data:`TARGETS`.

    ``value`` is ``None`` (and ``met`` ``None``) when the method was not run; a
    target that does not apply to this model on this backend (``cpu_models``)
    is reported with ``applies: false`` and ``met: None``.

    Examples:
      >>> row = {"ratio_to_base": 2.5}
      >>> targets({"looksam": row}, "convnet", "cpu")["looksam"]
      {'value': 2.5, 'target': '<= 1.23 x base', 'applies': False, 'met': None}
      >>> targets({"looksam": row}, "convnet", "gpu")["looksam"]["met"]
      False
    """
    checks = {}
    for key, tgt in TARGETS.items():
        row = table.get(tgt.row or key)
        value = None if row is None else row[_REF_FIELD[tgt.ref]]
        applies = backend != "cpu" or tgt.cpu_models is None or model_name in tgt.cpu_models
        checks[key] = {
            "value": value,
            "target": f"<= {tgt.limit} x {tgt.ref}",
            "applies": applies,
            "met": bool(value <= tgt.limit) if applies and value is not None else None,
        }
    return checks


def format_table(results: dict) -> str:
    """The console table of a run (``benchmarks/summarize.py`` makes the markdown one)."""
    m = results["machine"]
    lines = [f"machine: {m['backend']} ({m['device']}), jax {m['jax']}"]
    for model_name, res in results["models"].items():
        lines += [
            "",
            f"{model_name}: {res['param_bytes'] / 1e3:.0f} kB of params, batch {res.get('batch_size')}, "
            f"{res.get('rounds_done')} rounds"
            + (f"; skipped: {' '.join(res['skipped'])}" if res.get("skipped") else ""),
        ]
        lines.append(
            f"{'method':<20} {'ms/step':>9} {'x base':>8} {'x SAM':>7} {'x contrib':>10} {'compile s':>10} "
            f"{'peak kB':>9} {'peak x SAM':>11} {'dev peak kB':>12}"
        )
        for name, row in res["methods"].items():
            dev = (row.get("device_memory") or {}).get("device_peak_bytes")
            lines.append(
                f"{name:<20} {row['median_step_ms']:>9.3f} {row['ratio_to_base']:>8.3f} {row['ratio_to_sam']:>7.3f} "
                f"{row['ratio_to_contrib_opaque']:>10.3f} {row['compile_s']:>10.2f} "
                f"{(row['peak_bytes'] or 0) / 1e3:>9.0f} {_fmt(row.get('peak_ratio_to_sam'), '.2f'):>11} "
                f"{_fmt(dev and dev / 1e3, '.0f'):>12}"
            )
        lines.append(f"{'target':<20} {'value':>9} {'':>8} {'goal':<24} met")
        for key, chk in res["targets"].items():
            met = {True: "yes", False: "NO", None: "-"}[chk["met"]] + (
                "" if chk.get("applies", True) else " (report only)"
            )
            lines.append(f"{key:<20} {_fmt(chk['value'], '.3f'):>9} {'':>8} {chk['target']:<24} {met}")
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-optax bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="the batch of every model (default: " + ", ".join(f"{m} {b}" for m, b in DEFAULT_BATCH.items()) + ")",
    )
    parser.add_argument("--rounds", type=_positive_int, default=30)
    parser.add_argument("--steps-per-round", type=_positive_int, default=20)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--convnet-widths",
        nargs="+",
        type=_positive_int,
        default=list(CONVNET_CPU["widths"]),
        metavar="W",
        help="channels of the convnet's stages (ResNet-18: 64 128 256 512)",
    )
    parser.add_argument(
        "--convnet-blocks",
        type=_positive_int,
        default=CONVNET_CPU["blocks"],
        help="residual blocks per stage (ResNet-18: 2)",
    )
    parser.add_argument(
        "--max-seconds",
        type=_positive_float,
        default=None,
        help="time budget of each model: past 60%% of it no more methods are compiled (beyond "
        "base, sam, contrib_opaque); the timed rounds stop after the round that passes it",
    )
    parser.add_argument(
        "--threads",
        choices=("one", "all"),
        default="one",
        help="CPU: one pinned XLA thread (default, stable ratios) or XLA's default threads",
    )
    parser.add_argument(
        "--out",
        default=os.path.join("benchmarks", "results"),
        help="folder for the JSON (checked before anything runs; written to a temporary file and "
        "renamed over the old one; locked during the run: a second run into it stops at once)",
    )
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _parse(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size % 8:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of 8 (m-sharpness with m = batch / 8)")
    if os.sep in args.tag or (os.altsep and os.altsep in args.tag):
        parser.error(f"argument --tag: {args.tag!r} must not contain a path separator (it is a file name suffix)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"argument --out: {args.out!r} is a file, not a folder")
    return parser, args


def main(argv=None) -> int:
    """Runs in the current process (XLA flags must already be set).

    Every output path is checked and ``--out`` locked before anything is
    compiled; Ctrl-C saves what finished (``"complete": false``) and returns 130.
    """
    parser, args = _parse(argv)
    with _interrupt.sigint_sets_flag(), contextlib.ExitStack() as stack:
        path = os.path.join(args.out, f"step_cost_{jax.default_backend()}{args.tag}.json")
        try:
            _io.check_outputs(args.out, [os.path.basename(path)])
            stack.enter_context(_io.lock_folder(args.out, command=" ".join(["sam-optax bench", *(argv or [])])))
        except _io.OutputError as e:
            parser.error(f"argument --out: {e}")
        if args.threads == "one" and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        res = run(
            batch_size=args.batch_size,
            rounds=args.rounds,
            steps_per_round=args.steps_per_round,
            models=tuple(args.models),
            convnet={"widths": args.convnet_widths, "blocks": args.convnet_blocks},
            max_seconds=args.max_seconds,
            out_dir=None,
        )
        res["settings"]["threads"] = args.threads
        try:
            if res["models"]:
                _io.write_json(path, res)  # a temporary file renamed over the old one
        except OSError as e:
            print(f"sam-optax bench: error: cannot write {path}: {e}", file=sys.stderr)
            return 2
        if not res["complete"]:
            done = ", ".join(f"{m} ({r['rounds_done']} of {args.rounds} rounds)" for m, r in res["models"].items())
            print(
                "sam-optax bench: interrupted; "
                + (
                    f"saved {done} to {path}, marked incomplete"
                    if done
                    else "no model had reached its timed rounds, nothing saved"
                ),
                file=sys.stderr,
            )
            return 130
    print(format_table(res))
    print(f"\nsaved {path}")
    return 0


def launch(argv) -> int:
    """Starts ``python -m sam_optax.benchmarking`` with the XLA flags of ``--threads``.

    Ctrl-C (and SIGTERM, e.g. from ``timeout``) here is passed on to the
    benchmark process as SIGINT (it saves what finished, removes its lock and
    exits with 130); this process waits for it and returns its status.
    """
    _, args = _parse(argv)
    env = dict(os.environ)
    if args.threads == "one":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_FLAGS).strip()
    cmd = [sys.executable, "-m", "sam_optax.benchmarking", *argv]
    if threading.current_thread() is not threading.main_thread():
        return subprocess.call(cmd, env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the child starts ignoring SIGINT ...
    try:
        proc = subprocess.Popen(cmd, env=env)
        pending = []

        def forward(signum, frame):  # ... until its own handler (a flag) is installed
            pending.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)

        signal.signal(signal.SIGINT, forward)
        previous_term = signal.signal(signal.SIGTERM, forward)
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if pending:  # sent while the child was still starting (and ignoring it): again
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)
        if "previous_term" in locals():
            signal.signal(signal.SIGTERM, previous_term)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
