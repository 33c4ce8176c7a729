"""Step-cost benchmark: time of a training step of each method, as ratios in one run.

Run it with ``sam-optax bench`` or ``python benchmarks/step_cost.py`` (both
start ``python -m sam_optax.benchmarking`` in a fresh process). For each model
(a small MLP and a small CNN, Flax Linen) and a fixed batch, every method's
jitted training step (two-pass helper + rule + ``optax.apply_updates``, params
and optimizer state donated) is compiled, warmed up, and then timed in
interleaved rounds (in a new random order each round), so that all methods see the same machine
state. A ratio
is the median over rounds of the ratio of the two methods' times within a
round (paired, so slow drifts of the machine cancel); ratios are to the base
optimizer's step, to SAM and to ``optax.contrib.sam`` per SAM update. Peak memory comes from XLA's compiled
memory analysis of each step (inputs + temporaries + non-aliased outputs).

On CPU the benchmark runs XLA single-threaded and pinned to one core by
default (``--threads one``): on a small shared machine, multi-threaded XLA
makes ratios between identical programs drift by 10%; one pinned thread keeps
them within a few percent. ``--threads all`` measures the default setting.

Ctrl-C stops at the next safe point (after a compilation or a round), saves the
models whose timed rounds had started (from the rounds done, ``"complete":
false``) and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import contextlib
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import geometry
from sam_optax._argtypes import positive_int as _positive_int
from sam_optax.experiments import _interrupt, _io

TARGETS = {
    "sam": ("<=", 2.03, "base"),
    "wsam": ("<=", 1.03, "sam"),
    "gsam": ("<=", 1.03, "sam"),
    "asam": ("<=", 1.03, "sam"),
    "esam": ("<=", 1.45, "base"),
    "looksam": ("<=", 1.25, "base"),
    "looksam_host": ("<=", 1.25, "base"),
    "sam_chunks": ("<=", 1.10, "sam"),
    "sam_chunks_unroll": ("<=", 1.10, "sam"),
    "sam_vs_contrib": ("<=", 0.95, "contrib_opaque"),
    "sam_extra_memory": ("<=", 1.2, "param_bytes"),
}


class Method(NamedTuple):
    name: str
    step: Callable  # (params, opt_state, batch) -> (params, opt_state, loss); jitted unless `jitted` given
    init: Callable  # params -> opt_state
    steps_per_call: int = 1  # updates per timed call (LookSAM: a whole period)
    updates_per_sam: float = 1.0  # calls that make one SAM update (contrib transparent: 2)
    jitted: Optional[Callable] = None  # the jitted step to compile (when `step` is a host loop)


def _models(batch_size: int, seed: int):
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

    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)
    x_mlp = jnp.asarray(rng.normal(size=(batch_size, 40)), jnp.float32)
    x_cnn = jnp.asarray(rng.normal(size=(batch_size, 40, 1)), jnp.float32)
    return {
        "mlp": (MLP(), {"x": x_mlp, "y": y}),
        "cnn": (CNN(), {"x": x_cnn, "y": y}),
    }


def _methods(model, lr: float, rho: float, batch_size: int) -> list[Method]:
    def per_example(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def loss(params, batch):
        return jnp.mean(per_example(params, batch))

    base = optax.sgd(lr, momentum=0.9)
    methods = []

    def plain(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = base.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    methods.append(Method("base", jax.jit(plain, donate_argnums=(0, 1)), base.init))

    def make(name, tx, geo, lossf=loss, second_pass="auto", **kwargs):
        init, step = sam_optax.sharpness_aware_step(lossf, tx, geo, **kwargs)

        def timed(params, state, batch):
            params, state, out = step(params, state, batch, second_pass=second_pass)
            return params, state, out.loss

        return Method(name, jax.jit(timed, donate_argnums=(0, 1)), init)

    def add(*args, **kwargs):
        methods.append(make(*args, **kwargs))

    add("sam", sam_optax.sam(base), geometry.l2(rho))
    add("wsam", sam_optax.wsam(base, 0.9, learning_rate=lr), geometry.l2(rho))
    add("gsam", sam_optax.gsam(base, 0.3), geometry.l2(rho))
    add("asam", sam_optax.sam(base), geometry.adaptive(10 * rho))
    add("esam", sam_optax.sam(base), geometry.stochastic(geometry.l2(rho), 0.5), lossf=per_example,
        data=sam_optax.data.shards(selection=sam_optax.data.sharpness_sensitive(0.5)))
    add("sam_chunks", sam_optax.sam(base), geometry.l2(rho), data=sam_optax.data.shards(batch_size // 8))
    add("sam_chunks_unroll", sam_optax.sam(base), geometry.l2(rho), data=sam_optax.data.shards(batch_size // 8, chunk_mode="unroll"))

    # LookSAM k=5: time a whole period (1 full step + 4 reuse steps) per call, two ways:
    # the kind of step chosen inside jit by lax.cond (sharpness_aware_step reads it from the
    # LookSAM state), or two jitted steps chosen on the host (literal second_pass flags).
    k = 5
    look = sam_optax.looksam(base, k=k, alpha=0.7)
    look_geo = geometry.l2(rho)
    cond = make("looksam", look, look_geo)

    def period(one_step):
        def run_period(params, opt_state, batch):
            for _ in range(k):
                params, opt_state, value = one_step(params, opt_state, batch)
            return params, opt_state, value

        return run_period

    methods.append(cond._replace(step=period(cond.step), steps_per_call=k, jitted=cond.step))
    full_step = make("looksam_full", look, look_geo, second_pass=True).step
    reuse_step = make("looksam_reuse", look, look_geo, second_pass=False).step

    def host_period(params, opt_state, batch):
        params, opt_state, value = full_step(params, opt_state, batch)
        for _ in range(k - 1):
            params, opt_state, value = reuse_step(params, opt_state, batch)
        return params, opt_state, value

    methods.append(Method("looksam_host", host_period, cond.init, steps_per_call=k, jitted=full_step))

    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    opaque = optax.contrib.sam(base, adv, sync_period=2, opaque_mode=True)

    def contrib_opaque(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = opaque.update(grads, opt_state, params, grad_fn=lambda p, _: jax.grad(loss)(p, batch))
        return optax.apply_updates(params, updates), opt_state, value

    methods.append(Method("contrib_opaque", jax.jit(contrib_opaque, donate_argnums=(0, 1)), opaque.init))
    transparent = optax.contrib.sam(base, adv, sync_period=2, opaque_mode=False)

    def contrib_transparent(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = transparent.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    # its state caches the params themselves: copy them, or donation would donate a buffer twice
    methods.append(Method("contrib_transparent", jax.jit(contrib_transparent, donate_argnums=(0, 1)),
                          lambda p: jax.tree.map(jnp.copy, transparent.init(p)), updates_per_sam=0.5))
    return methods


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


def _machine() -> dict:
    return {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "sam_optax": sam_optax.__version__,
    }


def run(
    *,
    batch_size: int = 128,
    rounds: int = 15,
    steps_per_round: int = 10,
    seed: int = 0,
    models: tuple[str, ...] = ("mlp", "cnn"),
    out_dir: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Runs the benchmark and returns (and optionally saves) the results dict.

    Inside ``experiments._interrupt.sigint_sets_flag`` (``sam-optax bench``),
    Ctrl-C stops the benchmark at the next safe point: during compilation the
    model in progress is dropped; during the timed rounds its table is made
    from the rounds already finished (``rounds_done``). Then ``"complete"`` is
    false and the remaining models are skipped.
    """
    lr, rho = 0.05, 0.05
    results: dict[str, Any] = {
        "machine": _machine(),
        "settings": {"batch_size": batch_size, "rounds": rounds, "steps_per_round": steps_per_round, "seed": seed},
        "complete": False,  # every model, every round (set at the end)
        "models": {},
    }
    all_models = _models(batch_size, seed)
    try:
        for model_name in models:
            _interrupt.check()
            model, batch = all_models[model_name]
            results["models"][model_name] = _bench_model(model_name, model, batch, lr=lr, rho=rho, seed=seed,
                                                         rounds=rounds, steps_per_round=steps_per_round,
                                                         progress=progress)
    except _interrupt.Interrupted:
        pass
    done = results["models"]
    results["complete"] = list(done) == list(models) and all(m["rounds_done"] == rounds for m in done.values())
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"step_cost_{results['machine']['backend']}.json")
        _io.write_json(path, results)  # a temporary file renamed over the old one
        results["saved_to"] = path
    return results


