"""SAM with per-device m-sharpness and tensor-parallel parameters, on 8 simulated devices.

The 8 CPU devices form a ``(data=4, model=2)`` mesh. A two-layer MLP keeps its
weights sharded over ``model`` (Megatron style: the first layer's output
columns, the second layer's input rows). The batch is split over ``data``:
each of the 4 data-parallel groups perturbs the weights with the gradient of
its own examples (m-sharpness, SAM section 5.1), the perturbed gradients are
averaged over ``data``, and the weights never leave their ``model`` shards:
the compiled step has no all-gather (checked below from its HLO text).

``sam_optax.data.shards(mesh=mesh, axis_name="data")`` maps the step over the
``data`` axis only; the ``model`` axis stays with the partitioner. Run
``python examples/sharded_params.py`` (about 10 s on 2 CPU cores);
``--explicit`` uses a mesh with Explicit axes (sharding in types; the loss then
names the sharding of the row-parallel matmul's output, as Explicit meshes
require).
"""

from __future__ import annotations

import argparse
import os
import re

# Must come before jax is imported: 8 CPU devices on any machine.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sam_optax  # noqa: E402
from sam_optax import distributed, geometry  # noqa: E402

SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def init_params(key, d_in=16, hidden=32, classes=4):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d_in, hidden)) / d_in**0.5,
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, classes)) / hidden**0.5,
        "b2": jnp.zeros((classes,)),
    }


def loss_fn(params, batch):
    """Cross-entropy of the MLP. The hidden units are split over ``model``; the
    second matmul sums over them (one all-reduce over ``model``), and on an
    Explicit mesh its ``out_sharding`` says the logits are replicated."""
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    explicit = AxisType.Explicit in jax.sharding.get_abstract_mesh().axis_types
    logits = jnp.matmul(h, params["w2"], out_sharding=P() if explicit else None) + params["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_batches(key, steps, n=64, d_in=16, classes=4):
    """A fixed random teacher: labels from a random linear map (learnable)."""
    kt, kx = jax.random.split(key)
    teacher = jax.random.normal(kt, (d_in, classes))
    out = []
    for k in jax.random.split(kx, steps):
        x = jax.random.normal(k, (n, d_in))
        out.append({"x": x, "y": jnp.argmax(x @ teacher, axis=1)})
    return out


def count_all_gathers(jitted, *args) -> int:
    """All-gather instructions in the compiled HLO of ``jitted(*args)``."""
    hlo = jitted.lower(*args).compile().as_text()
    return len(re.findall(r"\ball-gather(-start)?\(", hlo))


def main(explicit: bool = False, steps: int = 5, m: int = 8) -> dict:
    """Trains ``steps`` SAM steps; returns the losses, the all-gather count and the shardings."""
    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    params = init_params(jax.random.PRNGKey(0))
    params = {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in params.items()}
    params = distributed.place(params, mesh)  # the specs a jitted step returns: one compilation

    # per-device m-sharpness over "data", m examples per perturbation inside each device
    data = sam_optax.data.shards(m, mesh=mesh, axis_name="data", chunk_mode="scan")
    tx = sam_optax.sam(optax.sgd(0.3, momentum=0.9))
    init, step = sam_optax.sharpness_aware_step(loss_fn, tx, geometry.l2(0.05), data)
    state = init(params)  # on the mesh: the momentum sharded like the params, counters replicated
    step = jax.jit(step)

    batches = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in make_batches(jax.random.PRNGKey(1), steps)]
    with jax.set_mesh(mesh):
        gathers = count_all_gathers(step, params, state, batches[0])
        losses = []
        for b in batches:
            params, state, out = step(params, state, b)
            losses.append(float(out.loss))
    return {
        "losses": losses,
        "all_gathers": gathers,
        "compilations": step._cache_size(),
        "specs": {n: params[n].sharding.spec for n in sorted(params)},
        "mesh": mesh,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--explicit", action="store_true", help="a mesh with Explicit axes")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    res = main(args.explicit, args.steps)
    for i, loss in enumerate(res["losses"]):
        print(f"step {i}: loss {loss:.4f}")
    print("parameter shardings:", res["specs"])
    print("all-gathers in the compiled step:", res["all_gathers"], "| compilations:", res["compilations"])
    assert res["all_gathers"] == 0, "the tensor-parallel weights were gathered"
    assert res["compilations"] == 1, "the step compiled more than once"
    assert res["losses"][-1] < res["losses"][0], "the loss did not go down"
