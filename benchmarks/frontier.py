"""Accuracy against step cost of every sharpness-aware method: one command, resumable, with progress bars.

    python benchmarks/frontier.py                  # runs what is missing, then writes the report
    python benchmarks/frontier.py --report         # only rebuild the tables and the plot from saved runs
    python benchmarks/frontier.py --write-docs     # also the block in docs/benchmarks/frontier.md
    python benchmarks/frontier.py --epochs 1 --seeds 1 --methods sgd sam msam --skip-cost   # a smoke run

Setup (benchmarks/claims.py's): MNIST-1D generated locally (4000 samples, 3200 train / 800 test),
the 1-D CNN of ``sam_optax.experiments``, 30 epochs of batch 128, SGD with momentum 0.9 (lr 0.05,
cosine, L2 5e-4 in the base) as every method's base; the recipes of
``sam_optax/experiments/methods.py``.

1. Tuning (seed 0, clean labels, the last 640 training examples as validation): each method's key
   hyperparameter over a grid of at most 4 values from its paper's range (:data:`GRIDS`): the radius
   of SAM, ASAM, ESAM, RST, AE-SAM and late-phase SAM; periodic SAM's radius at interval 10;
   MSAM's rho; ARWP's sigma_0; m-RWP's sigma; SAF's and MESA's weight lambda; and, at SAM's chosen
   rho, WSAM's gamma, GSAM's alpha and LookSAM's and AE-LookSAM's alpha (LookSAM's reuse steps add
   alpha |g| along the stored direction whatever rho is, so alpha is its key knob).
2. Accuracy: every method with its tuned value, 3 seeds (init and batch order; the same data).
3. Cost: the step time of each method as a ratio to the base (SGD) step, the same recipes and
   the same CNN at batch 128 on the training data, measured in one separate process (XLA on one
   pinned thread, as ``sam-optax bench``): every step compiled and warmed up, then interleaved
   rounds in a new random order, :data:`COST_STEPS` consecutive steps per method per round (whole
   periods of periodic SAM's 10 and LookSAM's 5 steps), the median over rounds of the paired
   ratio. For each method the fraction f of timed steps that ran the second gradient pass is
   counted, and its cost predicted from passes, 1 + f (SAM/base - 1); the naive 1 + f is shown too.
   Late-phase SAM's two phases are timed as two rows (a window at the run's start would see no
   SAM step) and weighted by the run's fractions (``late_start`` base, the rest SAM).
   ``periodic_cond`` (cost only) is periodic SAM as one program with the second pass under
   ``lax.cond`` (``second_pass="auto"``).

On CPU the harness runs every scheduler (LookSAM, periodic, RST, AE-SAM) as programs picked on the
host (``sam_optax.looksam_schedule``, ``sam_optax.host_chosen_step``): XLA:CPU runs a convolution's
gradient inside a conditional on a slow path (jax-ml/jax#12868), which ``periodic_cond`` shows (its
cost is far above what its pass count predicts). On GPU / TPU the one-program form is the default
of ``sharpness_aware_step``; not measured here.

Targets: (a) a method at <= 1.10 x the base step that keeps >= 75% of SAM's accuracy gain over SGD
(means over the seeds); (b) every scheduled method's measured cost within 0.05 of its predicted one.

Run time (estimated from single runs timed on a shared 2-core machine, not from a full run): 43
tuning runs and 36 test runs of 600-750 steps, about 5-15 s each, plus about 2 minutes of cost
timing: about 15-20 minutes on 2 CPU cores. Every finished run is appended to ``runs.jsonl`` (the
cost measurement is one row too); a rerun skips it. Runs of other settings (``--epochs``,
``--samples``) stay in the store; the report reads only the current settings'. Outputs in
``benchmarks/results/frontier/``: ``runs.jsonl``, ``summary.json``, ``report.md``, ``frontier.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import claims  # noqa: E402  (the claims' setup and resumable store)

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "frontier"
PAGE = ROOT / "docs" / "benchmarks" / "frontier.md"
START, END = "<!-- frontier:start -->", "<!-- frontier:end -->"
EPOCHS, BATCH, MODEL, SAMPLES = claims.EPOCHS, claims.BATCH, claims.MODEL, claims.SAMPLES
VALIDATION = 640  # the last training examples, as claims.py

METHODS = (
    "sgd",
    "sam",
    "wsam",
    "gsam",
    "asam",
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
)
SCHEDULED = ("looksam", "periodic", "rst", "ae_sam", "late_sam", "ae_looksam")  # second pass on some steps only
# method -> (Hyper field, grid). The SAM-like radii bracket claims.py's chosen rho 0.1 (rho 0.5 diverged there).
GRIDS = {
    "sam": ("rho", (0.02, 0.05, 0.1, 0.2)),
    "asam": ("asam_rho", (0.1, 0.2, 0.5, 1.0)),  # ASAM's adaptive radius (paper: 0.5 on CIFAR-10)
    "esam": ("rho", (0.005, 0.01, 0.02, 0.05)),  # its perturbation has norm rho / beta (claims: 0.01)
    "periodic": ("periodic_rho", (0.05, 0.1, 0.2, 0.5)),  # Composer: 0.5 at interval 10
    "rst": ("rho", (0.02, 0.05, 0.1, 0.2)),
    "ae_sam": ("rho", (0.02, 0.05, 0.1, 0.2)),
    "msam": ("msam_rho", (0.03, 0.1, 0.3, 1.0)),  # official class default 0.3 (CIFAR README: 3)
    "rwp": ("rwp_sigma", (0.001, 0.002, 0.005, 0.01)),  # official 1x script: 0.001, ramped x11
    "late_sam": ("rho", (0.02, 0.05, 0.1, 0.2)),
    "mrwp": ("mrwp_sigma", (0.002, 0.005, 0.01, 0.02)),  # m-ARWP: 0.01 (argparse), 0.015 (script)
    "saf": ("saf_weight", (0.1, 0.3, 1.0)),  # paper 0.3 (code argparse 0.16), times tau^2 on the KL
    "mesa": ("mesa_weight", (0.3, 0.8, 2.0)),  # paper 0.8
    # at SAM's chosen rho:
    "wsam": ("wsam_gamma", (0.5, 0.7, 0.8, 0.9)),
    "gsam": ("gsam_alpha", (0.01, 0.1, 0.3)),
    "looksam": ("looksam_alpha", (0.1, 0.2, 0.4, 0.7)),  # the paper's 0.7
    "ae_looksam": ("looksam_alpha", (0.1, 0.2, 0.4, 0.7)),
}
AT_SAM_RHO = ("wsam", "gsam", "looksam", "ae_looksam")
COST_ROUNDS, COST_STEPS = 30, 20  # COST_STEPS: a multiple of periodic's 10 and LookSAM's 5
MAX_COST, MIN_GAIN, PRED_TOL = 1.10, 0.75, 0.05


class Settings(NamedTuple):
    methods: tuple
    seeds: int = 3
    epochs: int = EPOCHS
    samples: int = SAMPLES
    cost_rounds: int = COST_ROUNDS
    cost_steps: int = COST_STEPS


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------


def _config(s: Settings, experiment, method, seed, hyper, *, validation=False):
    return {
        "experiment": experiment,
        "method": method,
        "seed": seed,
        "data_seed": 0,
        "validation": validation,
        "hyper": hyper,
        "epochs": s.epochs,
        "batch": BATCH,
        "model": MODEL,
        "samples": s.samples,
    }


def sam_rho(store, s: Settings) -> float:
    """SAM's chosen radius (the default 0.05 before its search has run)."""
    best = _best(store, search_configs(store, s, "sam"))
    return best["rho"] if best else 0.05


