"""The README's code blocks run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


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


def test_readme_decay_and_averaging_example_runs():
    block = next(b for b in python_blocks() if "averaging.swa(" in b)
    ns = {}
    exec(compile(block, "README-averaging", "exec"), ns)
    state = ns["opt_state"]
    assert int(state.n_averaged) == 5  # snapshots after steps 40, 45, 50, 55, 60
    assert float(ns["loss_fn"](ns["swa_weights"], ns["batch"])) < 0.7
    assert ns["slow_weights"]["w"].shape == (4, 3)
