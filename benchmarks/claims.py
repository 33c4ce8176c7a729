"""The seeds' claims at CPU scale: one command, resumable, with progress bars.

    python benchmarks/claims.py              # runs what is missing, then writes the report
    python benchmarks/claims.py --report     # only rebuild tables and plots from the saved runs
    python benchmarks/claims.py --seeds 1    # a quicker, smaller pass

Data: MNIST-1D generated locally (4000 samples, 3200 train / 800 test), the 1-D CNN of
``sam_optax.experiments``, 30 epochs of batch 128, SGD with momentum 0.9 (lr 0.05, cosine, L2 5e-4
in the base optimizer) as the base of every method; several seeds per cell, mean +- std.

1. Hyperparameter search (seed 0, clean labels, the last 640 training examples as validation):
   SAM's rho in {0.01, 0.02, 0.05, 0.1, 0.2, 0.5} (the SAM paper's grid), then WSAM's gamma in
   {0.5, 0.7, 0.8, 0.9, 0.95} and GSAM's alpha in {0.01, 0.1, 0.3} at that rho; ESAM (the paper's
   beta = gamma = 0.5) gets its own rho from the same grid, since its perturbation has norm
   rho / beta. The chosen values are used everywhere below.
2. Label noise (SAM Tab. 4, WSAM Tab. 6): symmetric noise 0/20/40/60/80% on the training labels,
   SGD vs SAM vs WSAM vs ESAM vs GSAM, test accuracy on clean labels.
3. Generalization (WSAM Tab. 2 shape: SGD, SAM, ESAM, GSAM, WSAM) and minima (WSAM Tab. 9 shape):
   the 0% noise runs; train loss and the Hessian's top eigenvalue (power iteration on 512 training
   examples) at the end.
4. m-sharpness (SAM Fig. 3 shape): SAM's test accuracy for m in {128, 64, 32, 16, 8}.
5. Weight averaging: the last SGD iterate vs SWA vs EMA vs Lookahead (slow weights).
6. Decoupled weight decay (AdamW paper Fig. 2 shape): AdamW vs Adam + L2 on a 3 x 3 grid of the
   learning rate and the normalized weight decay (2 seeds).

Every seed uses the same generated data and noisy labels (data seed 0): the spread over seeds is
that of the initialization and the batch order. The 158 runs take about 21 minutes of training
on 2 CPU cores (the report gives the sum of the recorded per-run times), plus start-up and data
generation (each data set is generated once per process).

Every finished run is appended to ``runs.jsonl``; a rerun skips it. The report goes to
``benchmarks/results/claims/`` (``summary.json``, ``report.md``, PNG plots) and, with
``--write-docs``, into docs/benchmarks/claims.md between its markers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "claims"
PAGE = ROOT / "docs" / "benchmarks" / "claims.md"
START, END = "<!-- claims:start -->", "<!-- claims:end -->"

EPOCHS, BATCH, MODEL, SAMPLES = 30, 128, "cnn", 4000
RHOS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95)
ALPHAS = (0.01, 0.1, 0.3)
NOISES = (0.0, 0.2, 0.4, 0.6, 0.8)
NOISE_METHODS = ("sgd", "sam", "wsam", "esam", "gsam")
GENERALIZATION = ("sgd", "sam", "esam", "gsam", "wsam")  # the rows of WSAM's Tab. 2
MS = (128, 64, 32, 16, 8)
AVERAGING = ("sgd", "swa", "ema", "lookahead")
ADAM_LRS = (1e-3, 3e-3, 1e-2)
ADAM_WDS = (0.0125, 0.05, 0.2)


def _key(config: dict) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class Store:
    """Finished runs, one JSON line each, keyed by their configuration."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.runs = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.runs[row["key"]] = row

    def get(self, config):
        return self.runs.get(_key(config))

    def keep_only(self, configs):
        """Drops runs of configurations no longer in the suite (e.g. after a change of grid)."""
        keys = {_key(c) for c in configs}
        self.runs = {k: v for k, v in self.runs.items() if k in keys}
        from sam_optax.experiments import _io

        text = "".join(json.dumps(row) + "\n" for row in self.runs.values())
        _io.atomic_write(str(self.path), lambda f: f.write(text))  # never a truncated store

    def add(self, config, result):
        row = {"key": _key(config), "config": config, "result": result}
        self.runs[row["key"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


@functools.cache
def _dataset(noise: float, seed: int, validation: bool):
    """The data of a run; generated once per process (MNIST-1D's generator takes seconds)."""
    from sam_optax.experiments import datasets

    data = datasets.load("mnist1d", seed=seed, label_noise=noise, num_samples=SAMPLES)
    return validation_split(data, 640) if validation else data


def validation_split(data, size: int):
    """``data`` with its last ``size`` training examples as the test set (their clean labels)."""
    from sam_optax.experiments import datasets

    n = len(data.x_train) - size
    return datasets.Dataset(
        data.name,
        data.x_train[:n],
        data.y_train[:n],
        data.x_train[n:],
        data.y_train_clean[n:],
        data.num_classes,
        data.y_train_clean[:n],
    )


def _run(store, config, bar):
    found = store.get(config)
    if found is not None:
        bar.update(1)
        return found["result"]
    from sam_optax.experiments import train_method
    from sam_optax.experiments.methods import Hyper

    hp = Hyper(**config["hyper"])
    data = _dataset(config["noise"], config["data_seed"], config["validation"])
    bar.set_postfix_str(f"{config['experiment']}: {config['method']} seed {config['seed']}")
    res = train_method(
        config["method"],
        data,
        model=MODEL,
        epochs=EPOCHS,
        batch_size=BATCH,
        hyper=hp,
        seed=config["seed"],
        hessian=config["hessian"],
        sharpness_rho=config.get("sharpness_rho"),
        progress=False,
    )
    result = res.to_dict()
    store.add(config, result)
    bar.update(1)
    return result


def _config(experiment, method, seed, hyper, *, noise=0.0, validation=False, hessian=False):
    return {
        "experiment": experiment,
        "method": method,
        "seed": seed,
        "data_seed": 0,
        "noise": noise,
        "validation": validation,
        "hessian": hessian,
        "hyper": hyper,
        "epochs": EPOCHS,
        "batch": BATCH,
        "model": MODEL,
        "samples": SAMPLES,
    }


def search_configs():
    out = [_config("search", "sam", 0, {"rho": r}, validation=True) for r in RHOS]
    return out


def tuned(store) -> dict:
    """The chosen hyperparameters (after the search runs are in the store)."""

    def best(configs):
        scored = [(store.get(c)["result"]["test_accuracy"], -i, c) for i, c in enumerate(configs) if store.get(c)]
        return max(scored)[2]["hyper"] if scored else None

    sam = best(search_configs())
    rho = sam["rho"] if sam else 0.05
    wsam = best(wsam_search(rho))
    gsam = best(gsam_search(rho))
    esam = best(esam_search())
    return {
        "rho": rho,
        "wsam_gamma": wsam["wsam_gamma"] if wsam else 0.9,
        "gsam_alpha": gsam["gsam_alpha"] if gsam else 0.3,
        "esam_rho": esam["rho"] if esam else rho,
    }


def wsam_search(rho):
    return [_config("search", "wsam", 0, {"rho": rho, "wsam_gamma": g}, validation=True) for g in GAMMAS]


def esam_search():
    return [_config("search", "esam", 0, {"rho": r}, validation=True) for r in RHOS]


def gsam_search(rho):
    return [_config("search", "gsam", 0, {"rho": rho, "gsam_alpha": a}, validation=True) for a in ALPHAS]


def main_configs(t, seeds):
    hyper = {"rho": t["rho"], "wsam_gamma": t["wsam_gamma"], "gsam_alpha": t["gsam_alpha"]}
    out = []
    for noise in NOISES:
        for method in NOISE_METHODS:
            h = dict(hyper, rho=t["esam_rho"]) if method == "esam" else hyper
            for s in range(seeds):
                c = _config("noise", method, s, h, noise=noise, hessian=noise == 0.0)
                if c["hessian"]:
                    c["sharpness_rho"] = t["rho"]  # the same radius for every method
                out.append(c)
    for m in MS:
        for s in range(seeds):
            out.append(_config("m", "sam", s, dict(hyper, m=m)))
    for method in AVERAGING:
        for s in range(seeds):
            out.append(_config("averaging", method, s, hyper))
    for lr in ADAM_LRS:
        for wd in ADAM_WDS:
            for method in ("adamw", "adam_l2"):
                for s in range(min(seeds, 2)):
                    out.append(_config("adamw", method, s, {"adamw_lr": lr, "adamw_wd": wd}))
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def _stat(values):
    if not values:
        return None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def _fmt(s, scale=100.0, digits=1):
    if s is None:
        return "-"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"


def collect(store, seeds):
    t = tuned(store)
    rows = {"tuned": t, "search": {}, "noise": {}, "minima": {}, "m": {}, "averaging": {}, "adamw": {}}
    for c in search_configs() + wsam_search(t["rho"]) + gsam_search(t["rho"]) + esam_search():
        r = store.get(c)
        if r:
            label = f"{c['method']} " + ", ".join(f"{k}={v}" for k, v in c["hyper"].items())
            rows["search"][label] = r["result"]["test_accuracy"]
    for c in main_configs(t, seeds):
        r = store.get(c)
        if not r:
            continue
        res = r["result"]
        if c["experiment"] == "noise":
            rows["noise"].setdefault(c["method"], {}).setdefault(str(c["noise"]), []).append(res["test_accuracy"])
            if c["noise"] == 0.0:
                mm = rows["minima"].setdefault(c["method"], {"train_loss": [], "lambda_max": [], "sharpness": []})
                mm["train_loss"].append(res["train_loss"])
                mm["lambda_max"].append(res["lambda_max"])
                mm["sharpness"].append(res["sharpness"])
        elif c["experiment"] == "m":
            rows["m"].setdefault(str(c["hyper"]["m"]), []).append(res["test_accuracy"])
        elif c["experiment"] == "averaging":
            rows["averaging"].setdefault(c["method"], []).append(res["test_accuracy"])
        elif c["experiment"] == "adamw":
            key = f"{c['method']}|{c['hyper']['adamw_lr']}|{c['hyper']['adamw_wd']}"
            rows["adamw"].setdefault(key, []).append(res["test_accuracy"])
    stats = {k: v for k, v in rows.items() if k in ("tuned", "search")}
    stats["seeds"] = seeds
    stats["noise"] = {m: {n: _stat(v) for n, v in d.items()} for m, d in rows["noise"].items()}
    stats["minima"] = {m: {k: _stat(v) for k, v in d.items()} for m, d in rows["minima"].items()}
    stats["m"] = {m: _stat(v) for m, v in rows["m"].items()}
    stats["averaging"] = {m: _stat(v) for m, v in rows["averaging"].items()}
    stats["adamw"] = {k: _stat(v) for k, v in rows["adamw"].items()}
    runs = [
        store.get(c)
        for c in search_configs()
        + wsam_search(t["rho"])
        + gsam_search(t["rho"])
        + esam_search()
        + main_configs(t, seeds)
    ]
    stats["runs"] = sum(r is not None for r in runs)
    stats["train_minutes"] = sum(r["result"]["seconds"] for r in runs if r is not None) / 60
    return stats


def report_markdown(stats, seeds) -> str:
    t = stats["tuned"]
    lines = [
        f"MNIST-1D (generated locally, 3200 train / 800 test), 1-D CNN, {EPOCHS} epochs, batch {BATCH}, "
        f"SGD momentum 0.9 (lr 0.05, cosine) as every method's base; test accuracy in % on clean labels, "
        f"mean ± std over {seeds} seeds (`python benchmarks/claims.py`, results in "
        f"`benchmarks/results/claims/`). Tuned on a validation split: rho = {t['rho']}, "
        f"WSAM gamma = {t['wsam_gamma']}, GSAM alpha = {t['gsam_alpha']}, ESAM rho = {t['esam_rho']} "
        f"(beta = gamma = 0.5).",
        "",
    ]
    lines += [
        f"{stats['runs']} runs, {stats['train_minutes']:.0f} minutes of training in all (the sum of the "
        f"per-run times in `runs.jsonl`, on 2 CPU cores); every seed trains on the same generated data "
        f"and the same noisy labels (data seed 0), so the ± is over initialization and batch order.",
        "",
    ]
    gen = [m for m in GENERALIZATION if stats["noise"].get(m, {}).get("0.0")]
    sgd = stats["noise"].get("sgd", {}).get("0.0")
    lines += [
        "**Generalization** (WSAM Tab. 2 shape), clean labels:",
        "",
        "| method | test acc. | vs SGD |",
        "| --- | --- | --- |",
    ]
    for m in gen:
        acc = stats["noise"][m]["0.0"]
        diff = "" if m == "sgd" or sgd is None else f"{100 * (acc['mean'] - sgd['mean']):+.1f}"
        lines.append(f"| {m} | {_fmt(acc)} | {diff} |")
    lines += [
        "",
        "**Label noise** (SAM Tab. 4, WSAM Tab. 6 shape):",
        "",
        "| method | " + " | ".join(f"{int(100 * n)}% noise" for n in NOISES) + " |",
        "|" + " --- |" * (1 + len(NOISES)),
    ]
    for m in NOISE_METHODS:
        d = stats["noise"].get(m, {})
        lines.append(f"| {m} | " + " | ".join(_fmt(d.get(str(n))) for n in NOISES) + " |")
    lines += [
        "",
        "**Minima at 0% noise** (WSAM Tab. 9 shape): train loss, Hessian top eigenvalue, and the "
        f"first-order sharpness L(w + rho g/|g|) - L(w) with rho = {t['rho']}:",
        "",
        "| method | test acc. | train loss | lambda_max | sharpness |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in NOISE_METHODS:
        d = stats["minima"].get(m)
        acc = stats["noise"].get(m, {}).get("0.0")
        if d:
            lines.append(
                f"| {m} | {_fmt(acc)} | {_fmt(d['train_loss'], 1, 4)} | {_fmt(d['lambda_max'], 1, 2)} | "
                f"{_fmt(d['sharpness'], 1, 4)} |"
            )
    lines += [
        "",
        "**m-sharpness** (SAM Fig. 3 shape), SAM at batch 128:",
        "",
        "| m | " + " | ".join(str(m) for m in MS) + " |",
        "|" + " --- |" * (1 + len(MS)),
        "| test acc. | " + " | ".join(_fmt(stats["m"].get(str(m))) for m in MS) + " |",
    ]
    names = {"sgd": "last iterate (SGD)", "swa": "SWA", "ema": "EMA (0.99)", "lookahead": "Lookahead (slow)"}
    lines += [
        "",
        "**Weight averaging** (same SGD base; SWA with its official schedule, averaging once per epoch "
        "over the last quarter):",
        "",
        "| " + " | ".join(names[m] for m in AVERAGING) + " |",
        "|" + " --- |" * len(AVERAGING),
        "| " + " | ".join(_fmt(stats["averaging"].get(m)) for m in AVERAGING) + " |",
    ]
    lines += [
        "",
        f"**AdamW vs Adam + L2** (AdamW paper Fig. 2 shape; rows: learning rate, columns: normalized "
        f"weight decay; {min(seeds, 2)} seeds):",
        "",
        "| lr | " + " | ".join(f"AdamW wd={w} | Adam+L2 wd={w}" for w in ADAM_WDS) + " |",
        "|" + " --- |" * (1 + 2 * len(ADAM_WDS)),
    ]
    for lr in ADAM_LRS:
        cells = []
        for wd in ADAM_WDS:
            cells += [_fmt(stats["adamw"].get(f"adamw|{lr}|{wd}")), _fmt(stats["adamw"].get(f"adam_l2|{lr}|{wd}"))]
        lines.append(f"| {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(stats, out: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for m in NOISE_METHODS:
        d = stats["noise"].get(m, {})
        xs = [n for n in NOISES if d.get(str(n))]
        if xs:
            ax.errorbar(
                [100 * n for n in xs],
                [100 * d[str(n)]["mean"] for n in xs],
                yerr=[100 * d[str(n)]["std"] for n in xs],
                label=m,
                capsize=3,
                marker="o",
            )
    ax.set_xlabel("symmetric label noise (%)")
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("label noise")
    ax.legend()
    ax = axes[1]
    ms = [m for m in MS if stats["m"].get(str(m))]
    if ms:
        ax.errorbar(
            ms,
            [100 * stats["m"][str(m)]["mean"] for m in ms],
            yerr=[100 * stats["m"][str(m)]["std"] for m in ms],
            capsize=3,
            marker="o",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("SAM: m-sharpness")
    ax = axes[2]
    for j, method in enumerate(("adamw", "adam_l2")):
        for i, lr in enumerate(ADAM_LRS):
            vals = [stats["adamw"].get(f"{method}|{lr}|{wd}") for wd in ADAM_WDS]
            ys = [100 * v["mean"] if v else float("nan") for v in vals]
            ax.plot(
                range(len(ADAM_WDS)),
                ys,
                marker="o",
                ls="-" if j == 0 else "--",
                color=f"C{i}",
                label=f"{'AdamW' if j == 0 else 'Adam+L2'} lr={lr}",
            )
    ax.set_xticks(range(len(ADAM_WDS)), [str(w) for w in ADAM_WDS])
    ax.set_xlabel("normalized weight decay")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("AdamW vs Adam + L2")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from sam_optax.experiments import _io

    try:
        _io.save_figure(fig, str(out / "claims.png"), dpi=110)
    finally:
        plt.close(fig)


def write_report(store, seeds, write_docs: bool):
    from sam_optax.experiments import _io

    stats = collect(store, seeds)
    _io.write_json(str(OUT / "summary.json"), stats)
    text = report_markdown(stats, seeds)
    _io.atomic_write(str(OUT / "report.md"), lambda f: f.write(text + "\n"))
    plots(stats, OUT)
    if write_docs:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
        import _pages

        _pages.write_block(PAGE, START, END, text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (>= 1)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from saved runs")
    parser.add_argument("--write-docs", action="store_true", help="also replace the block in docs/benchmarks/claims.md")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    OUT.mkdir(parents=True, exist_ok=True)
    store = Store(OUT / "runs.jsonl")
    if not args.report:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        with tqdm(total=len(search_configs()), desc="search rho", dynamic_ncols=True) as bar:
            for c in search_configs():
                _run(store, c, bar)
        rho = tuned(store)["rho"]
        more = wsam_search(rho) + gsam_search(rho) + esam_search()
        with tqdm(total=len(more), desc="search gamma/alpha/esam", dynamic_ncols=True) as bar:
            for c in more:
                _run(store, c, bar)
        configs = main_configs(tuned(store), args.seeds)
        with tqdm(total=len(configs), desc="experiments", dynamic_ncols=True) as bar:
            for c in configs:
                _run(store, c, bar)
        store.keep_only(search_configs() + more + configs)
        print(f"done in {(time.perf_counter() - t0) / 60:.1f} min", file=sys.stderr)
    print(write_report(store, args.seeds, args.write_docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
