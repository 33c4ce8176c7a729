"""The README: short, its example runs, its two set-up commands are the ones CI runs, and its
results block is generated from the committed results."""

import importlib.util
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.slow
def test_readme_example_runs():
    (block,) = python_blocks()
    ns = {}
    exec(compile(block, "README-example", "exec"), ns)
    assert float(ns["loss"]) < 1.0
    assert ns["train_step"]._cache_size() == 1  # no recompilation after step 1


def test_quickstart_commands_match_ci():
    text = README.read_text()
    # Exactly two set-up commands for a fresh machine: the main job and the tests.
    setups = re.findall(r'^pip install -e "\.\[[a-z]+\]" && .*$', text, flags=re.M)
    assert setups == [
        'pip install -e ".[examples]" && sam-optax compare',
        'pip install -e ".[test]" && python -m pytest -q -n 2',
    ]
    test_cmd = setups[1].split(" && ")[1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_results_are_generated_from_the_committed_results():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("headline", ROOT / "benchmarks" / "headline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = README.read_text()
    assert text[text.index(mod.START) + len(mod.START) : text.index(mod.END)].strip() == mod.headline().strip()
    assert "| sam |" in mod.headline()


def test_readme_links_resolve():
    # Relative links (docs pages, notebooks) point at files of the repository.
    for target in re.findall(r"\]\(([^)#]+)\)", README.read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), target
