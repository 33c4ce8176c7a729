"""Really two JAX processes on 127.0.0.1 (gloo CPU collectives), 2 devices each:
the parameters after several SAM / WSAM steps equal the same run in one process
with the same total device count (4)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from multihost_runs import RUNS, run
from sam_optax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # no 8 forced devices: 2 per process
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", port, "2",
                               str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=240)
            logs.append(stdout)
    except subprocess.TimeoutExpired:
        pytest.fail("multi-host workers timed out")
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return out


@pytest.mark.parametrize("name", RUNS)
def test_two_processes_equal_one_process_with_the_same_devices(name, two_process_results):
    if jax.device_count() < 4:
        pytest.skip("needs 4 local devices for the reference")
    ref = run(name, distributed.data_mesh(devices=jax.devices()[:4]))
    got = np.load(two_process_results / f"{name}.npz")
    leaves = jax.tree.leaves(ref)
    assert len(got.files) == len(leaves)
    for i, x in enumerate(leaves):
        np.testing.assert_allclose(got[str(i)], np.asarray(x), rtol=1e-5, atol=1e-6)


def test_per_device_perturbations_differ_from_global_sam(two_process_results):
    if jax.device_count() < 4:
        pytest.skip("needs 4 local devices for the reference")
    got = np.load(two_process_results / "sam.npz")
    global_sam = jax.tree.leaves(run("sam", distributed.data_mesh(devices=jax.devices()[:1])))
    diff = max(float(np.max(np.abs(got[str(i)] - np.asarray(x)))) for i, x in enumerate(global_sam))
    assert diff > 1e-4  # 4 shards of 16, each with its own perturbation, is not SAM on 64