def _compile_all(model_name, methods, params0, batch, progress):
    """Compiles and warms up every method: ``(state, info)``; checks for Ctrl-C after each."""
    state, info = {}, {}
    for mth in methods:
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
        info[mth.name] = {"compile_s": compile_s, "memory": _memory(compiled), "times": [],
                          "flops": float(cost.get("flops", 0.0)),
                          "bytes_accessed": float(cost.get("bytes accessed", 0.0))}
        if progress:
            print(f"[{model_name}] compiled {mth.name:<20} {compile_s:6.2f} s", flush=True)
        _interrupt.check()
    return state, info


def _time_rounds(model_name, methods, state, info, batch, *, rounds, steps_per_round, seed, progress) -> int:
    """Interleaved timed rounds (times appended to ``info``); returns the rounds done
    (fewer than ``rounds`` after Ctrl-C, which is checked after each round)."""
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
        if _interrupt.requested():
            return r + 1
    return rounds


def _bench_model(model_name, model, batch, *, lr, rho, seed, rounds, steps_per_round, progress) -> dict:
    """One model's results: ``param_bytes``, ``rounds_done``, the table of ``methods`` and ``targets``."""
    params0 = model.init(jax.random.PRNGKey(seed), batch["x"][:1])["params"]
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params0))
    methods = _methods(model, lr, rho, batch["x"].shape[0])
    state, info = _compile_all(model_name, methods, params0, batch, progress)
    done = _time_rounds(model_name, methods, state, info, batch, rounds=rounds, steps_per_round=steps_per_round,
                        seed=seed, progress=progress)
    table = _summarize(methods, info, param_bytes)
    return {"param_bytes": param_bytes, "rounds_done": done, "methods": table, "targets": _targets(table)}


