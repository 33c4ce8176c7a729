"""The ``sam-optax`` command: ``compare``, ``toy`` and ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Sequence

from sam_optax._argtypes import fraction as _fraction
from sam_optax._argtypes import nonneg_float as _nonneg_float
from sam_optax._argtypes import positive_int as _positive_int
from sam_optax._argtypes import seed as _seed
from sam_optax.experiments import _interrupt, _io  # standard library only: no extra needed

# --------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------

# The top-level module each subcommand imports beyond the core dependencies, and the extra
# that installs it (``examples`` includes ``flax``).
_EXTRA = {"flax": "flax", "matplotlib": "examples", "tqdm": "examples", "mnist1d": "examples", "sklearn": "examples"}


def _required_modules(args: argparse.Namespace) -> list[str]:
    if args.command == "compare":  # models (flax), dataset, figure, progress bars
        needed = ["flax", "mnist1d" if args.dataset == "mnist1d" else "sklearn", "matplotlib"]
        return needed + ([] if args.no_progress else ["tqdm"])
    if args.command == "toy":
        return ["matplotlib"]
    return ["flax"]  # bench: the benchmark's models


def _missing_extra(command: str, modules: Sequence[str]) -> str | None:
    """One line naming the modules that are not installed and the extra to install, or None."""
    import importlib.util

    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    extra = "examples" if any(_EXTRA[m] == "examples" for m in missing) else "flax"
    return f"sam-optax {command}: error: needs {', '.join(missing)}, not installed: pip install sam-optax[{extra}]"


# --------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------


def _plot_compare(results: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        epochs, curve_accs = zip(*r["curve"])
        ax1.plot(epochs, curve_accs, label=r["method"], marker="o" if len(epochs) < 15 else None)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy (clean labels)")
    ax1.set_title("test accuracy during training")
    ax1.legend(fontsize=8)
    names = [r["method"] for r in results]
    accs = [r["test_accuracy"] for r in results]
    bars = ax2.bar(names, accs, color="tab:blue")
    lo = min(accs)
    ax2.set_ylim(max(0.0, lo - 0.05), min(1.0, max(accs) + 0.03))
    for b, a in zip(bars, accs):
        ax2.text(b.get_x() + b.get_width() / 2, a, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
    ax2.set_title("final test accuracy")
    ax2.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        _io.save_figure(fig, path, dpi=110)  # a temporary file renamed over the old one
    finally:
        plt.close(fig)


def _finite(x):
    """The payload with NaN / inf numbers as None (strict JSON)."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


COMPARE_OUTPUTS = ("results.json", "accuracy.png")
TOY_OUTPUTS = ("wsam_toy.png",)


def _train_all(args: argparse.Namespace, data, hyper) -> tuple[list, bool]:
    """Trains every method of ``args.methods``: ``(results of those that finished, all finished)``.

    Ctrl-C stops after the step in flight (see ``experiments._interrupt``); the
    results of the methods already finished are kept.
    """
    from sam_optax import experiments

    results = []
    try:
        for name in args.methods:
            _interrupt.check()
            res = experiments.train_method(
                name,
                data,
                model=args.model,
                epochs=args.epochs,
                batch_size=args.batch_size,
                hyper=hyper,
                seed=args.seed,
                hessian=not args.no_hessian,
                progress=not args.no_progress,
            )
            results.append(res.to_dict())
            print(f"{name}: done, test accuracy {res.test_accuracy:.4f} ({res.seconds:.1f} s)", flush=True)
    except _interrupt.Interrupted:
        return results, False
    return results, True


