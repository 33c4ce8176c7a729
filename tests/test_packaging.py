"""Packaging (issue 14): optional dependencies, the package's import graph, public names, the
single-sourced version, and the built wheel installed outside the checkout."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sam_optax"
OPTIONAL = ("flax", "matplotlib", "tqdm", "sklearn", "mnist1d")  # top-level modules of the extras
HARNESS = ("sam_optax.experiments", "sam_optax.benchmarking", "sam_optax.cli")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}

# A meta path finder, first in sys.meta_path, for which the extras' modules are not installed.
BLOCK = f"""
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_python(code: str, cwd=ROOT) -> dict:
    """Runs ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- without the extras

LIBRARY_WITHOUT_EXTRAS = """
import json
import jax, jax.numpy as jnp, optax
import sam_optax
from sam_optax import *  # noqa: F403 -- every name of __all__ exists without the extras
from sam_optax import geometry

def loss(w, x):  # 0.5 mean_i ||w - x_i||^2: gradient w - mean(x)
    return 0.5 * jnp.mean(jnp.sum((w - x) ** 2, axis=-1))

init, step = sam_optax.sharpness_aware_step(loss, sam_optax.sam(optax.sgd(0.1)), geometry.l2(0.05))
w = jnp.array([3.0, 4.0])
w1, _, _ = jax.jit(step)(w, init(w), jnp.zeros((4, 2)))
errors = {}
for how in ("attribute", "import"):
    try:
        sam_optax.flax if how == "attribute" else __import__("sam_optax.flax")
    except ImportError as e:
        errors[how] = str(e)
for name in ("recompute_batch_stats", "recompute_batch_stats_nnx"):
    try:
        getattr(sam_optax.averaging, name)(*[None] * (3 if name == "recompute_batch_stats" else 2))
    except ImportError as e:
        errors[name] = str(e)
import sam_optax.benchmarking  # its flax models are built on first use
print(json.dumps({
    "w1": [float(v) for v in w1],
    "errors": errors,
    "loaded": sorted(m for m in sys.modules if m.partition(".")[0] in %r),
}))
"""


@pytest.mark.slow
def test_import_and_a_sam_step_without_the_optional_dependencies():
    got = run_python(BLOCK + LIBRARY_WITHOUT_EXTRAS % (OPTIONAL,))
    # SAM by hand: g = w = (3, 4), eps = 0.05 g / 5, w1 = w - 0.1 (w + eps) (plain SGD: 2.7, 3.6)
    assert got["w1"] == pytest.approx([3 - 0.1 * 3.03, 4 - 0.1 * 4.04], rel=1e-6)
    assert set(got["errors"]) == {"attribute", "import", "recompute_batch_stats", "recompute_batch_stats_nnx"}
    for how, message in got["errors"].items():
        assert message.startswith(how if how.startswith("recompute") else "sam_optax.flax")
        assert " needs Flax" in message and message.endswith("pip install sam-optax[flax]")
    assert got["loaded"] == []


CLI_WITHOUT_EXTRAS = """
import contextlib, io, json, os, sys
from sam_optax import cli

out_dir = sys.argv[1]
results = {}
for name, argv in {
    "help": ["--help"],
    "compare_help": ["compare", "--help"],
    "compare": ["compare", "--out", out_dir],
    "compare_digits": ["compare", "--dataset", "digits", "--no-progress", "--out", out_dir],
    "toy": ["toy", "--out", out_dir],
    "bench": ["bench", "--out", out_dir],
}.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:
            rc = e.code
    results[name] = {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}
results["out_dir_made"] = os.path.exists(out_dir)
print(json.dumps(results))
"""


def test_cli_without_the_extras_helps_and_names_the_extra_to_install(tmp_path):
    code = BLOCK + CLI_WITHOUT_EXTRAS.replace("sys.argv[1]", repr(str(tmp_path / "runs")))
    got = run_python(code)
    for name in ("help", "compare_help"):
        assert got[name]["rc"] == 0 and "usage: sam-optax" in got[name]["out"], got[name]
    expected = {
        "compare": ("flax, mnist1d, matplotlib, tqdm", "examples"),
        "compare_digits": ("flax, sklearn, matplotlib", "examples"),
        "toy": ("matplotlib", "examples"),
        "bench": ("flax", "flax"),
    }
    for name, (modules, extra) in expected.items():
        r = got[name]
        command = name.partition("_")[0]
        assert r["rc"] == 1 and r["out"] == "", r
        assert r["err"] == (
            f"sam-optax {command}: error: needs {modules}, not installed: pip install sam-optax[{extra}]\n"
        )
    assert not got["out_dir_made"]  # the check comes before any output folder is made


# --------------------------------------------------------------------------- the import graph


@pytest.mark.slow
def test_import_sam_optax_loads_neither_the_harness_nor_the_extras():
    """With every extra installed, ``import sam_optax`` still loads only the library."""
    code = "import json, sys, sam_optax\nprint(json.dumps(sorted(sys.modules)))"
    loaded = run_python(code)
    assert "sam_optax.decay" in loaded  # the check sees the package's submodules
    assert [m for m in loaded if m.startswith(HARNESS)] == []
    assert [m for m in loaded if m.partition(".")[0] in OPTIONAL] == []


def import_time_imports(tree: ast.Module):
    """``(line, module)`` of the imports run when the module is imported: not inside a
    function, not under ``if TYPE_CHECKING:``."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        todo.extend(ast.iter_child_nodes(node))
    return out


