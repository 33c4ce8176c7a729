"""The generated blocks of docs/benchmarks/*.md are the scripts' output for the committed results,
and the block writer (benchmarks/_pages.py) writes between the markers or not at all."""

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PAGES = ROOT / "docs" / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))  # the scripts import each other and _pages
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_block_writer_replaces_between_markers_or_raises(tmp_path):
    pages = load("_pages")
    page = tmp_path / "p.md"
    page.write_text("a\n<!-- x:start -->\nold\n<!-- x:end -->\nb\n")
    pages.write_block(page, "<!-- x:start -->", "<!-- x:end -->", "new\ntable")
    assert page.read_text() == "a\n<!-- x:start -->\nnew\ntable\n<!-- x:end -->\nb\n"
    assert pages.block(page, "<!-- x:start -->", "<!-- x:end -->") == "new\ntable"
    page.write_text("<!-- x:end -->\n<!-- x:start -->\n")  # out of order
    with pytest.raises(ValueError, match="markers"):
        pages.write_block(page, "<!-- x:start -->", "<!-- x:end -->", "t")
    assert page.read_text() == "<!-- x:end -->\n<!-- x:start -->\n" and [p.name for p in tmp_path.iterdir()] == ["p.md"]


def test_step_cost_page_is_the_committed_results():
    mod, pages = load("summarize"), load("_pages")
    assert mod.PAGE == PAGES / "step_cost.md"
    text = pages.block(mod.PAGE, mod.START, mod.END)
    assert text == mod.summary().strip() and "Measured with `sam-optax bench` on" in text


def test_claims_page_is_the_saved_runs():
    mod, pages = load("claims"), load("_pages")
    results = BENCH / "results" / "claims"
    seeds = json.loads((results / "summary.json").read_text())["seeds"]
    want = mod.report_markdown(mod.collect(mod.Store(results / "runs.jsonl"), seeds), seeds)
    assert pages.block(mod.PAGE, mod.START, mod.END) == want.strip()


def test_frontier_page_is_the_saved_runs():
    mod, pages = load("frontier"), load("_pages")
    summary = json.loads((BENCH / "results" / "frontier" / "summary.json").read_text())
    text = pages.block(mod.PAGE, mod.START, mod.END)
    assert text == mod.report_markdown(summary).strip()
    assert "jax 0.10" in text  # the header names the machine the cost was timed on