def _compare_table(results: list) -> str:
    header = (
        f"{'method':<13} {'test acc':>9} {'train loss':>11} {'lambda_max':>11} {'sharpness':>10} {'steps/s':>9} "
        f"{'2nd pass':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lam = "-" if r["lambda_max"] is None else f"{r['lambda_max']:.3f}"
        if r.get("lambda_max_converged") is False:
            lam += "*"  # power iteration stopped at max_iterations before its tolerance
        sh = "-" if r["sharpness"] is None else f"{r['sharpness']:.4f}"
        speed = "-" if r["steps_per_second"] is None else f"{r['steps_per_second']:.1f}"
        frac = r.get("second_pass_fraction")
        frac = "-" if frac is None else f"{frac:.2f}"
        lines.append(
            f"{r['method']:<13} {r['test_accuracy']:>9.4f} {r['train_loss']:>11.4f} {lam:>11} {sh:>10} "
            f"{speed:>9} {frac:>9}"
        )
    if any(r.get("lambda_max_converged") is False for r in results):
        lines.append("* power iteration did not reach its tolerance (1e-3) in 50 Hessian-vector products")
    if any(r.get("second_pass_fraction") is not None for r in results):
        lines.append("2nd pass: fraction of the steps that ran the second gradient pass (- : a one-pass method)")
    if any(r["steps_per_second"] is None for r in results):
        lines.append(
            "steps/s -: a single training step (--epochs x steps per epoch = 1) is all compilation, "
            "so no speed is measured"
        )
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    from sam_optax import experiments
    from sam_optax.experiments.methods import Hyper

    t0 = time.perf_counter()
    data = experiments.load(args.dataset, seed=args.seed, label_noise=args.label_noise)
    n_train = len(data.x_train)
    if args.batch_size > n_train:
        args.subparser.error(
            f"argument --batch-size: {args.batch_size} is larger than the training set of "
            f"{args.dataset} ({n_train} examples)"
        )
    print(
        f"{args.dataset}: {n_train} train / {len(data.x_test)} test examples, "
        f"label noise {args.label_noise:.0%}; model {args.model}, {args.epochs} epochs, batch {args.batch_size}"
        f"{'' if args.m is None else f', m={args.m}'}; methods: {', '.join(args.methods)}",
        flush=True,
    )
    results, complete = _train_all(args, data, Hyper(lr=args.lr, rho=args.rho, m=args.m))
    json_path, png_path = (os.path.join(args.out, name) for name in COMPARE_OUTPUTS)
    if not complete:
        done = ", ".join(r["method"] for r in results)
        if results:
            _save_compare(args, results, False, time.perf_counter() - t0)
        print(
            "sam-optax compare: interrupted; "
            + (
                f"saved the {len(results)} of {len(args.methods)} methods that finished ({done}) to {json_path}, "
                f"marked incomplete"
                if results
                else "no method had finished, nothing saved"
            ),
            file=sys.stderr,
        )
        return 130
    print(_compare_table(results))
    _save_compare(args, results, True, time.perf_counter() - t0)
    print(f"saved {json_path} and {png_path} ({time.perf_counter() - t0:.0f} s)")
    return 0


def _save_compare(args: argparse.Namespace, results: list, complete: bool, seconds: float) -> None:
    """results.json and accuracy.png, each written to a temporary file and renamed over the old one."""
    payload = {
        "dataset": args.dataset,
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "label_noise": args.label_noise,
        "seed": args.seed,
        "lr": args.lr,
        "rho": args.rho,
        "m": args.m,
        "methods": list(args.methods),
        "complete": complete,
        "results": results,
        "seconds": seconds,
    }
    json_path, png_path = (os.path.join(args.out, name) for name in COMPARE_OUTPUTS)
    _io.write_json(json_path, _finite(payload), allow_nan=False)
    _plot_compare(
        results,
        png_path,
        f"{args.dataset}, {args.model}, label noise {args.label_noise:.0%}, "
        f"seed {args.seed}" + ("" if complete else " (incomplete)"),
    )


# --------------------------------------------------------------------------------------------
# toy
# --------------------------------------------------------------------------------------------


def toy(args: argparse.Namespace) -> int:
    from sam_optax.experiments import toy as toy_mod

    trajectories = toy_mod.run(steps=args.steps, lr=args.lr, rho=args.rho)
    _interrupt.check()
    print(f"{'run':<28} {'mu':>9} {'sigma':>9}  minimum")
    for t in trajectories:
        mu, sigma = t.points[-1]
        print(f"{t.label:<28} {mu:>9.3f} {sigma:>9.3f}  {toy_mod.nearest_minimum(t.points[-1])}")
    diverged = [t for t in trajectories if toy_mod.nearest_minimum(t.points[-1]) == toy_mod.DIVERGED]
    if diverged:
        print(
            f"sam-optax toy: error: {len(diverged)} of {len(trajectories)} runs diverged (end point not a "
            f"number) with --lr {args.lr:g} --rho {args.rho:g}; try smaller values. No figure saved.",
            file=sys.stderr,
        )
        return 1
    path = os.path.join(args.out, TOY_OUTPUTS[0])
    toy_mod.plot(trajectories, path)
    print(f"sharp minimum {toy_mod.SHARP_MIN}, flat minimum {toy_mod.FLAT_MIN}; saved {path}")
    return 0


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


_OUT_HELP = (
    "output folder (created if needed). Files are written to a temporary file and renamed over the old "
    "ones, so an interrupted or failed write never leaves a truncated result. A run locks the folder "
    "(file .sam-optax.lock, released when the run ends, even if it is killed): a second run into the "
    "same folder stops at once with an error naming the first one."
)


def build_parser() -> argparse.ArgumentParser:
    from sam_optax.experiments.methods import DEFAULT_METHODS, METHODS

    parser = argparse.ArgumentParser(
        prog="sam-optax",
        description="Sharpness-aware training with sam_optax: compare methods, the WSAM toy, "
        "and the step-cost benchmark.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,toy,bench}")
    p = sub.add_parser(
        "compare",
        help="train one model with several methods on a locally generated dataset",
        description="Train the same model with several methods on a dataset generated locally "
        "(MNIST-1D by default, or sklearn's digits) and compare test accuracy, final "
        "train loss, Hessian lambda_max and steps/s (and, for the sharpness-aware "
        "methods, the fraction of steps that ran the second gradient pass: below 1 for "
        "looksam, periodic, rst and ae_sam). Saves results.json and accuracy.png. "
        "Ctrl-C stops after the step in flight, saves the methods that finished "
        '("complete": false in results.json) and exits with status 130.',
    )
    p.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    p.add_argument("--model", choices=("mlp", "cnn"), default="cnn")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(DEFAULT_METHODS),
        metavar="METHOD",
        help=f"from: {', '.join(METHODS)} (default: {' '.join(DEFAULT_METHODS)})",
    )
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--m", type=_positive_int, default=None, help="m-sharpness shard size (default: the batch)")
    p.add_argument("--lr", type=_nonneg_float, default=0.05, help="peak learning rate of SGD (cosine schedule)")
    p.add_argument(
        "--rho",
        type=_nonneg_float,
        default=0.05,
        help="radius of sam, wsam, gsam (rho_max), esam, looksam, rst, ae_sam and the averaged "
        "variants; periodic (SAM every 10 steps) uses 10 x rho, Composer's advice to scale rho "
        "with the interval (asam and fisher keep their papers' 0.5 and 0.1; msam its rho 0.3 and "
        "rwp its sigma 0.001, see sam_optax/experiments/methods.py)",
    )
    p.add_argument("--label-noise", type=_fraction, default=0.0, help="symmetric label noise rate in [0, 1)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--out", default=os.path.join("sam_optax_runs", "compare"), help=_OUT_HELP)
    p.add_argument("--no-hessian", action="store_true", help="skip the Hessian lambda_max")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=compare, subparser=p)

    t = sub.add_parser(
        "toy",
        help="the WSAM paper's 2-D toy (Fig. 2): trajectories on the contour plot",
        description="SAM and WSAM (gamma 0.6 and 0.95, coupled and decoupled) on the 2-D toy loss "
        "of the WSAM paper, in float64; saves wsam_toy.png and prints the end points. A run "
        "whose end point is not a number (NaN or inf: --lr or --rho too large) is "
        "labelled 'diverged (not a number)' and the command exits with status 1.",
    )
    t.add_argument("--steps", type=_positive_int, default=150)
    t.add_argument("--lr", type=_nonneg_float, default=5.0)
    t.add_argument("--rho", type=_nonneg_float, default=2.0)
    t.add_argument("--out", default=os.path.join("sam_optax_runs", "toy"), help=_OUT_HELP)
    t.set_defaults(func=toy, subparser=t)

    b = sub.add_parser(
        "bench",
        help="time a training step of every method (ratios to the base step)",
        description="The step-cost benchmark: median step time of every method on a small MLP, a 1-D "
        "CNN and a 2-D ResNet-style convnet, as ratios to the base optimizer and to "
        "optax.contrib.sam; compile times and peak memory. Saves a JSON under --out. "
        "Options: --batch-size, --rounds, --steps-per-round, --models, --threads {one,all}, "
        "--out, --tag, --max-seconds, --convnet-widths, --convnet-blocks "
        "(see python -m sam_optax.benchmarking --help).",
        add_help=False,
    )
    b.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # its own parser, in a fresh process with its XLA flags
        if not {"-h", "--help"} & set(argv[1:]):
            error = _missing_extra("bench", _required_modules(argparse.Namespace(command="bench")))
            if error:
                print(error, file=sys.stderr)
                return 1
        from sam_optax import benchmarking

        return benchmarking.launch(argv[1:])
    with _interrupt.sigint_sets_flag():  # Ctrl-C: a flag checked at safe points, never a raw KeyboardInterrupt
        return _main(argv)


