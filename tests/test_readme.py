"""The README's code blocks run as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_examples_run():
    blocks = python_blocks()
    assert len(blocks) >= 2
    ns = {}
    exec(compile(blocks[0], "README-example", "exec"), ns)
    assert float(ns["loss"]) < 1.0
    exec(compile(blocks[1], "README-m-sharpness", "exec"), ns)
    out = ns["sa_grad"](ns["params"], ns["batch"])  # mesh of 8 devices, m=8 inside each
    assert out.grads["w"].shape == (4, 3)


def test_quickstart_commands_match_ci():
    text = README.read_text()
    test_cmd = re.search(r'pip install -e "\.\[test\]" && (python -m pytest[^\n`]*)', text).group(1)
    ci = (README.parent / ".ci" / "run").read_text()
    assert test_cmd in ci


def section_blocks(heading):
    """The python blocks of one ``## heading`` section of the README."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)


@pytest.mark.slow
def test_readme_looksam_example_runs():
    blocks = python_blocks()
    ns = {}
    exec(compile(blocks[0], "README-example", "exec"), ns)
    block = next(b for b in blocks if "looksam" in b)
    exec(compile(block, "README-looksam", "exec"), ns)
    params, opt_state = ns["params"], ns["tx"].init(ns["params"])
    for _ in range(6):
        params, opt_state, loss = ns["train_step"](params, opt_state, ns["batch"])
    assert float(loss) < 1.0
    assert ns["train_step"]._cache_size() == 1


@pytest.mark.slow
def test_readme_decay_and_averaging_example_runs():
    block = next(b for b in python_blocks() if "averaging.swa(" in b)
    ns = {}
    exec(compile(block, "README-averaging", "exec"), ns)
    state = ns["opt_state"]
    assert int(state.n_averaged) == 5  # snapshots after steps 40, 45, 50, 55, 60
    assert float(ns["loss_fn"](ns["swa_weights"], ns["batch"])) < 0.7
    assert ns["slow_weights"]["w"].shape == (4, 3)


@pytest.mark.slow
def test_readme_metrics_and_flax_examples_run():
    import jax
    import numpy as np

    ns = {}
    (metrics_block,) = section_blocks("Sharpness metrics")
    exec(compile(metrics_block, "README-metrics", "exec"), ns)
    # the example's loss is least squares: its Hessian is 2/N [x 1]^T [x 1]
    x = np.asarray(ns["x"], np.float64)
    xa = np.concatenate([np.ones((64, 1)), x], axis=1)  # ravel order: b, w
    eig = np.linalg.eigvalsh(2 * xa.T @ xa / 64)
    np.testing.assert_allclose(ns["top"].eigenvalue, eig[-1], rtol=1e-4)
    np.testing.assert_allclose(ns["lambda_max"], eig[-1], rtol=1e-4)
    np.testing.assert_allclose(ns["ratio"].ratio, eig[-1] / eig[-3], rtol=1e-4)
    assert abs(float(ns["trace"].trace) - eig.sum()) < 4 * float(ns["trace"].stderr) + 1e-4
    assert float(ns["sharpness_5"].sharpness) >= float(ns["sharpness"].sharpness) > 0

    linen, nnx_block, ckpt_block = section_blocks("Flax (Linen and NNX)")
    exec(compile(linen, "README-linen", "exec"), ns)
    assert int(ns["state"].step) == 20 and float(ns["logs"]["loss"]) < 1.0
    exec(compile(nnx_block, "README-nnx", "exec"), ns)
    assert int(ns["optimizer"].step[...]) == 20 and float(ns["nnx_logs"]["loss"]) < 1.0
    before = jax.tree.leaves(ns["nnx"].state((ns["net"], ns["optimizer"])))
    exec(compile(ckpt_block, "README-checkpoint", "exec"), ns)
    for a, b in zip(jax.tree.leaves(ns["restored"]), jax.tree.leaves(ns["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after = jax.tree.leaves(ns["nnx"].state((ns["net"], ns["optimizer"])))
    assert len(before) == len(after)


def test_readme_benchmark_table_is_the_committed_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", README.parent / "benchmarks" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = README.read_text()
    block = text[text.index(mod.START) + len(mod.START) : text.index(mod.END)]
    assert block.strip() == mod.summary().strip()


def test_readme_claims_tables_are_the_saved_runs():
    import importlib.util
    import json

    results = README.parent / "benchmarks" / "results" / "claims"
    if not (results / "runs.jsonl").exists():
        import pytest

        pytest.skip("no saved claims runs")
    spec = importlib.util.spec_from_file_location("claims", README.parent / "benchmarks" / "claims.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seeds = json.loads((results / "summary.json").read_text())["seeds"]
    want = mod.report_markdown(mod.collect(mod.Store(results / "runs.jsonl"), seeds), seeds)
    text = README.read_text()
    assert text[text.index(mod.START) + len(mod.START) : text.index(mod.END)].strip() == want.strip()


@pytest.mark.slow
def test_readme_one_object_and_param_groups_section_runs():
    """The one-object form, grouped_l2 and SAM-ON example: runs, and SAM-ON perturbs only
    the normalization layer with norm rho."""
    import jax
    import jax.numpy as jnp

    (block,) = section_blocks("One object, param groups and SAM-ON")
    ns = {}
    exec(compile(block, "README-one-object", "exec"), ns)
    eps = ns["eps"]
    assert float(jnp.max(jnp.abs(eps["dense"]["kernel"]))) == 0.0
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in (eps["norm"]["scale"], eps["norm"]["bias"])))
    assert abs(float(norm) - 0.05) < 1e-6
    assert float(jnp.max(jnp.abs(ns["updates"]["dense"]["kernel"]))) > 0.0
    g, e = ns["grad_fn"](ns["params"]), ns["eps_groups"]
    gnorm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    assert jnp.allclose(e["dense"]["kernel"], 0.05 * g["dense"]["kernel"] / gnorm, atol=1e-7)
    assert jnp.allclose(e["norm"]["scale"], 0.1 * g["norm"]["scale"] / gnorm, atol=1e-7)
