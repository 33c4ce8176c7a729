"""The training runs of the multi-host test, shared by the workers and the
single-process reference (so both run exactly the same code)."""

import jax
import numpy as np
import optax

import sam_optax
from helpers import batches, loss_fn, make_params
from sam_optax import distributed, geometry

RUNS = ("sam", "wsam", "wsam_m8")
GLOBAL_BATCH = 64


def run(name, mesh, *, process_index=0, process_count=1):
    """Three steps of SAM / WSAM (per-device m-sharpness; wsam_m8 also 2 chunks per device)."""
    if name == "sam":
        tx, kwargs = sam_optax.sam(optax.sgd(0.1, momentum=0.9)), {}
    else:
        tx = sam_optax.wsam(optax.adam(1e-2), 0.8, learning_rate=1e-2)
        kwargs = {"m": 8} if name == "wsam_m8" else {}
    init, step = sam_optax.sharpness_aware_step(
        loss_fn, tx, geometry.l2(0.1), sam_optax.data.shards(mesh=mesh, **kwargs)
    )
    params = distributed.replicate(make_params(), mesh)
    state = jax.jit(init)(params)
    step = jax.jit(step)
    share = GLOBAL_BATCH // process_count
    for b in batches(3, n=GLOBAL_BATCH):
        local = jax.tree.map(lambda x: np.asarray(x)[process_index * share : (process_index + 1) * share], b)
        params, state, _ = step(params, state, distributed.global_batch(local, mesh))
    return params