def _summarize(methods, info, param_bytes) -> dict:
    def paired(name, ref):
        """Median over rounds of the ratio within each round (cancels drift between rounds)."""
        return statistics.median(a / b for a, b in zip(info[name]["times"], info[ref]["times"]))

    base_peak = info["base"]["memory"].get("peak_bytes")
    table = {}
    for mth in methods:
        peak = info[mth.name]["memory"].get("peak_bytes")
        table[mth.name] = {
            "median_step_ms": 1e3 * statistics.median(info[mth.name]["times"]),
            "ratio_to_base": paired(mth.name, "base"),
            "ratio_to_sam": paired(mth.name, "sam"),
            "ratio_to_contrib_opaque": paired(mth.name, "contrib_opaque"),
            "compile_s": info[mth.name]["compile_s"],
            "flops": info[mth.name]["flops"],
            "bytes_accessed": info[mth.name]["bytes_accessed"],
            "peak_bytes": peak,
            "extra_peak_over_base_in_param_bytes": None if peak is None or base_peak is None
            else (peak - base_peak) / param_bytes,
            "times_ms": [1e3 * t for t in info[mth.name]["times"]],
        }
    return table


def _targets(table) -> dict:
    checks = {}
    for key, (op, limit, ref) in TARGETS.items():
        if key == "sam_vs_contrib":
            value = table["sam"]["ratio_to_contrib_opaque"]
        elif key == "sam_extra_memory":
            value = table["sam"]["extra_peak_over_base_in_param_bytes"]
        elif ref == "sam":
            value = table[key]["ratio_to_sam"]
        else:
            value = table[key]["ratio_to_base"]
        checks[key] = {"value": value, "target": f"{op} {limit} x {ref}", "met": bool(value <= limit)}
    return checks


def format_table(results: dict) -> str:
    lines = [f"machine: {results['machine']['backend']} ({results['machine']['device']}), "
             f"jax {results['machine']['jax']}, batch {results['settings']['batch_size']}"]
    for model_name, res in results["models"].items():
        lines.append("")
        lines.append(f"{model_name}: {res['param_bytes'] / 1e3:.0f} kB of params")
        lines.append(f"{'method':<20} {'ms/step':>9} {'x base':>8} {'x contrib':>10} {'compile s':>10} "
                     f"{'peak kB':>9} {'extra/params':>13}")
        for name, row in res["methods"].items():
            extra = row["extra_peak_over_base_in_param_bytes"]
            lines.append(
                f"{name:<20} {row['median_step_ms']:>9.3f} {row['ratio_to_base']:>8.3f} "
                f"{row['ratio_to_contrib_opaque']:>10.3f} {row['compile_s']:>10.2f} "
                f"{(row['peak_bytes'] or 0) / 1e3:>9.0f} {'' if extra is None else f'{extra:.2f}':>13}")
        lines.append(f"{'target':<20} {'value':>9} {'':>8} {'goal':<24} met")
        for key, chk in res["targets"].items():
            lines.append(f"{key:<20} {chk['value']:>9.3f} {'':>8} {chk['target']:<24} {'yes' if chk['met'] else 'NO'}")
    return "\n".join(lines)


SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-optax bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=_positive_int, default=128)
    parser.add_argument("--rounds", type=_positive_int, default=30)
    parser.add_argument("--steps-per-round", type=_positive_int, default=20)
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    parser.add_argument("--threads", choices=("one", "all"), default="one",
                        help="CPU: one pinned XLA thread (default, stable ratios) or XLA's default threads")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"),
                        help="folder for the JSON (checked before anything runs; written to a temporary file and "
                             "renamed over the old one; locked during the run: a second run into it stops at once)")
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    return parser


def _parse(argv) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size % 8:
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
        res = run(batch_size=args.batch_size, rounds=args.rounds, steps_per_round=args.steps_per_round,
                  models=tuple(args.models), out_dir=None)
        res["settings"]["threads"] = args.threads
        try:
            if res["models"]:
                _io.write_json(path, res)  # a temporary file renamed over the old one
        except OSError as e:
            print(f"sam-optax bench: error: cannot write {path}: {e}", file=sys.stderr)
            return 2
        if not res["complete"]:
            done = ", ".join(f"{m} ({r['rounds_done']} of {args.rounds} rounds)" for m, r in res["models"].items())
            print("sam-optax bench: interrupted; " + (f"saved {done} to {path}, marked incomplete" if done
                                                      else "no model had reached its timed rounds, nothing saved"),
                  file=sys.stderr)
            return 130
    print(format_table(res))
    print(f"\nsaved {path}")
    return 0


def launch(argv) -> int:
    """Starts ``python -m sam_optax.benchmarking`` with the XLA flags of ``--threads``.

    Ctrl-C here is passed on to the benchmark process (which saves what finished
    and exits with 130); this process waits for it and returns its status.
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
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