def search_configs(store, s: Settings, method) -> list:
    """The tuning runs of ``method`` (none for SGD or a method without a grid)."""
    if method not in GRIDS:
        return []
    field, grid = GRIDS[method]
    fixed = {"rho": sam_rho(store, s)} if method in AT_SAM_RHO else {}
    return [_config(s, "search", method, 0, dict(fixed, **{field: v}), validation=True) for v in grid]


def _best(store, configs) -> dict | None:
    """The hyper of the best validation accuracy (ties: the first in the grid)."""
    scored = [(store.get(c)["result"]["test_accuracy"], -i, c) for i, c in enumerate(configs) if store.get(c)]
    return max(scored, key=lambda t: t[:2])[2]["hyper"] if scored else None


def tuned(store, s: Settings) -> dict:
    """``{method: hyper}``: each method's chosen values ({} for SGD)."""
    out = {}
    for m in s.methods:
        best = _best(store, search_configs(store, s, m))
        if best is None and m in AT_SAM_RHO:
            best = {"rho": sam_rho(store, s)}
        out[m] = best or {}
    return out


def accuracy_configs(store, s: Settings) -> list:
    t = tuned(store, s)
    return [_config(s, "test", m, seed, t[m]) for m in s.methods for seed in range(s.seeds)]


def cost_methods(s: Settings) -> list:
    """The timed rows: the base (SGD) and SAM (the references), the methods, and periodic_cond."""
    names = ["sgd", "sam"] + [m for m in s.methods if m not in ("sgd", "sam")]
    names = [p for m in names for p in (LATE_PHASES if m == "late_sam" else (m,))]
    return names + (["periodic_cond"] if "periodic" in s.methods else [])


