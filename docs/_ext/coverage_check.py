"""Sphinx extension: the build fails when a public name of the package is undocumented.

The public names are ``__all__`` of the package and of every public module in it (no path
component starting with ``_``) that defines ``__all__``. At the end of every build
(``build-finished``), each ``module.name`` must

* be described in the Python domain, on a page in the toctree: an autosummary/autodoc page
  for a function, class or constant, or ``automodule`` for a submodule;
* have a docstring of its own: not empty, not the signature that ``NamedTuple`` and dataclasses
  (Flax modules) write when the class has none; a constant needs a ``#:`` doc comment in its
  module (or in a private module under it, where it is defined).

Every miss is a warning of type ``coverage_check`` (an error under ``-W``); at the end an error
line counts them and the exit status is 1, also without ``-W`` (``coverage_check_fail = False``
in conf.py keeps only the warnings). The check runs on every build, incremental ones included.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from types import ModuleType

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

logger = logging.getLogger(__name__)


def public_modules(package: str) -> list[ModuleType]:
    """The package and its public modules that define ``__all__``, imported."""
    root = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(root.__path__, package + ".", onerror=lambda name: None):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    modules = [importlib.import_module(name) for name in names]  # an import error fails the build
    return [m for m in modules if hasattr(m, "__all__")]


def _own_doc(obj) -> str:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        # NamedTuple and dataclasses without a docstring get their signature as __doc__.
        if re.fullmatch(rf"{re.escape(obj.__name__)}\(.*\)", doc.strip(), flags=re.S):
            return ""
        return doc
    return inspect.getdoc(obj) or ""


def attr_doc(modname: str, name: str) -> list[str]:
    """The ``#:`` doc comment (or string after the assignment) of the constant ``modname.name``.

    Looked up in ``modname`` and then in its imported submodules: a constant re-exported from
    a private module (``sam_optax.trajectory._common.SCALE``) has its comment there.
    """
    prefix = modname + "."
    for candidate in [modname] + sorted(m for m in sys.modules if m.startswith(prefix)):
        try:
            docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        except Exception:  # noqa: BLE001 -- no source (extension module): no doc comment there
            continue
        lines = docs.get(("", name))
        if lines and "".join(lines).strip():
            return list(lines)
    return []


def has_docstring(module: ModuleType, name: str) -> bool:
    obj = getattr(module, name)
    if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
        return bool(_own_doc(obj).strip())
    return bool(attr_doc(module.__name__, name))


def missing_names(app, env) -> list[tuple[str, str]]:
    """``(qualified name, what is missing)`` for every undocumented public name."""
    domain = env.get_domain("py")
    # Pages reachable from the root document: a stub that autosummary wrote for an earlier
    # listing stays on disk (and is read) after its name left every listing.
    included = {env.config.root_doc}
    for children in env.toctree_includes.values():
        included.update(children)
    missing = []
    for module in public_modules(app.config.coverage_check_package):
        for name in module.__all__:
            full = f"{module.__name__}.{name}"
            obj = getattr(module, name, None)
            if obj is None and not hasattr(module, name):
                missing.append((full, "is in __all__ but not in the module"))
                continue
            if inspect.ismodule(obj):
                entry = domain.modules.get(obj.__name__)
            else:
                entry = domain.objects.get(full)
            documented = entry is not None and entry.docname in included
            if not documented:
                missing.append((full, "has no API page (list it in an autosummary of docs/api/)"))
            if not has_docstring(module, name):
                missing.append((full, "has no docstring"))
    return missing


def constant_docstring(app, what, name, obj, options, lines) -> None:
    """``autodoc-process-docstring``: a constant's page shows its ``#:`` comment, not the
    docstring of its type (``str``, ``tuple``), which autodoc shows when the comment is in a
    private module and not in the module that exports the name."""
    if what == "data":
        modname, _, attr = name.rpartition(".")
        doc = attr_doc(modname, attr)
        if doc:
            lines[:] = doc
        elif getattr(obj, "__doc__", None) == getattr(type(obj), "__doc__", None):
            lines[:] = []


def check(app, exception) -> None:
    """``build-finished``: the one event every build emits (an incremental build with nothing to
    read skips ``env-check-consistency``, but ``__all__`` may have changed)."""
    if exception is not None:
        return
    missing = missing_names(app, app.env)
    for full, what in missing:
        logger.warning("public name %s %s", full, what, type="coverage_check")
    if missing and app.config.coverage_check_fail:
        # Without -W the warnings alone would leave the exit status 0.
        logger.error("coverage_check: %d public name(s) undocumented (see the warnings above).", len(missing))
        app.statuscode = 1


def setup(app):
    app.add_config_value("coverage_check_package", "sam_optax", "env")
    app.add_config_value("coverage_check_fail", True, "env")
    app.connect("autodoc-process-docstring", constant_docstring)
    app.connect("build-finished", check)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
