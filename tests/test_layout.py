"""The architecture holds: one kernel table, classes that name their kernel, no import cycles."""
import ast
import pathlib
import re

import numpy as np
import pytest

import fastopt
from fastopt import _kernels
from fastopt.optimizer import Optimizer, kernel_optimizers, other_optimizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS_DEF = ROOT / "csrc" / "kernels.def"
# kernels that no generic optimizer class names: SparseAdam and swa_utils call them directly
DIRECT_KERNELS = {"sparse_adam", "average"}


def _def_names():
    return re.findall(r"^FO_KERNEL\((\w+)\)", KERNELS_DEF.read_text(), re.M)


def test_the_compiled_table_is_kernels_def():
    assert _kernels.kernel_names() == _def_names()


def test_every_kernel_has_its_source_file_and_a_user():
    used = {cls._kernel for cls in fastopt.OPTIMIZERS.values()}
    for name in _def_names():
        assert (ROOT / "csrc" / f"{name}.c").is_file(), name
        assert name in used or name in DIRECT_KERNELS, f"kernel {name!r} has no class"
    assert used <= set(_def_names())


def test_registries_follow_the_kernel_table():
    order = {name: i for i, name in enumerate(_def_names())}
    ranks = [order[cls._kernel] for cls in fastopt.OPTIMIZERS.values()]
    assert ranks == sorted(ranks)
    # the optimizers of today, in order (an added one may stand anywhere between them)
    known = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adadelta", "Adamax", "NAdam",
             "RAdam", "ASGD", "Rprop", "Lion"]
    assert [name for name in fastopt.OPTIMIZERS if name in known] == known
    others = ["SparseAdam", "LBFGS", "Adafactor", "Muon"]
    assert [name for name in fastopt.OTHER_OPTIMIZERS if name in others] == others
    assert all(cls._kernel is None for cls in fastopt.OTHER_OPTIMIZERS.values())
    for name, cls in {**fastopt.OPTIMIZERS, **fastopt.OTHER_OPTIMIZERS}.items():
        assert getattr(fastopt, name) is cls and name in fastopt.__all__


def test_a_user_subclass_steps_through_its_parents_kernel_and_is_not_registered():
    class ScaledAdam(fastopt.Adam):
        pass

    assert "ScaledAdam" not in kernel_optimizers() and "ScaledAdam" not in other_optimizers()
    p, q = (fastopt.Parameter(np.linspace(-1, 1, 9, dtype=np.float32)) for _ in range(2))
    p.grad = q.grad = np.linspace(2, -2, 9, dtype=np.float32)
    ScaledAdam([p], lr=0.1).step()
    fastopt.Adam([q], lr=0.1).step()
    np.testing.assert_array_equal(p, q)


def test_an_unknown_kernel_is_refused_when_the_class_is_defined():
    with pytest.raises(ValueError, match="no C kernel named 'adamx'"):
        class Broken(Optimizer):
            _kernel = "adamx"


def test_hyperparameters_that_do_not_fill_the_kernel_struct_raise_before_any_change():
    class Short(fastopt.Adam):
        _hyperparameters = ("lr", "betas", "eps", "weight_decay")  # the kernel takes 10

    p = fastopt.Parameter(np.ones(4, dtype=np.float32))
    p.grad = np.ones(4, dtype=np.float32)
    opt = Short([p])
    with pytest.raises(TypeError, match=r"param_groups\[0\]: .* give 5 numbers; the kernel "
                                        r"'adam' takes 10"):
        opt.step()
    np.testing.assert_array_equal(p, 1.0)
    assert len(opt.state) == 0


def test_scalar_state_keys_derive_from_the_declaration():
    assert fastopt.Adam._scalar_state_keys == {"step"}
    assert fastopt.NAdam._scalar_state_keys == {"step", "mu_product"}
    assert fastopt.ASGD._scalar_state_keys == {"step", "eta", "mu"}
    assert fastopt.SGD._scalar_state_keys == set()
    assert fastopt.Lion._scalar_state_keys == set()


def _import_graph(package):
    """module -> {imported module of the package: [line numbers]}, module-level and
    function-level imports alike (an import moved into a function to dodge a cycle is
    still a cycle)."""
    mods = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    graph = {}
    for name, path in mods.items():
        out = graph.setdefault(name, {})
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor if is_pkg else anchor[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):
                    out.setdefault(t, []).append(node.lineno)
    return graph


def _cycles(graph):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = _import_graph(ROOT / "src" / "fastopt")
    assert "fastopt.optimizer" in graph and graph["fastopt.optimizer"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    assert _cycles(_import_graph(pkg)) == [["pkg.a", "pkg.b"]]
