"""The documentation in docs/: the user guide's examples run and give the outputs shown, and
the API reference covers every public name.

The reference is checked twice: from the reStructuredText sources (every name of
``fastopt.__all__`` is placed in docs/api/fastopt.rst; a module's page documents its whole
``__all__`` with ``automodule`` and ``:members:``, and a public module without a page gets a
generated one), and, when ``FASTOPT_DOCS_HTML`` names a built HTML tree (the docs job of
``.ci/run`` sets it), in the object inventory Sphinx wrote: every public name of every
public module (docs/public_api.py) must be there.
"""
import doctest
import importlib
import importlib.util
import os
import re
import sys
import zlib

import pytest

import fastopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
EXAMPLES = os.path.join(ROOT, "examples")

# the pages whose examples need an optional package
NEEDS = {"guide/porting.rst": "torch", "guide/schedules.rst": "matplotlib"}
PAGES = ["index.rst"] + sorted(
    f"guide/{name}" for name in os.listdir(os.path.join(DOCS, "guide")) if name.endswith(".rst"))


def _public_modules():
    path = os.path.join(DOCS, "public_api.py")
    spec = importlib.util.spec_from_file_location("public_api", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.public_modules()


def _documented_in_sources():
    """``(names, modules)``: the full names listed in autosummary tables and documented by
    auto* directives, and the modules documented with ``:members:``, in docs/**/*.rst."""
    names, modules = set(), set()
    for folder, _, files in os.walk(DOCS):
        if "_build" in folder or "generated" in folder:
            continue
        for file in files:
            if not file.endswith(".rst"):
                continue
            with open(os.path.join(folder, file), encoding="utf-8") as f:
                lines = f.read().splitlines()
            current = None
            i = 0
            while i < len(lines):
                line = lines[i]
                m = re.match(r"\.\. (?:py:)?currentmodule:: (\S+)", line)
                if m:
                    current = m.group(1)
                m = re.match(r"\.\. auto(module|class|function|data|exception):: (\S+)", line)
                if m:
                    kind, target = m.groups()
                    full = target if current is None or "." in target and target.startswith(
                        "fastopt") else f"{current}.{target}"
                    if kind == "module":
                        full = target
                        current = target
                        j = i + 1
                        while j < len(lines) and lines[j].startswith("   "):
                            if lines[j].strip() == ":members:":
                                modules.add(target)
                            j += 1
                    names.add(full)
                if line.startswith(".. autosummary::"):
                    i += 1
                    while i < len(lines) and (lines[i].startswith("   ") or not lines[i]):
                        entry = lines[i].strip()
                        if entry and not entry.startswith(":"):
                            names.add(f"{current}.{entry}" if current else entry)
                        i += 1
                    continue
                i += 1
    return names, modules


def test_api_reference_sources_list_every_public_name():
    """Every name of ``fastopt.__all__`` is placed in docs/api/fastopt.rst, and every
    module page of docs/api documents its whole ``__all__``; a public module without a page
    gets a generated one at build time (docs/conf.py), which the built-reference test sees."""
    names, modules = _documented_in_sources()
    missing = []
    for module_name, module in _public_modules().items():
        page = os.path.join(DOCS, "api", module_name.split(".", 1)[-1] + ".rst")
        if module_name != "fastopt":
            if os.path.exists(page) and module_name not in modules:
                missing.append(f"{module_name} (its page has no automodule with :members:)")
            continue
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type(fastopt)):
                continue  # a module: its own page
            if f"fastopt.{name}" not in names:
                missing.append(f"fastopt.{name}")
    assert not missing, "public names missing from the API reference (docs/api): " + \
        ", ".join(missing)


def _inventory(html):
    """The object names of a Sphinx ``objects.inv`` (format version 2)."""
    with open(os.path.join(html, "objects.inv"), "rb") as f:
        data = f.read()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    assert data.startswith(b"# Sphinx inventory version 2")
    text = zlib.decompress(data[header_end:]).decode()
    return {line.split(" ", 1)[0] for line in text.splitlines() if line.startswith("fastopt")}


@pytest.mark.skipif(not os.environ.get("FASTOPT_DOCS_HTML"),
                    reason="set FASTOPT_DOCS_HTML to a built HTML tree (sphinx-build -b html)")
def test_built_api_reference_has_every_public_name():
    documented = _inventory(os.environ["FASTOPT_DOCS_HTML"])
    missing = [f"{module_name}.{name}" for module_name, module in _public_modules().items()
               for name in module.__all__ if f"{module_name}.{name}" not in documented
               and getattr(getattr(module, name), "__name__", None) not in documented]
    missing += [m for m in _public_modules() if m not in documented]
    assert not missing, "public names missing from the built API reference: " + \
        ", ".join(missing)


@pytest.mark.parametrize("page", PAGES)
def test_user_guide_examples(page, monkeypatch):
    if page in NEEDS:
        pytest.importorskip(NEEDS[page], reason=f"{page}'s examples use {NEEDS[page]}")
    monkeypatch.syspath_prepend(EXAMPLES)  # the guide imports the example programs
    with open(os.path.join(DOCS, page), encoding="utf-8") as f:
        text = f.read()
    test = doctest.DocTestParser().get_doctest(text, {}, page, os.path.join(DOCS, page), 0)
    assert len(test.examples) >= 3, f"{page} shows no examples to run"
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    try:
        runner.run(test, out=report.append)
    finally:
        for name in [n for n in sys.modules if n in ("linear_fit", "trajectories")]:
            del sys.modules[name]
    assert runner.failures == 0, "".join(report)
