"""Sphinx configuration of the spatialdata-align documentation.

Build (from the repository root, after ``pip install -e ".[docs]"``)::

    sphinx-build -W -b html docs docs/_build/html

Environment switches
--------------------
``NB_EXECUTION_MODE``
    How myst-nb treats the tutorial notebook (committed without outputs): ``force`` (default)
    executes it on every build, so the rendered figures and numbers always come from the current
    code; ``cache`` re-executes only when its code cells change (fast local rebuilds, but stale after
    a change to the package); ``off`` renders the code without outputs.
``SDA_DOCS_INTERSPHINX``
    ``1`` links to the numpy/pandas/anndata/spatialdata/... documentation through intersphinx. Off by
    default: fetching the inventories needs the network, and the build must work offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import spatialdata_align

HERE = Path(__file__).resolve().parent

# -- project ---------------------------------------------------------------------------------------
project = "spatialdata-align"
author = "spatialdata-align developers"
copyright = f"{date.today().year}, {author}"
release = spatialdata_align.__version__
version = ".".join(release.split(".")[:2])

# -- extensions ------------------------------------------------------------------------------------
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]
if os.environ.get("SDA_DOCS_INTERSPHINX", "0") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "pandas": ("https://pandas.pydata.org/docs", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
        "xarray": ("https://docs.xarray.dev/en/stable", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "matplotlib": ("https://matplotlib.org/stable", None),
    }

templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
# .rst first: autosummary writes its generated API pages (reST) with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"

# -- autodoc / autosummary / napoleon --------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True  # class 'Attributes' as fields: no duplicate entries next to autodoc members
napoleon_custom_sections = [("Conventions", "notes_style"), ("Subpackages", "notes_style")]

# -- MyST / myst-nb ----------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "substitution"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("NB_EXECUTION_MODE", "force")
nb_execution_timeout = 900  # per cell (s); the LDDMM cell takes ~1 min on a laptop
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_execution_in_temp = True  # the notebook writes only to its own temporary folder; keep docs/ clean anyway
nb_execution_excludepatterns: list[str] = []
nb_output_stderr = "remove"  # progress bars and library notices; the notebook itself shows them
nb_merge_streams = True

# -- HTML ------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "spatialdata-align"
html_static_path: list[str] = []
html_theme_options = {
    "repository_url": "https://github.com/scverse/spatialdata-align",
    "use_repository_button": True,
    "path_to_docs": "docs",
    "show_toc_level": 2,
}


# -- generated pages -------------------------------------------------------------------------------
def _write_cli_help() -> None:
    """``generated/cli_<command>.txt``: the console script's ``--help`` (so the CLI page never goes stale)."""
    out = HERE / "generated"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "COLUMNS": "100"}
    for name, args in (("main", []), ("run", ["run"]), ("demo", ["demo"]), ("batch", ["batch"])):
        res = subprocess.run(
            [sys.executable, "-m", "spatialdata_align.cli", *args, "--help"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        text = res.stdout
        target = out / f"cli_{name}.txt"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


_write_cli_help()