def core_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(("sam_optax/experiments/", "sam_optax/benchmarking.py", "sam_optax/cli.py")):
            yield rel, ast.parse(path.read_text())


def test_no_core_module_imports_the_harness_or_an_extra_at_import_time():
    harness = re.compile(r"sam_optax\.(experiments|benchmarking|cli)\b")
    found_core, bad_harness, bad_extra = 0, [], []
    for rel, tree in core_modules():
        found_core += 1
        for node in ast.walk(tree):  # the harness: not even inside a function
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            bad_harness += [f"{rel}:{node.lineno} {n}" for n in names if harness.match(n)]
        if not rel.startswith("sam_optax/flax/"):  # sam_optax.flax is the flax extra's module
            bad_extra += [f"{rel}:{ln} {n}" for ln, n in import_time_imports(tree) if n.partition(".")[0] in OPTIONAL]
    assert found_core > 30
    assert bad_harness == []
    assert bad_extra == []


def test_import_time_imports_sees_what_runs_at_import():
    tree = ast.parse(
        textwrap.dedent(
            """
            import flax
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                import tqdm
            try:
                from matplotlib import pyplot
            except ImportError:
                pass
            class A:
                import sklearn
            def f():
                import mnist1d
            """
        )
    )
    names = sorted(n for _, n in import_time_imports(tree))
    assert names == ["flax", "matplotlib.pyplot", "sklearn", "typing.TYPE_CHECKING"]


# --------------------------------------------------------------------------- names and metadata


def test_public_names_do_not_shadow_optax():
    """``adamw`` / ``sgdw`` (decay multiplied by the schedule multiplier, not by the learning
    rate as in ``optax.adamw``) live in ``sam_optax.decay`` only."""
    for name in ("adamw", "sgdw"):
        assert name not in sam_optax.__all__
        assert not hasattr(sam_optax, name)
        assert name in sam_optax.decay.__all__ and callable(getattr(sam_optax.decay, name))
    assert sam_optax.decoupled_weight_decay is sam_optax.decay.decoupled_weight_decay
    # the optional flax module and the experiment harness are not part of `from sam_optax import *`
    assert not {"flax", "experiments"} & set(sam_optax.__all__)
    assert [n for n in sam_optax.__all__ if not hasattr(sam_optax, n)] == []
    assert len(set(sam_optax.__all__)) == len(sam_optax.__all__)


def extra_requirements(name: str, extras: dict) -> set[str]:
    """The distribution names an extra installs, self-references (``sam-optax[a,b]``) resolved."""
    out = set()
    for req in extras[name]:
        dist = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        if dist == "sam-optax":
            for inner in re.search(r"\[(.*)\]", req).group(1).split(","):
                out |= extra_requirements(inner.strip(), extras)
        else:
            out.add(dist)
    return out


def test_extras_and_dependencies():
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    core = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in project["dependencies"]}
    assert core == {"jax", "jaxlib", "optax", "numpy"}  # flax is the `flax` extra; chex is not used
    assert extra_requirements("flax", extras) == {"flax"}
    assert {"flax", "scikit-learn", "mnist1d", "matplotlib", "tqdm"} <= extra_requirements("examples", extras)
    test = extra_requirements("test", extras)
    assert extra_requirements("flax", extras) | extra_requirements("examples", extras) <= test
    assert {"build", "setuptools", "pytest"} <= test
    assert "slow" in " ".join(pyproject()["tool"]["pytest"]["ini_options"]["markers"])


def test_version_has_one_source():
    config = pyproject()
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sam_optax.__version__"}
    # setuptools reads the attribute without importing sam_optax (no jax in the build
    # environment): it must stay a plain string literal assigned at module level
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    (value,) = [
        n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == ["__version__"]
        if isinstance(n.value, ast.Constant)
    ]
    assert value == sam_optax.__version__ and re.fullmatch(r"\d+\.\d+\.\d+([a-z]+\d+)?", value)


# --------------------------------------------------------------------------- the built wheel


def built_wheel(tmp_path) -> pathlib.Path:
    """``$SAM_OPTAX_WHEEL`` if set (a wheel built earlier), else sdist and wheel built here
    (the wheel from the sdist) with this environment's setuptools."""
    if os.environ.get("SAM_OPTAX_WHEEL"):
        return pathlib.Path(os.environ["SAM_OPTAX_WHEEL"])
    dist = tmp_path / "dist"
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(list(dist.glob("*.tar.gz"))) == 1
    (wheel,) = dist.glob("*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_from_there(tmp_path):
    wheel = built_wheel(tmp_path)
    version = sam_optax.__version__
    assert wheel.name == f"sam_optax-{version}-py3-none-any.whl"
    files = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")} | {"sam_optax/py.typed"}
    assert sources <= files  # every module, the typing marker
    assert not [f for f in files if f.startswith(("tests/", "benchmarks/", "examples/", "notebooks/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)]
    out = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr

    code = (
        "import json, sys, importlib.metadata as md, sam_optax\n"
        "print(json.dumps({'version': sam_optax.__version__, 'file': sam_optax.__file__,"
        " 'dist_version': md.version('sam-optax'), 'prefix': sys.prefix}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["version"] == got["dist_version"] == version
    site = pathlib.Path(got["prefix"]).resolve()
    assert site == venv.resolve()
    module = pathlib.Path(got["file"]).resolve()
    assert module.is_relative_to(site) and not module.is_relative_to(ROOT)  # the venv's copy, not the checkout

    script = venv / "bin" / "sam-optax"  # the console script runs the installed cli
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and "usage: sam-optax" in out.stdout, out.stderr
