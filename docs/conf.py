"""Sphinx configuration of the sam_optax documentation (built as optax builds its docs).

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html`` (warnings are errors).
"""

import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))  # the checkout's sam_optax, also when it is not installed

import sam_optax  # noqa: E402

project = "sam_optax"
author = "sam_optax developers"
copyright = "sam_optax developers"
release = version = sam_optax.__version__

extensions = [
    "myst_nb",  # MyST markdown pages and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from _static: equations render without a network
    "sphinx.ext.viewcode",
    "sphinx.ext.doctest",
    "coverage_check",  # docs/_ext: every public name has an API page and a docstring
]

# .rst first: autosummary writes its stub pages (reStructuredText) with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]  # autosummary/class.rst: a class page without tuple's methods

# API reference: one generated page per name listed in docs/api/*.md (docs/_autosummary, not
# committed).
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
# Types in the parameter list (documented parameters only), not in the signature, where
# optax's ScalarOrSchedule and the pytree aliases expand to lines of unions.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MyST markdown and notebooks. The notebooks are committed without outputs and executed at every
# build ("auto": the ones without outputs), so the site shows what the code gives now; a notebook
# that raises fails the build.
myst_enable_extensions = ["dollarmath", "colon_fence"]
nb_execution_mode = "auto"
nb_execution_timeout = 600
nb_execution_in_temp = True  # files a notebook writes (its figures) go to a temporary folder
nb_execution_raise_on_error = True
nb_execution_show_tb = True

html_theme = "sphinx_book_theme"
html_title = "sam_optax"
# The sidebar stops at the module pages (depth 2): the 200 API pages under them made every page
# render the whole tree (a 55 s build instead of 19 s); the module pages link their names.
html_theme_options = {"show_toc_level": 2, "max_navbar_depth": 2, "collapse_navbar": True}


def _skip_duplicate_aliases(app):
    """A class re-exported at the top level (``sam_optax.LookSAMState``) and in its submodule
    (``sam_optax.rules.LookSAMState``) gets a page under each name; autodoc gives both the same
    ``:canonical:`` alias (``sam_optax.rules._looksam.LookSAMState``), which Sphinx reports as a
    duplicate description (a warning without a type, so ``suppress_warnings`` cannot name it).
    Keep the first alias; a real duplicate (two non-alias descriptions) still warns."""
    from sphinx.domains.python import PythonDomain

    note_object = PythonDomain.note_object

    def note(self, name, objtype, node_id, aliased=False, location=None):
        if aliased and name in self.objects and self.objects[name].aliased:
            return
        note_object(self, name, objtype, node_id, aliased=aliased, location=location)

    PythonDomain.note_object = note


def setup(app):
    _skip_duplicate_aliases(app)
