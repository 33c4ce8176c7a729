"""SWAP end to end at small scale (examples/swap_digits.py): replicas vmapped and laid out on
a mesh axis of 4 of the 8 simulated devices, the average is the mean of the replicas,
BatchNorm recomputed for the average."""

import importlib.util
import pathlib
import sys

import jax
import numpy as np
import pytest

from helpers import assert_trees_close

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "swap_digits.py"


@pytest.fixture(scope="module")
def swap():
    spec = importlib.util.spec_from_file_location("swap_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["swap_digits"] = module  # flax dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SMALL = dict(replicas=4, phase1_steps=20, phase2_steps=30)


@pytest.fixture(scope="module")
def result(swap):
    return swap.run(mesh=True, **SMALL)


@pytest.mark.slow
@pytest.mark.multidevice
def test_swap_average_is_the_mean_of_independent_replicas(result):
    rp = result["replica_params"]
    assert_trees_close(
        result["swap_params"], jax.tree.map(lambda x: np.mean(np.asarray(x, np.float64), 0), rp), rtol=1e-6, atol=1e-7
    )
    k = np.asarray(rp["Dense_0"]["kernel"])
    assert min(np.abs(k[i] - k[j]).max() for i in range(4) for j in range(i)) > 1e-3  # own data orders
    assert result["swap_accuracy"] >= 0.9 and min(result["replica_accuracies"]) >= 0.9


@pytest.mark.multidevice
def test_swap_batchnorm_statistics_are_those_of_the_averaged_network(result):
    p = result["swap_params"]["Dense_0"]
    x = np.asarray(result["train_x"], np.float64)
    h = x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    stats = result["swap_batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-5, atol=1e-5)  # 7 equal batches of 200
    np.testing.assert_allclose(
        stats["var"], np.mean([h[i : i + 200].var(0) for i in range(0, 1400, 200)], 0), rtol=1e-4, atol=1e-5
    )


@pytest.mark.multidevice
def test_swap_replicas_live_on_the_mesh_axis(result):
    kernel = result["replica_params"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec[0] == "replica"
    assert len(kernel.sharding.device_set) == 4