# Late-phase SAM is the base step, then the SAM step: each phase is timed on its own (a window of
# the run's start would see no SAM step) and the cost is their mean weighted by the run's fractions.
LATE_PHASES = ("late_sam:base", "late_sam:sam")


def _recipe_name(row: str) -> str:
    return "periodic" if row == "periodic_cond" else row.split(":")[0]


def combine_late_phases(rows: dict, late_start: float) -> dict:
    """``rows`` with ``late_sam``: the phases' ratios weighted by the run's fractions
    (``late_start`` base, ``1 - late_start`` SAM), f = ``1 - late_start``.

    Examples:
      >>> rows = {"sam": {"ratio_to_base": 2.0, "predicted": 2.0},
      ...         "late_sam:base": {"ratio_to_base": 1.0, "predicted": 1.0, "median_step_ms": 1.0},
      ...         "late_sam:sam": {"ratio_to_base": 2.1, "predicted": 2.0, "median_step_ms": 2.1}}
      >>> r = combine_late_phases(rows, 0.8)["late_sam"]
      >>> round(r["ratio_to_base"], 3), round(r["predicted"], 3), round(r["second_pass_fraction"], 2)
      (1.22, 1.2, 0.2)
    """
    if not all(p in rows for p in LATE_PHASES):
        return rows
    base, sam = (rows[p] for p in LATE_PHASES)
    f = 1.0 - late_start
    mix = lambda key: (1 - f) * base[key] + f * sam[key]  # noqa: E731
    rows = dict(rows)
    rows["late_sam"] = {
        "ratio_to_base": mix("ratio_to_base"),
        "median_step_ms": mix("median_step_ms"),
        "second_pass_fraction": f,
        "predicted": 1 + f * (rows["sam"]["ratio_to_base"] - 1),
        "naive": 1 + f,
        "phases": {p: rows[p]["ratio_to_base"] for p in LATE_PHASES},
    }
    return rows


def cost_config(store, s: Settings) -> dict:
    t = tuned(store, s)
    hypers = {m: t.get(_recipe_name(m), {}) for m in cost_methods(s)}
    return {
        "experiment": "cost",
        "methods": cost_methods(s),
        "hypers": hypers,
        "rounds": s.cost_rounds,
        "steps_per_round": s.cost_steps,
        "epochs": s.epochs,
        "batch": BATCH,
        "model": MODEL,
        "samples": s.samples,
    }


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------

_DATA = {}


def _dataset(samples: int, validation: bool):
    """claims.py's data (data seed 0, clean labels); the validation split is the last
    :data:`VALIDATION` training examples (a fifth of them for a small ``samples``)."""
    from sam_optax.experiments import datasets

    if samples not in _DATA:
        _DATA[samples] = datasets.load("mnist1d", seed=0, num_samples=samples)
    data = _DATA[samples]
    if not validation:
        return data
    return claims.validation_split(data, min(VALIDATION, len(data.x_train) // 5))


def _run(store, config, bar):
    found = store.get(config)
    if found is None:
        from sam_optax.experiments import train_method
        from sam_optax.experiments.methods import Hyper

        bar.set_postfix_str(f"{config['method']} seed {config['seed']} {config['hyper']}")
        res = train_method(
            config["method"],
            _dataset(config["samples"], config["validation"]),
            model=MODEL,
            epochs=config["epochs"],
            batch_size=BATCH,
            hyper=Hyper(**config["hyper"]),
            seed=config["seed"],
            hessian=False,
            progress=False,
        )
        store.add(config, res.to_dict())
    bar.update(1)


def _measure_cost(store, config) -> None:
    """The cost rows, timed in a fresh process with XLA on one thread (``sam-optax bench``'s flags)."""
    if store.get(config) is not None:
        return
    from sam_optax import benchmarking

    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + benchmarking.SINGLE_THREAD_FLAGS).strip()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "config.json"), os.path.join(tmp, "cost.json")
        pathlib.Path(src).write_text(json.dumps(config))
        rc = subprocess.call([sys.executable, os.path.abspath(__file__), "--cost-worker", src, dst], env=env)
        if rc != 0:
            raise RuntimeError(f"the cost measurement failed (exit status {rc})")
        store.add(config, json.loads(pathlib.Path(dst).read_text()))


