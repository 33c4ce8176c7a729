"""The Sphinx docs (docs/): the build passes with warnings as errors, every public name has its
page, and the coverage extension (docs/_ext/coverage_check.py) finds what is undocumented."""

import importlib.util
import pathlib
import re
import subprocess
import sys
import types
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def load_extension():
    pytest.importorskip("sphinx")
    spec = importlib.util.spec_from_file_location("coverage_check", DOCS / "_ext" / "coverage_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_getting_started_example_is_the_readmes():
    # tests/test_readme.py runs the README's first block; the page must show that same code.
    page = [b for b in python_blocks(DOCS / "getting_started.md") if "import sam_optax" in b]
    assert page == [python_blocks(ROOT / "README.md")[0]]


def test_public_modules_are_found():
    ext = load_extension()
    names = {m.__name__ for m in ext.public_modules("sam_optax")}
    expected = {"sam_optax", "sam_optax.geometry", "sam_optax.data", "sam_optax.rules", "sam_optax.decay"}
    expected |= {"sam_optax.averaging", "sam_optax.metrics", "sam_optax.one_pass", "sam_optax.trajectory"}
    expected |= {"sam_optax.swp", "sam_optax.distributed", "sam_optax.flax", "sam_optax.experiments"}
    assert expected <= names
    assert not any(part.startswith("_") for name in names for part in name.split("."))
    # Every module with __all__ has its page in docs/api/.
    pages = {p.stem for p in (DOCS / "api").glob("*.md")}
    for name in names:
        assert (name.removeprefix("sam_optax.").replace(".", "_") if name != "sam_optax" else name) in pages


def test_docstring_check():
    ext = load_extension()

    class Bare(NamedTuple):
        x: int

    class Documented(NamedTuple):
        """A state."""

        x: int

    def bare():
        pass

    def documented():
        """Does it."""

    fake = types.ModuleType("fake_module")  # no source: no #: comments
    fake.Bare, fake.Documented, fake.bare, fake.documented, fake.CONST = Bare, Documented, bare, documented, "v"
    assert not ext.has_docstring(fake, "Bare")  # NamedTuple's own "Bare(x,)" is not a docstring
    assert ext.has_docstring(fake, "Documented")
    assert not ext.has_docstring(fake, "bare")
    assert ext.has_docstring(fake, "documented")
    assert not ext.has_docstring(fake, "CONST")
    # A constant's #: comment, in the private module that defines it.
    import sam_optax.trajectory

    assert ext.has_docstring(sam_optax.trajectory, "SCALE")
    assert ext.attr_doc("sam_optax.trajectory", "TARGETS")[0].startswith("Batch key")


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    for name in ("sphinx", "myst_nb", "sphinx_book_theme"):
        pytest.importorskip(name)
    out = tmp_path / "html"
    # The notebooks are not executed here: .ci/run's build executes them (checked with the site).
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-D", "nb_execution_mode=off"]
    cmd += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("sam_optax.sam", "sam_optax.rules.wsam", "sam_optax.geometry.l2", "sam_optax.flax.TrainState"):
        assert (out / "_autosummary" / f"{name}.html").is_file(), name
    scale = (out / "_autosummary" / "sam_optax.trajectory.SCALE.html").read_text()
    assert "per-example multiplier" in scale and "str(object=" not in scale  # its #: comment, not str's doc
    assert (out / "api" / "geometry.html").is_file()
    assert (out / "notebooks" / "01_quickstart.html").is_file()


# Every rule, geometry and wrapper (every public function and class that is not a NamedTuple
# state) has a docstring example that prints its result, checked by pytest's doctest run.
EXAMPLE_MODULES = (
    "sam_optax",
    "sam_optax.rules",
    "sam_optax.geometry",
    "sam_optax.data",
    "sam_optax.one_pass",
    "sam_optax.trajectory",
    "sam_optax.averaging",
    "sam_optax.decay",
    "sam_optax.metrics",
    "sam_optax.swp",
    "sam_optax.distributed",
    "sam_optax.flax",
)


def names_without_printed_example(module_names=EXAMPLE_MODULES):
    import doctest
    import importlib
    import inspect

    finder = doctest.DocTestFinder()
    missing = []
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or (
                inspect.isclass(obj) and issubclass(obj, tuple)
            ):
                continue
            tests = finder.find(obj, name) if obj.__doc__ else []
            if not any(e.want.strip() for t in tests if t.name.endswith(name) for e in t.examples):
                missing.append(f"{module_name}.{name}")
    return missing


def test_every_rule_geometry_and_wrapper_has_a_printed_example():
    assert names_without_printed_example() == []


def test_printed_example_check_finds_a_missing_one():
    fake = types.ModuleType("fake_examples")

    def shown():
        """Does it.

        Examples:
          >>> print(1 + 1)
          2
        """

    def silent():
        """Does it.

        Examples:
          >>> x = 1
        """

    fake.shown, fake.silent, fake.__all__ = shown, silent, ["shown", "silent"]
    sys.modules["fake_examples"] = fake
    try:
        assert names_without_printed_example(["fake_examples"]) == ["fake_examples.silent"]
    finally:
        del sys.modules["fake_examples"]


SITE = DOCS / "_build" / "html"


def site_checker():
    import shutil

    pytest.importorskip("playwright")
    if not (SITE / "index.html").exists():
        pytest.skip("the site is not built (.ci/run builds it before the tests)")
    if not shutil.which("chromium"):
        pytest.skip("no chromium (.ci/run installs Debian's)")
    spec = importlib.util.spec_from_file_location("check_site", DOCS / "check_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_site_check_passes_and_finds_what_is_broken(tmp_path):
    import shutil

    check = site_checker()
    assert check.check_site(SITE) == []
    broken = tmp_path / "html"
    shutil.copytree(SITE, broken)
    index = broken / "index.html"
    index.write_text(index.read_text().replace('href="getting_started.html"', 'href="gone.html"'))
    shutil.rmtree(broken / "_static" / "mathjax")  # equations stay TeX
    (broken / "_autosummary" / "sam_optax.rules.sam.html").unlink()
    problems = check.check_site(broken)
    assert any(p.startswith("index.html: broken link") and "gone.html" in p for p in problems)
    assert any(p.startswith("methods/sam.html:") and "not rendered" in p for p in problems)
    assert "_autosummary/sam_optax.rules.sam.html: missing page (HTTP 404)" in problems
    # The build that made the site (.ci/run's) executed the notebooks: their outputs are on the pages.
    assert 'class="cell_output' in (SITE / "notebooks" / "01_quickstart.html").read_text()
