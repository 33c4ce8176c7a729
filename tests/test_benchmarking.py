"""The step-cost benchmark's pieces (sam_optax/benchmarking.py, benchmarks/summarize.py,
benchmarks/accelerator.sh): the convnet, the method list against the targets, the pass/fail table,
the device-memory reading, the time budget and the markdown summary. No timings here."""

import importlib.util
import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax import benchmarking as bm

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _resnet_param_count(widths, blocks, classes=10):
    """By hand: stem conv 3x3x3xw0 + GN; per block conv 3x3 (cin->w), GN, conv 3x3 (w->w), GN, and a 1x1
    projection + GN when the shape changes; Dense (w_last -> classes) with bias. GN: scale and bias."""
    n, cin = 27 * widths[0] + 2 * widths[0], widths[0]
    for i, w in enumerate(widths):
        for b in range(blocks):
            n += 9 * cin * w + 2 * w + 9 * w * w + 2 * w
            if (i > 0 and b == 0) or cin != w:
                n += cin * w + 2 * w
            cin = w
    return n + cin * classes + classes


@pytest.mark.parametrize("widths, blocks", [((64, 128, 256, 512), 2), ((16, 32, 64), 1)])
def test_convnet_param_count_and_shapes(widths, blocks):
    net = bm.resnet(widths, blocks)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == _resnet_param_count(widths, blocks)
    if blocks == 2:
        assert 11.1e6 < count < 11.3e6  # ResNet-18 (CIFAR layout)
    out = jax.eval_shape(lambda p, x: net.apply({"params": p}, x), shapes, jnp.zeros((4, 32, 32, 3)))
    assert out.shape == (4, 10)


def test_convnet_downsamples_and_is_residual():
    net = bm.resnet((4, 8), 1)
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    # the second stage's first conv has stride 2, its projection 1x1 too: 32x32 -> 16x16 (shapes only)
    feats = jax.eval_shape(
        lambda p, x: net.apply({"params": p}, x, capture_intermediates=True, mutable=["intermediates"])[1],
        params,
        jnp.ones((1, 32, 32, 3)),
    )["intermediates"]
    assert set(params["Block_1"]) == {"Conv_0", "Conv_1", "Conv_2", "GroupNorm_0", "GroupNorm_1", "GroupNorm_2"}
    assert set(params["Block_0"]) == {"Conv_0", "Conv_1", "GroupNorm_0", "GroupNorm_1"}  # identity skip
    assert feats["Block_1"]["__call__"][0].shape == (1, 16, 16, 8)
    assert feats["Block_0"]["__call__"][0].shape == (1, 32, 32, 4)
    with pytest.raises(ValueError, match="widths"):
        bm.resnet((), 1)
    with pytest.raises(ValueError, match="blocks"):
        bm.resnet((8,), 0)


def test_every_target_has_its_method_and_names_are_unique():
    model, batch = bm._models({"mlp": 16}, 0)["mlp"]
    names = [m.name for m in bm._methods(model, 0.05, 0.05, 16)]
    assert len(names) == len(set(names))
    assert {t.row or k for k, t in bm.TARGETS.items()} <= set(names)
    assert names[:3] == ["base", "sam", "contrib_opaque"] and set(bm.REQUIRED) <= set(names)
    assert {
        "esam",
        "looksam",
        "looksam_host",
        "looksam_reuse",
        "sam_chunks",
        "sam_chunks_b4",
        "sam_chunks_vmap",
        "sam_chunks_unroll",
        "gsam",
        "wsam",
        "contrib_transparent",
    } <= set(names)


def test_models_have_their_batch_and_inputs():
    sizes = bm.batch_sizes(bm.MODELS)
    assert sizes == {"mlp": 128, "cnn": 128, "convnet": 64}
    models = bm._models(sizes, 0)
    assert models["convnet"][1]["x"].shape == (64, 32, 32, 3) and models["mlp"][1]["x"].shape == (128, 40)
    assert bm.batch_sizes(["convnet"], 256) == {"convnet": 256}
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of 8"):
        bm.batch_sizes(["mlp"], 12)
    with pytest.raises(ValueError, match="models must be among"):
        bm.batch_sizes(["resnet"])


def _row(base=1.0, sam=1.0, contrib=1.0, extra=0.0):
    return {
        "ratio_to_base": base,
        "ratio_to_sam": sam,
        "ratio_to_contrib_opaque": contrib,
        "extra_peak_over_base_in_param_bytes": extra,
    }


def test_targets_apply_per_model_and_backend():
    table = {
        "sam": _row(base=2.0, contrib=0.99, extra=0.5),
        "looksam": _row(base=1.3),
        "looksam_host": _row(base=1.2),
        "looksam_reuse": _row(base=1.06),
        "sam_chunks": _row(sam=1.09),
    }
    cpu_mlp = bm.targets(table, "mlp", "cpu")
    assert cpu_mlp["looksam"] == {"value": 1.3, "target": "<= 1.23 x base", "applies": True, "met": False}
    assert cpu_mlp["looksam_host"]["met"] is True and cpu_mlp["looksam_reuse"]["met"] is False
    assert cpu_mlp["sam_chunks"]["met"] is True and cpu_mlp["sam"]["met"] is True
    assert cpu_mlp["sam_vs_contrib"]["value"] == 0.99 and cpu_mlp["sam_vs_contrib"]["met"] is False
    assert cpu_mlp["sam_extra_memory"]["value"] == 0.5 and cpu_mlp["sam_extra_memory"]["met"] is True
    assert cpu_mlp["gsam"] == {"value": None, "target": "<= 1.03 x sam", "applies": True, "met": None}
    cpu_conv = bm.targets(table, "convnet", "cpu")["looksam"]
    assert cpu_conv["applies"] is False and cpu_conv["met"] is None and cpu_conv["value"] == 1.3
    assert bm.targets(table, "convnet", "gpu")["looksam"]["met"] is False