# --------------------------------------------------------------------------------------------
# cost (in the worker process)
# --------------------------------------------------------------------------------------------


def _cost_steps(config, ctx, spe):
    """``{name: step}`` of the timed rows, as the harness trains them (``training._jit_step``)."""
    import jax

    from sam_optax.experiments import training
    from sam_optax.experiments.methods import Hyper, build_method

    steps, inits, two_pass = {}, {}, {}
    for name in config["methods"]:
        hp = Hyper(**config["hypers"][name])
        if name in LATE_PHASES:  # the whole run in one phase: SAM from a step after the last, or from 0
            hp = dataclasses.replace(hp, late_start=2.0 if name.endswith("base") else 0.0)
        recipe = build_method(_recipe_name(name), hp, steps_per_epoch=spe, epochs=config["epochs"], seed=0)
        init, step, get = training._make_step(recipe, ctx.loss_fn, ctx.per_example_loss, ctx)
        inits[name] = init
        two_pass[name] = recipe.geometry is not None and recipe.make_step is None
        if name == "periodic_cond":  # one program, the second pass under lax.cond
            steps[name] = lambda st, step=step: jax.jit(step, donate_argnums=(0, 1))
        else:
            steps[name] = lambda st, step=step, get=get, h=recipe.host_schedule: training._jit_step(step, st, get, h)
    return steps, inits, two_pass


