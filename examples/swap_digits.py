"""SWAP (Stochastic Weight Averaging in Parallel) at small scale, with SAM in phase 2.

An MLP with BatchNorm on scikit-learn's bundled digits (no download):

1. Phase 1: one model, large-batch synchronous SGD (short warm-up), until a training
   accuracy threshold or a step budget is reached.
2. Phase 2: W replicas start from the phase-1 weights and train independently with
   small batches, each with its own data order, here with SAM (any sam_optax rule or
   optax optimizer works). The replicas are stacked on a leading axis and trained
   with ``jax.vmap``; with ``--mesh`` that axis is also laid out on a device mesh
   axis ``"replica"`` (one replica per device, no communication).
3. Phase 3: average the replicas' weights and recompute the BatchNorm statistics of
   the averaged network over the training data.

Run ``python examples/swap_digits.py`` from the repository root after ``pip install -e .``
(about 10 s on 2 CPU cores); ``--mesh`` needs at least W devices (on CPU:
``XLA_FLAGS=--xla_force_host_platform_device_count=4``). Phase 1 stops early (here at 90%
training accuracy) as in the paper; at this small scale the average is about as good as
the best replica, so read the printout as a working recipe, not as a benchmark.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sam_optax
from sam_optax import averaging, geometry


class MLP(nn.Module):
    hidden: int = 64

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def run(
    *,
    replicas: int = 4,
    phase1_steps: int = 60,
    phase1_target_accuracy: float = 0.9,
    phase2_steps: int = 80,
    large_batch: int = 700,
    small_batch: int = 50,
    lr1: float = 0.3,
    lr2: float = 0.1,
    rho: float = 0.05,
    mesh: bool = False,
    seed: int = 0,
) -> dict:
    """Runs the three phases; returns accuracies and the weights of each phase."""
    (xtr, ytr), (xte, yte) = load_digits_split(seed)
    model = MLP()
    variables = model.init(jax.random.PRNGKey(seed), xtr[:2], train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def loss(params, batch, stats):
        logits, new = model.apply(
            {"params": params, "batch_stats": stats}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), new["batch_stats"]

    @jax.jit
    def accuracy(params, stats, x, y):
        logits = model.apply({"params": params, "batch_stats": stats}, x, train=False)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    # ---- phase 1: large-batch synchronous SGD ------------------------------------------------
    tx1 = optax.sgd(optax.linear_schedule(lr1 / 10, lr1, 5), momentum=0.9)
    opt1 = tx1.init(params)

    @jax.jit
    def step1(params, stats, opt_state, batch):
        (_, stats), g = jax.value_and_grad(loss, has_aux=True)(params, batch, stats)
        u, opt_state = tx1.update(g, opt_state, params)
        return optax.apply_updates(params, u), stats, opt_state

    rng = np.random.default_rng(seed)
    steps_per_epoch = len(xtr) // large_batch
    phase1_done = 0
    while phase1_done < phase1_steps:
        perm = rng.permutation(len(xtr))
        for j in range(steps_per_epoch):
            idx = perm[j * large_batch : (j + 1) * large_batch]
            params, stats, opt1 = step1(params, stats, opt1, {"x": xtr[idx], "y": ytr[idx]})
            phase1_done += 1
        if float(accuracy(params, stats, xtr, ytr)) >= phase1_target_accuracy:
            break
    phase1 = (params, stats)

    # ---- phase 2: W independent small-batch replicas (vmapped, optionally on a mesh axis) -------
    tx2 = sam_optax.sam(optax.sgd(lr2, momentum=0.9))
    sa_grad = sam_optax.sharpness_aware_grad(loss, geometry.l2(rho), has_aux=True)

    def replica_step(params, stats, opt_state, batch):
        out = sa_grad(params, batch, stats)
        u, opt_state = tx2.update(
            out.grads, opt_state, params, perturbed_grads=out.perturbed_grads, clean_grads=out.grads
        )
        return optax.apply_updates(params, u), out.aux, opt_state

    step2 = jax.jit(jax.vmap(replica_step))
    rparams = averaging.replicate(params, replicas)
    rstats = averaging.replicate(stats, replicas)
    ropt = jax.vmap(tx2.init)(rparams)

    def place(tree):
        return tree

    if mesh:
        if jax.device_count() < replicas:
            raise ValueError(f"--mesh needs {replicas} devices, found {jax.device_count()}.")
        sharding = NamedSharding(Mesh(np.array(jax.devices()[:replicas]), ("replica",)), P("replica"))

        def place(tree):
            return jax.device_put(tree, sharding)

        rparams, rstats, ropt = place(rparams), place(rstats), place(ropt)
    # each replica its own data order: its own generator, reshuffled every epoch
    orders = [np.random.default_rng(1000 * (seed + 1) + r) for r in range(replicas)]
    per_epoch = len(xtr) // small_batch
    perms = [o.permutation(len(xtr)) for o in orders]
    for t in range(phase2_steps):
        j = t % per_epoch
        if j == 0 and t > 0:
            perms = [o.permutation(len(xtr)) for o in orders]
        idx = np.stack([p[j * small_batch : (j + 1) * small_batch] for p in perms])  # (W, b)
        rparams, rstats, ropt = step2(rparams, rstats, ropt, place({"x": xtr[idx], "y": ytr[idx]}))

    # ---- phase 3: average, then recompute BatchNorm statistics for the average ----------------
    swap_params = averaging.average_replicas(rparams)

    def forward(v, b):
        return model.apply(v, b["x"], train=True, mutable=["batch_stats"])

    bn_batches = [{"x": xtr[i : i + 200]} for i in range(0, len(xtr), 200)]
    swap_stats = averaging.recompute_batch_stats(forward, {"params": swap_params, "batch_stats": stats}, bn_batches)

    replica_acc = jax.vmap(accuracy, in_axes=(0, 0, None, None))(rparams, rstats, xte, yte)
    return {
        "phase1_steps": phase1_done,
        "phase1_accuracy": float(accuracy(*phase1, xte, yte)),
        "replica_accuracies": [float(a) for a in replica_acc],
        "swap_accuracy": float(accuracy(swap_params, swap_stats, xte, yte)),
        "swap_accuracy_replica_mean_stats": float(accuracy(swap_params, averaging.average_replicas(rstats), xte, yte)),
        "replica_params": rparams,
        "swap_params": swap_params,
        "swap_batch_stats": swap_stats,
        "train_x": xtr,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--phase1-steps", type=int, default=60)
    parser.add_argument("--phase2-steps", type=int, default=80)
    parser.add_argument("--mesh", action="store_true", help="lay the replicas out on a device mesh axis")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(
        replicas=args.replicas,
        phase1_steps=args.phase1_steps,
        phase2_steps=args.phase2_steps,
        mesh=args.mesh,
        seed=args.seed,
    )
    print(f"phase 1 ({res['phase1_steps']} large-batch steps): test accuracy {res['phase1_accuracy']:.4f}")
    print("phase 2 replicas:        test accuracy " + " ".join(f"{a:.4f}" for a in res["replica_accuracies"]))
    print(
        f"phase 3 SWAP average:    test accuracy {res['swap_accuracy']:.4f} (BatchNorm recomputed), "
        f"{res['swap_accuracy_replica_mean_stats']:.4f} (replicas' mean statistics)"
    )


if __name__ == "__main__":
    main()