def test_device_peak_is_exact_only_when_the_high_water_mark_rose():
    before = {"bytes_in_use": 100, "peak_bytes_in_use": 1000}
    assert bm.device_step_peak(before, {"bytes_in_use": 300, "peak_bytes_in_use": 1500})["device_peak_bytes"] == 1400
    same = bm.device_step_peak(before, {"bytes_in_use": 300, "peak_bytes_in_use": 1000})
    assert same["device_peak_bytes"] is None and same["upper_bound_bytes"] == 900
    assert bm._device_memory() is None  # CPU: no memory_stats


def test_time_budget_compiles_only_the_references():
    step = jax.jit(lambda p, s, b: (p + b, s, jnp.sum(p)))
    methods = [bm.Method(n, step, lambda p: None) for n in ("base", "sam", "wsam", "contrib_opaque")]
    x = jnp.ones(3)
    state, info = bm._compile_all("m", methods, x, x, progress=False, deadline=0.0)
    assert sorted(info) == ["base", "contrib_opaque", "sam"]
    assert info["sam"]["device_memory"] is None and info["sam"]["memory"]["peak_bytes"] > 0
    done = bm._time_rounds(
        "m",
        [m for m in methods if m.name in info],
        state,
        info,
        x,
        rounds=5,
        steps_per_round=1,
        seed=0,
        progress=False,
        deadline=0.0,
    )
    assert done == 1 and all(len(i["times"]) == 1 for i in info.values())


def test_bench_parser_validates_models_and_convnet():
    _, args = bm._parse(
        [
            "--models",
            "convnet",
            "--convnet-widths",
            "64",
            "128",
            "256",
            "512",
            "--convnet-blocks",
            "2",
            "--batch-size",
            "256",
            "--max-seconds",
            "200",
        ]
    )
    assert args.models == ["convnet"] and args.convnet_widths == [64, 128, 256, 512] and args.max_seconds == 200
    assert bm._parse([])[1].batch_size is None and bm._parse([])[1].models == ["mlp", "cnn", "convnet"]
    for bad in (["--models", "resnet"], ["--convnet-widths", "0"], ["--max-seconds", "-1"], ["--batch-size", "12"]):
        with pytest.raises(SystemExit) as e:
            bm._parse(bad)
        assert e.value.code == 2


def _summarize_module():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_results(backend):
    info = {}
    for i, name in enumerate(["base", "sam", "contrib_opaque", "looksam", "sam_chunks"]):
        t = [1.0 + i, 2.0 + i]
        info[name] = {
            "times": t,
            "compile_s": 1.0,
            "flops": 10.0 * (i + 1),
            "bytes_accessed": 5.0,
            "memory": {"peak_bytes": 100 * (i + 1)},
            "device_memory": None,
        }
    methods = [bm.Method(n, None, None) for n in info]
    table = bm._summarize(methods, info, param_bytes=50)
    machine = {
        "backend": backend,
        "device": "NVIDIA H200" if backend == "gpu" else "cpu",
        "devices": 1,
        "cpu_count": 16,
        "platform": "Linux",
        "jax": "0.10.2",
    }
    model = {
        "batch_size": 256,
        "param_bytes": 50,
        "param_count": 11_200_000,
        "rounds_done": 2,
        "skipped": [],
        "methods": table,
        "targets": bm.targets(table, "convnet", backend),
    }
    return {
        "machine": machine,
        "settings": {
            "batch_size": 256,
            "rounds": 2,
            "steps_per_round": 1,
            "convnet": {"widths": [64, 128, 256, 512], "blocks": 2},
        },
        "complete": True,
        "models": {"convnet": model},
    }


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_summary_of_new_results_names_the_machine_and_the_targets(tmp_path, backend):
    mod = _summarize_module()
    path = tmp_path / f"step_cost_{backend}.json"
    path.write_text(json.dumps(_fake_results(backend)))
    text = mod.summary(path)
    assert ("1 x NVIDIA H200 (gpu" in text) == (backend == "gpu") and "batch: convnet 256" in text
    assert "widths 64-128-256-512, 2 block(s) per stage, 11.20M params" in text
    rows = [line for line in text.splitlines() if line.startswith("| sam_chunks |")]
    # sam_chunks: times 5, 6 against base's 1, 2 -> median of (5, 3) = 4; against SAM's 2, 3 -> median of
    # (2.5, 2.0) = 2.25; FLOPs 50 / SAM's 20, bytes equal, peak 500 / SAM's 200, no device peak
    assert rows[0].startswith("| sam_chunks | 4.00 | 2.25 |")
    assert rows[1] == "| sam_chunks | 2.50 | 1.00 | 2.50 | - | 1.0 |"
    looksam = next(line for line in text.splitlines() if line.startswith("| looksam <= 1.23 x base"))
    assert looksam.endswith("*report only* |") == (backend == "cpu") and "3.250" in looksam  # (4/1, 5/2)
    assert "| wsam <= 1.03 x sam | - |" in text  # not run
    mod.main([str(path), "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text() == text + "\n"


def test_accelerator_script_is_valid_bash_with_every_stage_timed():
    script = (ROOT / "benchmarks" / "accelerator.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "accelerator.sh")]).returncode == 0
    assert "timeout -s INT -k 30" in script and "SAM_OPTAX_TEST_ON_DEVICE=1" in script
    assert "--convnet-widths 64 128 256 512 --convnet-blocks 2 --batch-size 256" in script
