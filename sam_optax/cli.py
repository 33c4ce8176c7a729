"""The ``sam-optax`` command."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

METHODS = ("sgd", "sam", "wsam", "gsam", "asam", "fisher")


def _digits(seed: int):
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _method(name: str, lr: float, rho: float):
    import optax

    import sam_optax
    from sam_optax import geometry

    base = optax.sgd(lr, momentum=0.9)
    return {
        "sgd": (base, None),
        "sam": (sam_optax.sam(base), geometry.l2(rho)),
        "wsam": (sam_optax.wsam(base, 0.9, learning_rate=lr), geometry.l2(rho)),
        "gsam": (sam_optax.gsam(base, 0.3), geometry.l2(rho)),
        "asam": (sam_optax.sam(base), geometry.adaptive(10 * rho)),
        "fisher": (sam_optax.sam(base), geometry.fisher(2 * rho, 1.0)),
    }[name]


def compare(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import sam_optax

    (xtr, ytr), (xte, yte) = _digits(args.seed)

    def logits(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    def loss(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p, batch["x"]), batch["y"]).mean()

    print(f"sklearn digits: {len(xtr)} train / {len(xte)} test, MLP 64-64-10, "
          f"{args.epochs} epochs, batch {args.batch_size}, m={args.m or args.batch_size}")
    print(f"{'method':<8} {'test acc':>9} {'train loss':>11} {'steps/s':>9}")
    for name in args.methods:
        tx, geo = _method(name, args.lr, args.rho)
        k1, k2 = jax.random.split(jax.random.PRNGKey(args.seed))
        params = {"w1": jax.random.normal(k1, (64, 64)) * 0.125, "b1": jnp.zeros(64),
                  "w2": jax.random.normal(k2, (64, 10)) * 0.125, "b2": jnp.zeros(10)}
        opt_state = tx.init(params)

        if geo is None:  # the base optimizer: one gradient pass

            @jax.jit
            def step(params, opt_state, batch):
                value, grads = jax.value_and_grad(loss)(params, batch)
                u, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, u), opt_state, value

        else:
            f = sam_optax.sharpness_aware_grad(loss, geo, m=args.m)

            @jax.jit
            def step(params, opt_state, batch):
                out = f(params, batch)
                u, opt_state = tx.update(out.grads, opt_state, params, perturbed_grads=out.perturbed_grads)
                return optax.apply_updates(params, u), opt_state, out.loss

        rng = np.random.default_rng(args.seed)
        n_steps, t0 = 0, None
        for _ in range(args.epochs):
            perm = rng.permutation(len(xtr))
            for i in range(0, len(xtr) - args.batch_size + 1, args.batch_size):
                idx = perm[i:i + args.batch_size]
                params, opt_state, _ = step(params, opt_state, {"x": xtr[idx], "y": ytr[idx]})
                n_steps += 1
                if t0 is None:
                    jax.block_until_ready(params)
                    t0 = time.perf_counter()
        jax.block_until_ready(params)
        rate = (n_steps - 1) / max(time.perf_counter() - t0, 1e-9)
        acc = float(jnp.mean(jnp.argmax(logits(params, xte), -1) == yte))
        train_loss = float(loss(params, {"x": xtr, "y": ytr}))
        print(f"{name:<8} {acc:>9.4f} {train_loss:>11.4f} {rate:>9.1f}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from sam_optax import benchmarking

    res = benchmarking.run(batch_size=args.batch_size, rounds=args.rounds, steps_per_round=args.steps_per_round,
                           models=tuple(args.models), out_dir=args.out)
    print(benchmarking.format_table(res))
    print(f"\nsaved {res['saved_to']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _nonneg_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-optax", description="Sharpness-aware training with sam_optax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="train one model with several methods and compare them")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--m", type=_positive_int, default=None, help="m-sharpness shard size")
    p.add_argument("--lr", type=_nonneg_float, default=0.2)
    p.add_argument("--rho", type=_nonneg_float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=compare)

    b = sub.add_parser("bench", help="time a training step of every method (ratios to the base step)")
    b.add_argument("--batch-size", type=_positive_int, default=128)
    b.add_argument("--rounds", type=_positive_int, default=15)
    b.add_argument("--steps-per-round", type=_positive_int, default=10)
    b.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    b.add_argument("--out", default="benchmarks/results", help="folder for the results JSON")
    b.set_defaults(func=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare" and args.m is not None and args.batch_size % args.m:
        parser.error(f"--m {args.m} must divide --batch-size {args.batch_size}")
    if args.command == "bench" and args.batch_size % 8:
        parser.error(f"--batch-size {args.batch_size} must be divisible by 8 (m-sharpness with m = batch / 8)")
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
