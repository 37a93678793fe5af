"""Sphinx configuration of symattn's site: Sphinx + MyST Markdown pages, math rendered by a MathJax that
`sphinx-mathjax-offline` ships inside its PyPI package (no CDN when a page is viewed).

Build: sphinx-build -W --keep-going -b html docs docs/_build/html
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the symattn of this checkout, installed or not
sys.path.insert(0, str(HERE / "_ext"))

import symattn  # noqa: E402  (cheap: public names load on first use)

project = "symattn"
author = "the symattn authors"
copyright = "the symattn authors"  # no year: the build does not depend on the date
release = version = symattn.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # copies its bundled MathJax 3 into _static/mathjax and points mathjax_path there
    "sphinxarg.ext",
    "symattn_docs",  # docs/_ext: pages computed by symattn at build time
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath"]  # $...$ and $$...$$
myst_dmath_double_inline = True
myst_fence_as_directive = ["math"]  # ```math blocks (GitHub's display math, as symattn writes it) are math
myst_heading_anchors = 3

mathjax_path = "mathjax/tex-chtml.js"  # relative to _static: the offline copy, never a CDN
mathjax3_config = {"chtml": {"scale": 1.0}}

default_role = "literal"  # `x` in symattn's docstrings is code
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autosummary_generate = False  # the reference pages are written by hand: nothing is generated into the source

html_theme = "alabaster"
html_title = f"symattn {release}"
html_static_path = ["_static"]
html_css_files = ["symattn.css"]
html_last_updated_fmt = None
html_show_sourcelink = False
html_theme_options = {"description": "Derive, explain, generate and check attention", "page_width": "1100px",
                      "sidebar_width": "240px"}