def cost_worker(config: dict, progress: bool = True, pin: bool = True) -> dict:
    """Times every row of ``config`` (see the module docstring); runs in its own process,
    pinned to one core (``pin``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sam_optax import benchmarking
    from sam_optax.experiments import training
    from sam_optax.experiments.methods import Hyper
    from sam_optax.experiments.models import logits_fn, make_model

    if pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    data = _dataset(config["samples"], False)
    n, batch_size = len(data.x_train), config["batch"]
    spe = n // batch_size
    net = make_model(config["model"], data.num_classes)
    ctx = training.model_context(logits_fn(net), n, data.num_classes)
    order = np.random.default_rng(0).permutation(n)[: spe * batch_size].reshape(spe, batch_size)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    batches = [{"x": x[i], "y": y[i], "index": i} for i in map(jnp.asarray, order)]
    params0 = net.init(jax.random.PRNGKey(0), x[:1])["params"]
    makers, inits, two_pass = _cost_steps(config, ctx, spe)
    k, live, info = config["steps_per_round"], {}, {}

    def run(name, count):
        fn, params, state, pos = live[name]
        for _ in range(count):
            params, state, loss = fn(params, state, batches[pos % len(batches)])
            pos += 1
        jax.block_until_ready((params, state, loss))
        live[name] = (fn, params, state, pos)
        return int(state.second_passes)

    for name in config["methods"]:  # compile and warm up: one round's worth of steps (whole periods)
        params = jax.tree.map(jnp.copy, params0)
        state = inits[name](params, training.init_key(0))
        live[name] = (makers[name](state), params, state, 0)
        t0 = time.perf_counter()
        passes = run(name, k)
        info[name] = {"warmup_s": time.perf_counter() - t0, "times": [], "passes": [], "last": passes}
        if progress:
            print(f"[cost] compiled {name:<14} {info[name]['warmup_s']:6.2f} s", flush=True)
    rng = np.random.default_rng(0)
    for r in range(config["rounds"]):
        for i in rng.permutation(len(config["methods"])):
            name = config["methods"][i]
            t0 = time.perf_counter()
            passes = run(name, k)
            info[name]["times"].append((time.perf_counter() - t0) / k)
            info[name]["passes"].append(passes - info[name]["last"])
            info[name]["last"] = passes
        if progress and (r + 1) % 5 == 0:
            print(f"[cost] round {r + 1}/{config['rounds']}", flush=True)
    rows = summarize_cost(
        {m: info[m]["times"] for m in info},
        {m: [p / k for p in info[m]["passes"]] if two_pass[m] else None for m in info},
    )
    for m in rows:
        rows[m]["warmup_s"] = info[m]["warmup_s"]
    late = config["hypers"].get(LATE_PHASES[0], {}).get("late_start", Hyper().late_start)
    return {"machine": benchmarking._machine(), "rows": combine_late_phases(rows, late)}


def summarize_cost(times: dict, fractions: dict, base: str = "sgd", sam: str = "sam") -> dict:
    """Per row: the median step time, the median over rounds of the paired ratio to
    ``base``, the fraction f of steps that ran the second pass (``None``: a one-pass
    step), the cost predicted from passes ``1 + f (SAM/base - 1)`` and the naive ``1 + f``.

    Examples:
      >>> rows = summarize_cost({"sgd": [1.0, 2.0], "sam": [2.0, 4.0], "p": [1.2, 2.4]},
      ...                       {"sgd": None, "sam": [1.0, 1.0], "p": [0.1, 0.1]})
      >>> rows["p"]["ratio_to_base"], round(rows["p"]["predicted"], 3), rows["p"]["naive"]
      (1.2, 1.1, 1.1)
    """

    def paired(name):
        return statistics.median(a / b for a, b in zip(times[name], times[base]))

    sam_ratio = paired(sam)
    rows = {}
    for name, ts in times.items():
        f = None if fractions.get(name) is None else statistics.fmean(fractions[name])
        rows[name] = {
            "median_step_ms": 1e3 * statistics.median(ts),
            "ratio_to_base": paired(name),
            "second_pass_fraction": f,
            "predicted": None if f is None else 1 + f * (sam_ratio - 1),
            "naive": None if f is None else 1 + f,
            "times_ms": [1e3 * t for t in ts],
            "fractions": fractions.get(name),
        }
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def pareto_front(points: dict) -> list:
    """The names of the points ``{name: (cost, accuracy)}`` that no other point beats on
    both (lower or equal cost and higher or equal accuracy, one strictly), by cost.

    Examples:
      >>> pareto_front({"a": (1.0, 0.80), "b": (2.0, 0.90), "c": (1.5, 0.78), "d": (1.1, 0.85)})
      ['a', 'd', 'b']
    """

    def beaten(c, a):
        return any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for c2, a2 in points.values())

    return sorted((n for n, (c, a) in points.items() if not beaten(c, a)), key=lambda n: points[n])


def build_rows(s: Settings, t: dict, accs: dict, train_fractions: dict, cost: dict | None, speeds: dict) -> list:
    """One row per method (and ``periodic_cond``): tuned values, accuracy, cost and passes.

    The cost is the interleaved timing's ratio when ``cost`` (its rows) is given, else the
    ratio of the training runs' mean steps/s to SGD's (not interleaved; ``cost_source``)."""
    rows = []
    names = list(s.methods) + (["periodic_cond"] if cost and "periodic_cond" in cost else [])
    for m in names:
        acc = stat(accs.get("periodic" if m == "periodic_cond" else m, []))
        row = {
            "method": m,
            "hyper": t.get("periodic" if m == "periodic_cond" else m, {}),
            "accuracy": acc,
            "train_second_pass_fraction": _mean(train_fractions.get(m)),
            "cost": None,
            "cost_source": None,
            "second_pass_fraction": None,
            "predicted": None,
            "naive": None,
        }
        if cost and m in cost:
            c = cost[m]
            row.update(
                cost=c["ratio_to_base"],
                cost_source="interleaved",
                second_pass_fraction=c["second_pass_fraction"],
                predicted=c["predicted"],
                naive=c["naive"],
            )
        elif speeds.get(m) and speeds.get("sgd"):
            row.update(cost=_mean(speeds["sgd"]) / _mean(speeds[m]), cost_source="training steps/s")
        rows.append(row)
    sgd = next((r["accuracy"]["mean"] for r in rows if r["method"] == "sgd" and r["accuracy"]), None)
    points = {}
    for r in rows:
        r["gain_vs_sgd"] = None if sgd is None or not r["accuracy"] else r["accuracy"]["mean"] - sgd
        if r["cost"] is not None and r["accuracy"] and r["method"] != "periodic_cond":
            points[r["method"]] = (r["cost"], r["accuracy"]["mean"])
    front = pareto_front(points)
    for r in rows:
        r["pareto"] = r["method"] in front
    return rows


def _mean(values):
    values = [v for v in (values or []) if v is not None]
    return statistics.fmean(values) if values else None


def check_targets(rows: list) -> dict:
    """(a) a method at <= 1.10 x base keeping >= 75% of SAM's gain over SGD; (b) each scheduled
    method's measured cost within 0.05 of ``1 + f (SAM/base - 1)``.

    Examples:
      >>> acc = lambda m: {"mean": m, "std": 0.0, "n": 3}
      >>> rows = [{"method": "sgd", "accuracy": acc(0.88), "cost": 1.0},
      ...         {"method": "sam", "accuracy": acc(0.90), "cost": 2.0},
      ...         {"method": "msam", "accuracy": acc(0.896), "cost": 1.05},
      ...         {"method": "periodic", "accuracy": acc(0.89), "cost": 1.30, "predicted": 1.1,
      ...          "naive": 1.1, "second_pass_fraction": 0.1, "cost_source": "interleaved"}]
      >>> t = check_targets(rows)
      >>> t["a"]["met"], t["a"]["method"], round(t["a"]["value"], 2), t["b"]["periodic"]["met"]
      (True, 'msam', 0.8, False)
    """
    by = {r["method"]: r for r in rows}
    a = {
        "goal": f"cost <= {MAX_COST} x SGD and >= {MIN_GAIN:.0%} of SAM's gain over SGD",
        "value": None,
        "method": None,
        "candidates": [],
        "met": None,
    }
    if by.get("sgd", {}).get("accuracy") and by.get("sam", {}).get("accuracy"):
        sgd, sam = by["sgd"]["accuracy"]["mean"], by["sam"]["accuracy"]["mean"]
        if sam > sgd:
            cheap = [
                r
                for r in rows
                if r["method"] not in ("sgd", "sam", "periodic_cond")
                and r["accuracy"]
                and r.get("cost") is not None
                and r["cost"] <= MAX_COST
            ]
            kept = {r["method"]: (r["accuracy"]["mean"] - sgd) / (sam - sgd) for r in cheap}
            a["candidates"] = sorted(m for m, k in kept.items() if k >= MIN_GAIN)
            if kept:
                a["method"] = max(kept, key=kept.get)
                a["value"] = kept[a["method"]]
            a["met"] = bool(a["candidates"])
        else:
            a["note"] = "SAM did not beat SGD: no gain to keep"
    b = {}
    for r in rows:
        if r["method"] in SCHEDULED + ("periodic_cond",) and r.get("predicted") is not None:
            diff = r["cost"] - r["predicted"]
            b[r["method"]] = {
                "measured": r["cost"],
                "predicted": r["predicted"],
                "naive": r["naive"],
                "fraction": r["second_pass_fraction"],
                "diff": diff,
                "met": abs(diff) <= PRED_TOL,
            }
    return {"a": a, "b": b}


def collect(store, s: Settings) -> dict:
    """The summary of the saved runs of the settings ``s``."""
    t = tuned(store, s)
    search, accs, fractions, speeds, runs = {}, {}, {}, {}, []
    for m in s.methods:
        for c in search_configs(store, s, m):
            r = store.get(c)
            runs.append(r)
            if r:
                label = ", ".join(f"{k}={v}" for k, v in c["hyper"].items())
                search.setdefault(m, {})[label] = r["result"]["test_accuracy"]
    for c in accuracy_configs(store, s):
        r = store.get(c)
        runs.append(r)
        if r:
            res = r["result"]
            accs.setdefault(c["method"], []).append(res["test_accuracy"])
            fractions.setdefault(c["method"], []).append(res.get("second_pass_fraction"))
            speeds.setdefault(c["method"], []).append(res.get("steps_per_second"))
    cost = store.get(cost_config(store, s))
    rows = build_rows(s, t, accs, fractions, cost["result"]["rows"] if cost else None, speeds)
    return {
        "settings": s._asdict(),
        "tuned": t,
        "search": search,
        "rows": rows,
        "targets": check_targets(rows),
        "cost_machine": cost["result"]["machine"] if cost else None,
        "runs": sum(r is not None for r in runs),
        "runs_expected": len(runs),
        "train_minutes": sum(r["result"]["seconds"] for r in runs if r) / 60,
    }


def _pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}"


def _num(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _machine(m: dict | None) -> str:
    """Where the cost was timed, as the cost run recorded it (``""`` when it recorded nothing)."""
    if not m or "platform" not in m:
        return ""
    return f", on a {m['cpu_count']}-core {m['backend'].upper()} machine: {m['platform']}, jax {m['jax']}"


def report_markdown(summary: dict) -> str:
    s = summary["settings"]
    rows = summary["rows"]
    source = {r["cost_source"] for r in rows if r["cost_source"]}
    lines = [
        f"MNIST-1D (generated locally, {s['samples']} samples), 1-D CNN, {s['epochs']} epochs, batch {BATCH}, "
        f"SGD momentum 0.9 (lr 0.05, cosine, L2 5e-4) as every method's base; test accuracy in %, mean ± std "
        f"over {s['seeds']} seeds, each method's key value tuned on a validation split "
        f"(`python benchmarks/frontier.py`, results in `benchmarks/results/frontier/`). Cost: the step's time "
        f"as a ratio to the SGD step"
        + (
            f" (interleaved timing in one process, XLA on one CPU thread{_machine(summary.get('cost_machine'))})"
            if source == {"interleaved"}
            else " (from the training runs' steps/s, not interleaved: no cost timing saved)"
        )
        + "; f: the "
        f"fraction of steps that ran the second gradient pass; predicted: 1 + f (SAM/SGD - 1). "
        f"{summary['runs']} of {summary['runs_expected']} training runs, {summary['train_minutes']:.0f} "
        f"minutes of training.",
        "",
        "| method | tuned | test acc. | vs SGD | cost (x SGD) | f | predicted | naive 1 + f | Pareto |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        acc = r["accuracy"]
        hyper = ", ".join(f"{k}={v}" for k, v in r["hyper"].items()) or "-"
        name = r["method"] + (" (cost only)" if r["method"] == "periodic_cond" else "")
        acc_text = "-" if not acc else f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f}"
        gain = "" if r["method"] == "sgd" or r["gain_vs_sgd"] is None else f"{100 * r['gain_vs_sgd']:+.1f}"
        lines.append(
            f"| {name} | {hyper} | {acc_text} | {gain} | {_num(r['cost'])} | "
            f"{_num(r['second_pass_fraction'])} | {_num(r['predicted'])} | {_num(r['naive'])} | "
            f"{'yes' if r['pareto'] else ''} |"
        )
    lines += ["", *targets_markdown(summary["targets"])]
    return "\n".join(lines)


def targets_markdown(targets: dict) -> list:
    met = {True: "yes", False: "NO", None: "-"}
    a = targets["a"]
    value = (
        "-" if a["method"] is None else (f"best at <= {MAX_COST}x: {a['method']}, {_pct(a['value'], 0)}% of SAM's gain")
    )
    lines = [
        "| target | value | goal | met |",
        "| --- | --- | --- | --- |",
        f"| (a) cheap and good | {value}{'; ' + a['note'] if a.get('note') else ''} | {a['goal']} | {met[a['met']]} |",
    ]
    for m, b in targets["b"].items():
        goal = f"within {PRED_TOL}" if m != "periodic_cond" else "report only (the one-program form)"
        lines.append(
            f"| (b) {m} | {b['measured']:.2f} measured vs {b['predicted']:.2f} predicted (naive "
            f"{b['naive']:.2f}; f = {b['fraction']:.2f}) | {goal} | "
            f"{met[b['met']] if m != 'periodic_cond' else '-'} |"
        )
    if "periodic_cond" in targets["b"]:
        lines += [
            "",
            "`periodic_cond` is periodic SAM as one program with the second pass under `lax.cond` "
            '(`second_pass="auto"`, the default on GPU / TPU). On CPU the schedulers are trained as two '
            "programs picked on the host (`sam_optax.host_chosen_step`), because XLA:CPU runs a "
            "convolution's gradient inside a conditional on a slow path (jax-ml/jax#12868).",
        ]
    return lines


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in summary["rows"] if r["cost"] is not None and r["accuracy"]), key=lambda r: r["cost"])
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(rows):  # labels staggered: neighbours in cost get different heights
        hollow = r["method"] == "periodic_cond"
        ax.errorbar(
            r["cost"],
            100 * r["accuracy"]["mean"],
            yerr=100 * r["accuracy"]["std"],
            fmt="o",
            capsize=3,
            color="tab:red" if r["pareto"] else "tab:blue",
            mfc="none" if hollow else None,
        )
        ax.annotate(
            r["method"],
            (r["cost"], 100 * r["accuracy"]["mean"]),
            textcoords="offset points",
            xytext=(4, (6, -11, 15)[i % 3]),
            fontsize=8,
        )
    front = sorted((r["cost"], 100 * r["accuracy"]["mean"]) for r in rows if r["pareto"])
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend(loc="best")
    ax.margins(x=0.08, y=0.12)
    ax.set_xscale("log")
    ticks = [
        t
        for t in (1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50)
        if min(r["cost"] for r in rows or [{"cost": 1}]) * 0.9
        <= t
        <= max(r["cost"] for r in rows or [{"cost": 1}]) * 1.1
    ]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("step time / SGD step (log scale)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("accuracy against step cost (MNIST-1D, 1-D CNN)")
    fig.tight_layout()
    from sam_optax.experiments import _io

    try:
        _io.save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def write_report(store, s: Settings, out: pathlib.Path, write_page: bool, page: pathlib.Path = PAGE) -> str:
    from sam_optax.experiments import _io

    summary = collect(store, s)
    _io.write_json(str(out / "summary.json"), summary)
    text = report_markdown(summary)
    _io.atomic_write(str(out / "report.md"), lambda f: f.write(text + "\n"))
    plot(summary, str(out / "frontier.png"))
    if write_page:
        import _pages

        _pages.write_block(page, START, END, text)
    return text


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cost_worker:
        config = json.loads(pathlib.Path(args.cost_worker[0]).read_text())
        pathlib.Path(args.cost_worker[1]).write_text(json.dumps(cost_worker(config)))
        return 0
    s = Settings(tuple(args.methods), args.seeds, args.epochs, args.samples, args.cost_rounds, args.cost_steps)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = claims.Store(out / "runs.jsonl")
    if not args.report:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        first = search_configs(store, s, "sam") if any(m == "sam" or m in AT_SAM_RHO for m in s.methods) else []
        with tqdm(total=len(first), desc="tune SAM's rho", dynamic_ncols=True) as bar:
            for c in first:
                _run(store, c, bar)
        more = [c for m in s.methods if m != "sam" for c in search_configs(store, s, m)]
        with tqdm(total=len(more), desc="tune the others", dynamic_ncols=True) as bar:
            for c in more:
                _run(store, c, bar)
        tests = accuracy_configs(store, s)
        with tqdm(total=len(tests), desc=f"test ({s.seeds} seeds)", dynamic_ncols=True) as bar:
            for c in tests:
                _run(store, c, bar)
        if args.recost:  # drop the saved timing: the step forms changed, the training runs did not
            stale = claims._key(cost_config(store, s))
            store.keep_only([r["config"] for r in store.runs.values() if r["key"] != stale])
        if not args.skip_cost:
            print("cost: timing every step in a separate process (one XLA thread) ...", file=sys.stderr, flush=True)
            _measure_cost(store, cost_config(store, s))
        print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    print(write_report(store, s, out, args.write_docs))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=_positive, default=3, help="seeds per method (default 3)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=METHODS,
        metavar="METHOD",
        help=f"from: {' '.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--epochs", type=_positive, default=EPOCHS, help=f"epochs per run (default {EPOCHS}; 1: a smoke run)"
    )
    p.add_argument("--samples", type=_positive, default=SAMPLES, help=f"MNIST-1D samples (default {SAMPLES})")
    p.add_argument("--report", action="store_true", help="only rebuild the report from saved runs")
    p.add_argument(
        "--skip-cost",
        action="store_true",
        help="no cost timing (the report then uses a saved one, else the training runs' steps/s)",
    )
    p.add_argument(
        "--recost",
        action="store_true",
        help="time the steps again (keeps the training runs; after a change of step form)",
    )
    p.add_argument("--cost-rounds", type=_positive, default=COST_ROUNDS)
    p.add_argument(
        "--cost-steps",
        type=_positive,
        default=COST_STEPS,
        help="consecutive steps per method per round (a multiple of 10 covers whole periods)",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"also write the table into {PAGE.relative_to(ROOT)} between {START} and {END}",
    )
    p.add_argument("--out", default=str(OUT), help="results folder (default benchmarks/results/frontier)")
    p.add_argument("--cost-worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    return p


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def stat(values) -> dict | None:
    """``{mean, std, n}`` (claims.py's)."""
    return claims._stat(list(values))


if __name__ == "__main__":
    sys.exit(main())
