"""Sphinx configuration of fastopt's documentation (``sphinx-build -W -b html docs out``).

The build needs no network: no intersphinx inventories are fetched, and the math is
rendered in the browser by MathJax, which the HTML pages load from its CDN.
"""
import os
import sys
from importlib.metadata import version as _version

HERE = os.path.dirname(os.path.abspath(__file__))
# the examples the user guide shows (the package itself is installed, normally in editable
# mode), and public_api.py
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)

project = "fastopt"
author = "the fastopt developers"
copyright = "2026, the fastopt developers"
release = _version("fastopt")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

templates_path = ["_templates"]
exclude_patterns = ["_build"]
nitpicky = False
default_role = "py:obj"

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # numpydoc's Parameters sections give the types in words

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

html_theme = "furo"
html_title = f"fastopt {release}"
html_static_path = ["_static"]


def _draw_demo_pictures(app):
    """Draw the demo's pictures into _generated/demo, which the user guide shows."""
    import argparse
    import contextlib
    import io

    from fastopt._cli import demo

    out = os.path.join(app.srcdir, "_generated", "demo")
    with contextlib.redirect_stdout(io.StringIO()):
        demo.run(argparse.Namespace(out=out, quick=False))


def _torch_docstring(cls):
    """The docstring of the torch.optim class that ``cls`` (a fastopt.torch class) extends."""
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("torch.optim") and base.__doc__:
            return base, base.__doc__
    return None, None


def _cut_torch_docstrings(app, what, name, obj, options, lines):
    """fastopt.torch's classes append the docstring of their torch.optim namesake, written
    for torch's own documentation (Google style, torch's labels); the reference shows
    fastopt's part and points to torch's page for the rest."""
    if what != "class" or not name.startswith("fastopt.torch.") or not obj.__doc__:
        return
    base, torch_doc = _torch_docstring(obj)
    if torch_doc is None or torch_doc not in obj.__doc__:
        return
    from sphinx.util.docstrings import prepare_docstring

    own = obj.__doc__[:obj.__doc__.index(torch_doc)]
    lines[:] = prepare_docstring(own.rstrip() + "\n\n" + (
        f"The arguments and the rest of the documentation are those of "
        f"``torch.optim.{base.__name__}``"
        " in PyTorch's documentation.\n"))


def _module_pages(app):
    """A reference page for every public module that has none in api/ (a module added since
    the reference was last arranged): ``automodule`` with ``:members:``, listed by the
    toctree that api/index.rst includes, so every public name is documented."""
    from public_api import public_modules

    out = os.path.join(app.srcdir, "_generated")
    os.makedirs(os.path.join(out, "api"), exist_ok=True)
    pages = []
    for name in public_modules():
        short = name.split(".", 1)[-1]
        if name == "fastopt" or os.path.exists(os.path.join(app.srcdir, "api", short + ".rst")):
            continue
        title = f"``{name}``"
        with open(os.path.join(out, "api", short + ".rst"), "w", encoding="utf-8") as f:
            f.write(f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n"
                    "   :members:\n   :undoc-members:\n   :show-inheritance:\n")
        pages.append(f"/_generated/api/{short}")
    with open(os.path.join(out, "api_modules.inc"), "w", encoding="utf-8") as f:
        if pages:
            f.write(".. toctree::\n   :maxdepth: 1\n\n" + "".join(f"   {p}\n" for p in pages))


def setup(app):
    app.connect("builder-inited", _draw_demo_pictures)
    app.connect("builder-inited", _module_pages)
    # before numpydoc's own handler (priority 500) parses the docstring
    app.connect("autodoc-process-docstring", _cut_torch_docstrings, priority=100)
