"""One process of the 2-process test in test_multihost.py (not a test module).

usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES OUT_DIR
"""

import os
import sys

pid, nproc, port, local_devices, out_dir = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    int(sys.argv[4]),
    sys.argv[5],
)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", local_devices)
jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=nproc,
    process_id=pid,
    initialization_timeout=60,
    heartbeat_timeout_seconds=20,
    shutdown_timeout_seconds=20,
)

import numpy as np  # noqa: E402

from multihost_runs import RUNS, run  # noqa: E402
from sam_optax import distributed  # noqa: E402

assert jax.process_count() == nproc and jax.device_count() == nproc * local_devices
mesh = distributed.data_mesh()
for name in RUNS:
    params = run(name, mesh, process_index=pid, process_count=nproc)
    # every process saves its own replica: the test checks that they all agree
    np.savez(
        os.path.join(out_dir, f"{name}.p{pid}.npz"),
        **{str(i): x for i, x in enumerate(jax.tree.leaves(distributed.to_host(params)))},
    )
jax.distributed.shutdown()
print(f"process {pid} done", flush=True)
