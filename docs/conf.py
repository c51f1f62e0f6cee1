"""Sphinx configuration of the hyperspy_gp documentation.

Build from the repository root with ``sphinx-build -W --keep-going -b html docs docs/_build/html``
(``pip install -e ".[docs]"`` first).  The gallery in ``examples/gallery`` is executed
at build time; ``tests/test_docs.py`` runs the same build with warnings as errors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "_ext"))

import hyperspy_gp  # noqa: E402

project = "hyperspy_gp"
author = "hyperspy_gp developers"
copyright = "hyperspy_gp developers, GPL-3.0-or-later"
release = hyperspy_gp.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "cli_help",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5",
                    "auto_examples/*.codeobj.json"]
templates_path = ["_templates"]
default_role = "py:obj"

# -- autodoc / numpydoc ------------------------------------------------------
autodoc_typehints = "none"  # the numpydoc sections state the types
autodoc_member_order = "bysource"
autosummary_generate = False  # the API pages are written by hand (docs/api)
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- sphinx-gallery ------------------------------------------------------------
# Only files named plot_*.py in examples/gallery are gallery examples; other
# scripts under examples/ (e.g. examples/paper_workflow.py) are never run here.
sphinx_gallery_conf = {
    "examples_dirs": [str(ROOT / "examples" / "gallery")],
    "gallery_dirs": [str(HERE / "auto_examples")],
    "filename_pattern": r"/plot_",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "gallery_setup.quiet_hyperspy"),
    "show_memory": False,
    "plot_gallery": os.environ.get("HYPERSPY_GP_DOCS_PLOT_GALLERY", "True"),
}

# -- HTML ------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"hyperspy_gp {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
}
html_static_path: list[str] = []
html_show_sourcelink = False
