"""Sphinx configuration of the msgsock documentation.

Build (from the repository root, after ``pip install -e '.[docs]'``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

autodoc imports the installed ``msgsock`` (the editable install of this tree), so the
reference always shows the docstrings of the code that is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgsock

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "msgsock"
author = "the msgsock authors"
copyright = "2026, the msgsock authors"
release = msgsock.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "msgsock_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# MyST: the existing Markdown pages link to each other's headings (stress.md#design-and-speed).
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# autodoc: the public names of each module are its __all__; Google-style docstrings.
autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" sections must not duplicate autodoc's attribute entries
napoleon_use_rtype = False

pygments_style = "sphinx"
pygments_dark_style = "monokai"

try:
    import furo  # noqa: F401
except ImportError:  # the docs extra brings furo; any Sphinx still builds the site
    html_theme = "alabaster"
else:
    html_theme = "furo"
html_title = f"msgsock {release}"
html_static_path: list[str] = []