def _main(argv: list) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = args.subparser  # errors in a subcommand's arguments are reported with its usage
    if args.command == "compare":
        if args.m is not None and args.batch_size % args.m:
            sub.error(f"argument --m: {args.m} must divide --batch-size {args.batch_size}")
    error = _missing_extra(args.command, _required_modules(args))
    if error:  # before any output folder is made or locked
        print(error, file=sys.stderr)
        return 1
    outputs = COMPARE_OUTPUTS if args.command == "compare" else TOY_OUTPUTS
    with contextlib.ExitStack() as stack:
        try:  # every output path is checked, and the folder locked, before any training
            _io.check_outputs(args.out, outputs)
            stack.enter_context(_io.lock_folder(args.out, command=" ".join(["sam-optax", *argv])))
        except _io.OutputError as e:
            sub.error(f"argument --out: {e}")
        try:
            rc = args.func(args)
        except (_interrupt.Interrupted, KeyboardInterrupt):
            print(f"sam-optax {args.command}: interrupted; nothing saved", file=sys.stderr)
            return 130
        except (ValueError, OSError) as e:
            print(f"sam-optax {args.command}: error: {e}", file=sys.stderr)
            return 2
    if rc == 0 and _interrupt.requested():  # Ctrl-C after the last check: the outputs are complete
        print(
            f"sam-optax {args.command}: interrupted after the run had finished; its outputs are saved", file=sys.stderr
        )
        return 130
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
