"""Really two JAX processes on 127.0.0.1 (gloo CPU collectives), 2 devices each:
the parameters after several SAM / WSAM steps equal the same run in one process
with the same total device count (4)."""

import os
import socket
import subprocess
import sys
import time

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


DEADLINE_S = 240  # for both workers together


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # no 8 forced devices: 2 per process
    port = str(free_port())
    procs, logs = [], [out / f"worker{i}.log" for i in range(2)]
    deadline = time.monotonic() + DEADLINE_S
    try:
        for i in range(2):  # output to files: a full pipe can never block a worker
            with open(logs[i], "w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", port, "2", str(out)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-host workers still running after {DEADLINE_S} s:\n" + tails(logs))
    finally:
        for p in procs:  # never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p in procs:
        assert p.returncode == 0, tails(logs)
    return out


def tails(logs):
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in logs if log.exists())


def load(out, name, process):
    got = np.load(out / f"{name}.p{process}.npz")
    return [got[str(i)] for i in range(len(got.files))]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_two_processes_equal_one_process_with_the_same_devices(name, two_process_results):
    if jax.device_count() < 4:
        pytest.skip("needs 4 local devices for the reference")
    ref = run(name, distributed.data_mesh(devices=jax.devices()[:4]))
    leaves = jax.tree.leaves(ref)
    for process in range(2):  # each process's replica of the params
        got = load(two_process_results, name, process)
        assert len(got) == len(leaves)
        for g, x in zip(got, leaves):
            np.testing.assert_allclose(g, np.asarray(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_device_perturbations_differ_from_global_sam(two_process_results):
    if jax.device_count() < 4:
        pytest.skip("needs 4 local devices for the reference")
    got = load(two_process_results, "sam", 0)
    global_sam = jax.tree.leaves(run("sam", distributed.data_mesh(devices=jax.devices()[:1])))
    diff = max(float(np.max(np.abs(g - np.asarray(x)))) for g, x in zip(got, global_sam))
    assert diff > 1e-4  # 4 shards of 16, each with its own perturbation, is not SAM on 64


def test_distributed_helpers_in_one_process():
    """With one process the local data is the whole global batch; shardings as documented."""
    mesh = distributed.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    x = np.arange(8.0 * jax.device_count()).reshape(-1, 2)
    batch = distributed.global_batch({"x": x}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["x"]), x)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
    assert len({str(s.index) for s in batch["x"].addressable_shards}) == jax.device_count()  # split, not copied
    params = distributed.replicate({"w": np.ones(3)}, mesh)
    assert params["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(distributed.to_host(params)["w"], np.ones(3))
